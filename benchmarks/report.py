"""The suite's results as text (with the targets), as reStructuredText tables and as a figure."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from adbackends.bench import WORKLOADS

#: Each part's title, and its target where it has one.
TITLES: Dict[str, str] = {
    "P1": "P1 dispatch overhead",
    "P2": "P2 loop jacrev",
    "P3": "P3 loop vmap",
    "P4": "P4 cold start",
    "P5": "P5 every backend, every workload",
    "P6": "P6 peak extra memory of jacrev",
    "P7": "P7 the fallback chain's cost",
    "S": "S size-aware strategy",
}
TARGETS: Dict[str, str] = {
    "P1": "<= 1.02 vs torch.func in every run",
    "P2": "<= 0.9 vs autograd.functional.jacobian",
    "P3": "<= 1.10 vs a loop plus torch.stack, every batch",
    "P4": "<= 1.03 jacrev first, <= 1.05 vmap first, vs plain torch.func",
    "P7": "a <= 1.02, b <= 1.05, c <= 0.1",
    "P6": "loop: about one chunk plus the result",
}

Data = Mapping[str, Any]


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _ratio(r: float) -> str:
    return f"{r:.2g}" if r < 10 else f"{r:.0f}"


def _grid_cell(row: Data, name: str, strong: str = "") -> str:
    if name in row.get("skipped", ()):
        return "skipped"
    if name in row["errors"] or name not in row["seconds"]:
        return "failed"
    t = _time(row["seconds"][name])
    if name == row["fastest"]:
        return f"{strong}{t}{strong} *"
    mark = "~x" if name in row["inexact"] else "x"
    return f"{t} {mark}{_ratio(row['relative'][name])}"


# -- text, with the targets -----------------------------------------------------------


def text(data: Data) -> str:
    """Every part in ``data["parts"]`` as plain text, each with its target."""
    mach = data["machine"]
    parts = data["parts"]
    lines = [
        f"adbackends {mach['adbackends']}, torch {mach['torch']}, Python {mach['python']}, "
        f"{mach['cpus']} CPUs ({mach['torch_threads']} torch threads), {mach['platform']}",
    ]
    for part, result in parts.items():
        title = TITLES.get(part, part)
        if part in TARGETS:
            title += f" (target {TARGETS[part]})"
        lines += ["", title]
        if isinstance(result, dict) and "error" in result:
            lines.append(f"  could not run here: {result['error']}")
            continue
        if isinstance(result, dict) and set(result) == {"skipped"}:
            lines.append(f"  skipped here: {result['skipped']}")
            continue
        lines += [f"  {line}" for line in _TEXT[part](result)]
    return "\n".join(lines)


def _p1_text(r: Data) -> List[str]:
    lines = []
    for mode, m in r["modes"].items():
        lines.append(f"{mode}: active backend {m['active']}, {r['runs']} run(s)")
        for t in m["transforms"]:
            ratios = " ".join(f"{x:.3f}" for x in t["ratios"])
            lines.append(
                f"  {t['transform']:<7} ratios {ratios}   max {t['max']:.3f}"
                f" ({sum(t['met'])}/{len(t['met'])} met)   A/A max {max(t['controls']):.3f}"
                f"   dispatch {t['dispatch_us']:.2f} us on a {t['torch_func_call_us']:.0f} us"
                f" call -> {t['overhead_ratio']:.4f}"
            )
    return lines


def _p2_text(rows: Sequence[Data]) -> List[str]:
    return [
        f"n={r['n']:<5} {r['loop_ms']:8.3f} ms   / functional.jacobian {r['vs_functional']:.3f}"
        f"   / grad loop {r['vs_grad_loop']:.3f}   max|diff| {r['max_abs_diff']:.1e}"
        for r in rows
    ]


def _p3_text(rows: Sequence[Data]) -> List[str]:
    return [
        f"{r.get('case', 'pair energy'):<12} b={r['batch']:<5} {r['loop_ms']:8.3f} ms"
        f"   / stack loop {r['vs_stack_loop']:.3f}"
        f"   equal {r['equal']}"
        for r in rows
    ]


def _p4_text(r: Data) -> List[str]:
    lines = [
        f"adbackends {r['adbackends_s']:.3f} s   torch.func {r['torch_func_s']:.3f} s   "
        f"import torch {r['import_torch_s']:.3f} s   ratio {r['ratio']:.3f} "
        f"({r['pairs']} alternating rounds)",
        f"adbackends' own cost after torch's first-use work: {r['own_cost_ms']:.1f} ms "
        f"-> {r['own_cost_ratio']:.4f} of the torch.func cold start",
        f"first transform a vmap: adbackends {r['adbackends_vmap_s']:.3f} s   torch.func "
        f"{r['torch_func_vmap_s']:.3f} s   ratio {r['vmap_ratio']:.3f} (probe cache warm)",
    ]
    if "cold_cache_vmap_ratio" in r:
        lines.append(
            f"the same, empty probe cache: adbackends {r['cold_cache_adbackends_vmap_s']:.3f} s"
            f"   torch.func {r['cold_cache_torch_func_vmap_s']:.3f} s"
            f"   ratio {r['cold_cache_vmap_ratio']:.3f} ({r['cold_rounds']} round(s))"
        )
    for which, stages in r["stages_ms"].items():
        lines.append(f"{which:<10} " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items()))
    return lines


def _p5_text(rows: Sequence[Data]) -> List[str]:
    names = rows[0]["backends"] if rows else []
    width = max([len(n) for n in names] + [14])
    head = f"{'workload':<9} {'size':>10}  " + "  ".join(f"{n:>{width}}" for n in names)
    lines = ["* fastest, xR = R times the fastest, ~ an approximation", head, "-" * len(head)]
    for row in rows:
        size = f"{WORKLOADS[row['workload']]} {row['size']}"
        cells = "  ".join(f"{_grid_cell(row, n):>{width}}" for n in names)
        lines.append(f"{row['workload']:<9} {size:>10}  {cells}")
    for row in rows:
        for name, why in row["errors"].items():
            lines.append(f"{name} failed, {row['workload']} {row['size']}: {why}")
    return lines


def _p6_text(rows: Sequence[Data]) -> List[str]:
    lines = []
    for r in rows:
        what = f"{r['backend']:<20} chunk_size={r['chunk_size']!s:<5}"
        if "error" in r:
            lines.append(f"{what} failed: {r['error']}")
        else:
            lines.append(
                f"{what} m={r['m']} n={r['n']}  peak {r['peak_mib']:7.1f} MiB"
                f"  (result {r['result_mib']:.1f} MiB, x{r['peak_over_result']:.1f})"
            )
    return lines


def _p7_text(r: Data) -> List[str]:
    lines = []
    for key, what in _P7_PARTS.items():
        sub = r[key]
        if "skipped" in sub:
            lines.append(f"{key} {what}: skipped, {sub['skipped']}")
            continue
        lines.append(f"{key} {what} (auto here: {sub['auto']})")
        for row in sub["rows"]:
            extra = "".join(f"   / {k} {v:.3f}" for k, v in row["others"].items())
            lines.append(
                f"  {row['call']:<26} {row['timed']} / {row['over']} {row['ratio']:.3f}"
                f" (target {row['target']}: {'met' if row['met'] else 'missed'}){extra}"
                f"   max|diff| {row['max_abs_diff']:.1e}"
            )
    return lines


def _s_text(rows: Sequence[Data]) -> List[str]:
    return [
        f"{r['kind']:<11} n={r['n']:<5} torch.func {r['torch_func_ms']:8.3f} ms"
        f"   grad loop x{r['grad_loop_vs_torch_func']:.2f}   loop x{r['loop_vs_torch_func']:.2f}"
        f"   bitwise equal {r['bitwise_equal']} (max|diff| {r['max_abs_diff']:.1e})"
        for r in rows
    ]


_TEXT = {
    "P1": _p1_text,
    "P2": _p2_text,
    "P3": _p3_text,
    "P4": _p4_text,
    "P5": _p5_text,
    "P6": _p6_text,
    "P7": _p7_text,
    "S": _s_text,
}

#: The three parts of P7, as the text and the tables name them.
_P7_PARTS: Dict[str, str] = {
    "a": "calls that never fall back: the chain / the torch.func backend",
    "b": "calls that fell back: the chain / the loop backend",
    "c": "torch 1.13, vmap of a plain function: functorch>loop / loop",
}


# -- reStructuredText -----------------------------------------------------------------


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = [f".. list-table:: {title}", "   :header-rows: 1", ""]
    for cells in [header, *rows]:
        lines.append(f"   * - {cells[0]}")
        lines += [f"     - {cell}" for cell in cells[1:]]
    return [*lines, ""]


def _code(value: str) -> str:
    return f"``{value}``"


def _rst_part(part: str, result: Any) -> List[str]:
    title = TITLES[part] + (f" (target {TARGETS[part]})" if part in TARGETS else "")
    if isinstance(result, dict) and "error" in result:
        return [f"**{title}**: could not run here ({result['error']}).", ""]
    if isinstance(result, dict) and set(result) == {"skipped"}:
        return [f"**{title}**: skipped here: {result['skipped']}.", ""]
    if part == "P1":
        return _p1_rst(title, result)
    if part == "P2":
        return _table(
            title,
            ["n", "loop", "/ functional.jacobian", "/ grad loop", "max abs diff"],
            [
                [
                    str(r["n"]),
                    f"{r['loop_ms']:.3f} ms",
                    f"{r['vs_functional']:.3f}",
                    f"{r['vs_grad_loop']:.3f}",
                    f"{r['max_abs_diff']:.1e}",
                ]
                for r in result
            ],
        )
    if part == "P3":
        return _table(
            title,
            ["function", "batch", "loop", "/ stack loop", "equal"],
            [
                [
                    r.get("case", "pair energy"),
                    str(r["batch"]),
                    f"{r['loop_ms']:.3f} ms",
                    f"{r['vs_stack_loop']:.3f}",
                    str(r["equal"]),
                ]
                for r in result
            ],
        )
    if part == "P4":
        r = result
        rows = [
            [
                "import, one jacrev",
                f"{r['adbackends_s']:.3f} s",
                f"{r['torch_func_s']:.3f} s",
                f"{r['ratio']:.3f}",
            ],
            [
                "import, one vmap",
                f"{r['adbackends_vmap_s']:.3f} s",
                f"{r['torch_func_vmap_s']:.3f} s",
                f"{r['vmap_ratio']:.3f}",
            ],
            *(
                [
                    [
                        f"import, one vmap, empty probe cache ({r['cold_rounds']} rounds)",
                        f"{r['cold_cache_adbackends_vmap_s']:.3f} s",
                        f"{r['cold_cache_torch_func_vmap_s']:.3f} s",
                        f"{r['cold_cache_vmap_ratio']:.3f}",
                    ]
                ]
                if "cold_cache_vmap_ratio" in r
                else []
            ),
            ["import torch alone", "", f"{r['import_torch_s']:.3f} s", ""],
            [
                "adbackends' own cost",
                f"{r['own_cost_ms']:.1f} ms",
                "",
                f"{r['own_cost_ratio']:.4f}",
            ],
        ]
        return _table(
            f"{title}, median of {r['pairs']} alternating rounds",
            ["fresh interpreter", "adbackends", "torch.func", "ratio"],
            rows,
        )
    if part == "P5":
        lines = [
            "**P5**: time per call (median); **bold** and * the fastest, xR = R times the",
            "fastest's time, ~ an approximation (never called fastest).",
            "",
        ]
        names = result[0]["backends"] if result else []
        for workload in WORKLOADS:
            rows = [r for r in result if r["workload"] == workload]
            if not rows:
                continue
            word = WORKLOADS[workload]
            lines += _table(
                f"P5 {workload}",
                [word, *names],
                [[str(r["size"])] + [_grid_cell(r, n, "**") for n in names] for r in rows],
            )
        return lines
    if part == "P6":
        return _table(
            f"{title}, m = {result[0]['m']} outputs, n = {result[0]['n']} inputs"
            if result
            else title,
            ["backend", "chunk_size", "peak", "result", "peak / result"],
            [
                [r["backend"], str(r["chunk_size"]), "failed", "", ""]
                if "error" in r
                else [
                    r["backend"],
                    str(r["chunk_size"]),
                    f"{r['peak_mib']:.1f} MiB",
                    f"{r['result_mib']:.1f} MiB",
                    f"{r['peak_over_result']:.1f}",
                ]
                for r in result
            ],
        )
    if part == "P7":
        return _p7_rst(title, result)
    if part == "S":
        return _table(
            f"{title}: a grad loop and the loop backend over torch.func.jacrev",
            ["problem", "n", "torch.func", "grad loop", "loop", "bitwise equal"],
            [
                [
                    r["kind"],
                    str(r["n"]),
                    f"{r['torch_func_ms']:.3f} ms",
                    f"{r['grad_loop_vs_torch_func']:.2f}",
                    f"{r['loop_vs_torch_func']:.2f}",
                    str(r["bitwise_equal"]),
                ]
                for r in result
            ],
        )
    raise ValueError(f"unknown part {part!r}")


def _p1_rst(title: str, r: Data) -> List[str]:
    lines: List[str] = []
    for mode, m in r["modes"].items():
        names = [t["transform"] for t in m["transforms"]]
        header = ["run"] + [f"``{n}``" for n in names] + [f"A/A ``{n}``" for n in names]
        rows = [
            [str(i + 1)]
            + [
                f"{t['ratios'][i]:.3f}" + ("" if t["met"][i] else " (missed)")
                for t in m["transforms"]
            ]
            + [f"{t['controls'][i]:.3f}" for t in m["transforms"]]
            for i in range(r["runs"])
        ]
        rows.append(
            ["max"]
            + [f"**{t['max']:.3f}**, {sum(t['met'])}/{len(t['met'])} met" for t in m["transforms"]]
            + [f"{max(t['controls']):.3f}" for t in m["transforms"]]
        )
        rows.append(
            ["making the transform"]
            + [
                f"+{t['dispatch_us']:.2f} µs on a {t['torch_func_call_us']:.0f} µs call: "
                f"{t['overhead_ratio']:.4f}"
                for t in m["transforms"]
            ]
            + ["" for _ in m["transforms"]]
        )
        label = "what users get" if mode == "auto" else 'after ``use("torch.func")``'
        lines += _table(f"{title}; {mode}, {label}: active backend {m['active']}", header, rows)
    return lines


def _p7_rst(title: str, r: Data) -> List[str]:
    lines: List[str] = []
    for key, what in _P7_PARTS.items():
        sub = r[key]
        head = f"P7{key}, {what}"
        if "skipped" in sub:
            lines += [f"**{head}**: skipped here: {sub['skipped']}.", ""]
            continue
        others = sorted({k for row in sub["rows"] for k in row["others"]})
        lines += _table(
            f"{head} (auto here: {sub['auto']})",
            ["call", "ratio", "target", "met", *[f"/ {k}" for k in others], "max abs diff"],
            [
                [
                    _code(row["call"]),
                    f"{row['ratio']:.3f}",
                    f"<= {row['target']}",
                    "met" if row["met"] else "**missed**",
                    *[f"{row['others'][k]:.3f}" for k in others],
                    f"{row['max_abs_diff']:.1e}",
                ]
                for row in sub["rows"]
            ],
        )
    return lines


def choice_sentence(rows: Sequence[Data], version: str) -> str:
    """Which backend to choose, from a P5 grid: the best geometric mean, and the gaps.

    The backends compared are those that ran every row exactly; the gap of
    each other one is given as the range of its time over the best one's.
    """
    names = rows[0]["backends"] if rows else []
    full = [n for n in names if all(n in r["seconds"] and n not in r["inexact"] for r in rows)]
    if len(full) < 2:
        return f"On torch {version}, too few backends ran every workload to compare."
    score = {n: math.exp(statistics.mean(math.log(r["relative"][n]) for r in rows)) for n in full}
    best = min(full, key=score.__getitem__)
    parts = []
    for n in sorted((n for n in full if n != best), key=score.__getitem__):
        gaps = [r["seconds"][n] / r["seconds"][best] for r in rows]
        parts.append(
            f"{n} takes {_ratio(min(gaps))} to {_ratio(max(gaps))} times as long "
            f"(geometric mean {_ratio(score[n] / score[best])})"
        )
    return (
        f"On torch {version}, choose **{best}**: over these {len(rows)} workloads and sizes "
        + "; ".join(parts)
        + "."
    )


def _where(machine: Data, date: str) -> str:
    return (
        f"{date}: {machine['platform']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch thread(s); torch {machine['torch']}, "
        f"Python {machine['python']}, adbackends {machine['adbackends']}"
    )


def rst(data: Data, figure: Optional[str] = None) -> str:
    """The tables as reStructuredText; ``figure``: the image path to show with P5."""
    lines = [".. Written by benchmarks/run.py from benchmarks/results.json.", ""]
    for where, parts in _runs_by_machine(data).items():
        lines += [f"Measured {where} (parts {', '.join(parts)}).", ""]
    for part, result in data["parts"].items():
        if part == "P5" and figure and not (isinstance(result, dict) and "error" in result):
            lines += [
                f".. figure:: {figure}",
                "   :alt: time per call against size, per backend and workload, log-log",
                "   :width: 100%",
                "",
                "   Time per call against size for every backend, log-log. Dashed: an",
                "   approximation (finite differences).",
                "",
            ]
        lines += _rst_part(part, result)
    for version, older in data.get("older_torch", {}).items():
        lines += _older_rst(version, older)
    return "\n".join(lines).rstrip() + "\n"


def _older_rst(version: str, data: Data) -> List[str]:
    """The tables of a run on an older torch, each title marked with its version."""
    lines = [f"**On torch {version}.**", ""]
    for where, parts in _runs_by_machine(data).items():
        lines += [f"Measured {where} (parts {', '.join(parts)}).", ""]
    for part, result in data["parts"].items():
        if part == "P5" and isinstance(result, list):
            lines += [choice_sentence(result, version), ""]
        for line in _rst_part(part, result):
            if line.startswith(".. list-table:: "):
                line = line.replace(".. list-table:: ", f".. list-table:: torch {version}: ", 1)
            lines.append(line)
    return lines


def _runs_by_machine(data: Data) -> Dict[str, List[str]]:
    runs: Dict[str, List[str]] = {}
    for part, meta in data["runs"].items():
        runs.setdefault(_where(meta["machine"], meta["date"]), []).append(part)
    return runs


# -- the figure -------------------------------------------------------------------------


def figure(rows: Sequence[Data], path: Path) -> bool:
    """Draw P5 as a grid of log-log plots (one per workload) into ``path``.

    Returns ``False``, drawing nothing, when matplotlib is not installed
    (``pip install adbackends[bench]``).
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    names = rows[0]["backends"] if rows else []
    cols = 2 if len(workloads) > 1 else 1
    nrows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    titles = {
        "jacrev": "jacrev: Jacobian of tanh(W x) sum(x²)",
        "vmap": "vmap: pair energy of 8 points",
        "forces": "forces: vmap(jacrev(LJ energy)), 8 atoms",
        "hessians": "Hessians: vmap(jacrev(jacrev(LJ))), 8 atoms",
    }
    styles = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for ax, workload in zip(axes.flat, workloads):
        these = [r for r in rows if r["workload"] == workload]
        for i, name in enumerate(names):
            pts = [(r["size"], r["seconds"][name]) for r in these if name in r["seconds"]]
            if not pts:
                continue
            inexact = any(name in r["inexact"] for r in these)
            ax.plot(
                [p[0] for p in pts],
                [p[1] * 1e3 for p in pts],
                marker=styles[i % len(styles)],
                linestyle="--" if inexact else "-",
                label=name,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(titles.get(workload, workload), fontsize=10)
        ax.set_xlabel("n (inputs)" if WORKLOADS[workload] == "n" else "batch (geometries)")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
