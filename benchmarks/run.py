"""The full benchmark suite: ``python benchmarks/run.py [--parts P1,P5] [--quick]``.

Runs the parts, prints them with their targets, and writes:

* ``benchmarks/results.json``: the data, merged part by part, so that a run
  of some parts keeps the others' results;
* the tables between the markers in ``docs/performance.rst``;
* the figure ``docs/_static/performance_grid.png`` (needs matplotlib:
  ``pip install -e .[bench]``).

``--out DIR`` writes ``results.json``, ``performance_tables.rst`` and
``performance_grid.png`` into DIR instead. ``--quick`` runs tiny sizes with
one repeat (seconds; it checks that everything works, the times mean
nothing) and, without ``--out``, writes nothing. ``--render`` only rewrites
the tables and the figure from ``results.json``.

Parts: P1 dispatch overhead, P2 loop jacrev, P3 loop vmap, P4 cold start,
P5 every backend on every workload (jacrev, vmap, batched forces, batched
Hessians) over sizes, P6 peak memory, P7 the fallback chain's cost, S the
size-aware strategy question. ``--p1-runs N`` runs P1 N times (its target
holds in every run); ``--backends a,b>c`` names P5's backends.

Results measured on torch 1.x are kept apart, under ``older_torch`` and the
torch version in ``results.json`` (a run on torch 2 does not replace them),
and get tables of their own. The figure is drawn from torch 2's P5 only;
after a run on an older torch without matplotlib, ``--render`` from an
environment with it redraws the page and the figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"
PAGE = ROOT / "docs" / "performance.rst"
FIGURE = ROOT / "docs" / "_static" / "performance_grid.png"
#: The lines between which the generated tables stand in ``docs/performance.rst``.
START = ".. benchmark tables start"
END = ".. benchmark tables end"

sys.path.insert(0, str(HERE))  # the modules beside this script, however it is started

import report  # noqa: E402
import suite  # noqa: E402


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Run the benchmark suite and write the tables and figure of the docs.",
    )
    parser.add_argument(
        "--parts", default="", help=f"comma-separated parts (default: all): {','.join(suite.PARTS)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat: checks, not speed"
    )
    parser.add_argument("--out", type=Path, help="write the results, tables and figure here")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the tables and figure from the JSON"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's)"
    )
    parser.add_argument("--p1-runs", type=int, default=1, help="run P1 this many times (default 1)")
    parser.add_argument(
        "--backends",
        default="",
        help="comma-separated backends for P5, chains allowed (default: every one that loads)",
    )
    args = parser.parse_args(argv)
    parts = [p.strip().upper() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(suite.PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(suite.PARTS)}")
    default = suite.QUICK_PARTS if args.quick else suite.PARTS
    args.parts = [p for p in suite.PARTS if p in parts] if parts else list(default)
    if args.p1_runs < 1:
        parser.error("--p1-runs must be at least 1")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()] or None
    return args


def measure(
    parts: Sequence[str],
    quick: bool,
    p1_runs: int = 1,
    backends: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Run ``parts``; a part that fails is recorded as ``{"error": ...}``."""
    import torch

    from adbackends.bench import _machine, _quiet

    steps = suite.steps(quick, p1_runs=p1_runs, backends=backends)
    machine = _machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data: Dict[str, Any] = {"machine": machine, "parts": {}, "runs": {}}
    for part in parts:
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            with _quiet():
                data["parts"][part] = steps[part]()
        except Exception as exc:  # one part failing must not lose the others
            data["parts"][part] = {"error": f"{type(exc).__name__}: {exc}"}
        data["runs"][part] = {"machine": machine, "date": date, "quick": quick}
        print(f"[{part}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    return data


def older_torch(machine: Dict[str, Any]) -> Optional[str]:
    """``"1.13"`` for a run on torch 1.13: such results are kept apart; ``None`` on torch 2+."""
    major, minor = [*str(machine["torch"]).split("+")[0].split("."), "0"][:2]
    return f"{major}.{minor}" if int(major) < 2 else None


def _merged(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    parts = {**old.get("parts", {}), **new["parts"]}
    runs = {**old.get("runs", {}), **new["runs"]}
    order = [p for p in suite.PARTS if p in parts]
    return {
        "machine": new["machine"],
        "parts": {p: parts[p] for p in order},
        "runs": {p: runs[p] for p in order},
    }


def merge(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """``old`` with the parts of ``new`` replaced, in the suite's order.

    A run on torch 1.x goes under ``older_torch`` and its version, leaving
    torch 2's results (and those of other versions) as they are.
    """
    version = older_torch(new["machine"])
    kept = dict(old.get("older_torch", {}))
    if version is None:
        out = _merged(old, new)
    else:
        kept[version] = _merged(kept.get(version, {}), new)
        out = {key: old[key] for key in ("machine", "parts", "runs") if key in old}
        out.setdefault("machine", new["machine"])
        out.setdefault("parts", {})
        out.setdefault("runs", {})
    if kept:
        out["older_torch"] = {v: kept[v] for v in sorted(kept)}
    return out


def write_page(page: Path, tables: str) -> None:
    """Replace what stands between the markers in ``page`` with ``tables``."""
    text = page.read_text(encoding="utf-8")
    head, sep, rest = text.partition(START + "\n")
    _, sep2, tail = rest.partition(END + "\n")
    if not (sep and sep2):
        raise SystemExit(f"{page}: the lines {START!r} and {END!r} are missing")
    page.write_text(f"{head}{START}\n\n{tables}\n{END}\n{tail}", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    out: Optional[Path] = args.out
    results = out / "results.json" if out else RESULTS
    if args.render:
        data = json.loads(results.read_text(encoding="utf-8"))
    else:
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        data = measure(args.parts, args.quick, args.p1_runs, args.backends)
        print(report.text(data))
        if args.quick and out is None:
            print("(--quick without --out: nothing written)", file=sys.stderr)
            return 0
        old = json.loads(results.read_text(encoding="utf-8")) if results.exists() else {}
        data = merge(old, data)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    written: List[Path] = [] if args.render else [results]
    image = out / "performance_grid.png" if out else FIGURE
    grid = data["parts"].get("P5")
    drawn = isinstance(grid, list) and report.figure(grid, image)
    if isinstance(grid, list) and not drawn:
        print("matplotlib is not installed: no figure (pip install -e .[bench])", file=sys.stderr)
    if drawn:
        written.append(image)
    tables = report.rst(data, f"/_static/{image.name}" if drawn else None)
    if out:
        (out / "performance_tables.rst").write_text(tables, encoding="utf-8")
        written.append(out / "performance_tables.rst")
    else:
        write_page(PAGE, tables)
        written.append(PAGE)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
