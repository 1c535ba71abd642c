"""P11: transforms within a memory budget (``chunk_size="auto"`` and a memory limit).

P11a: with a limit of a quarter of the unchunked peak, time / unchunked time
for ``jacrev`` at n = 1024 and for a batched Hessian (``vmap(hessian)``),
and the measured peak against the limit. P11b: ``chunk_size="auto"`` with no
limit / ``chunk_size=None``. Also the figure ``docs/_static/memory_chunks.png``:
peak memory and time against the chunk for a Jacobian and a Hessian.

Peaks are measured with :func:`adbackends._memory.measure` (every storage the
call's operations create, freed bytes subtracted when a storage dies), in runs
separate from the timed ones. Timings are interleaved (one run of each
variant per round) and the median over the rounds is kept.

Run from the repository root: ``python benchmarks/memory.py [--quick]``;
it writes ``benchmarks/memory_results.json`` and the figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

import adbackends
from adbackends import _memory

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "memory_results.json"
FIGURE = ROOT / "docs" / "_static" / "memory_chunks.png"


def mlp(n: int, hidden: int, out: int) -> Callable[[Any], Any]:
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(hidden, n, generator=gen) / n**0.5
    w2 = torch.randn(out, hidden, generator=gen) / hidden**0.5

    def f(x: Any) -> Any:
        return w2 @ torch.tanh(w1 @ torch.tanh(x))

    return f


def peak(fn: Callable[[], Any]) -> int:
    with _memory.measure() as meter:
        fn()
    return meter.peak()


def interleaved(variants: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, float]:
    """Median time of each variant, one run of each per round, the order alternating.

    With two variants, ``"ratio"`` is the median of the per-round ratios
    (second / first), which drifting machine load affects less.
    """
    for fn in variants.values():  # warm up, and let "auto" choose its chunk
        fn()
    names = list(variants)
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    result = {name: statistics.median(values) for name, values in times.items()}
    if len(names) == 2:
        first, second = times[names[0]], times[names[1]]
        result["ratio"] = statistics.median(b / a for a, b in zip(first, second))
    return result


def p11a(rounds: int) -> List[Dict[str, Any]]:
    rows = []
    f = mlp(1024, 4096, 1024)
    x = torch.randn(1024, generator=torch.Generator().manual_seed(1))
    g = mlp(128, 1024, 1)
    energy = lambda t: g(t).square().sum()  # noqa: E731
    batch = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    cases = {
        "jacrev n=1024": (
            lambda: adbackends.jacrev(f)(x),
            lambda: adbackends.jacrev(f, chunk_size="auto")(x),
        ),
        "vmap(hessian) 32 x n=128": (
            lambda: adbackends.vmap(adbackends.hessian(energy))(batch),
            lambda: adbackends.vmap(adbackends.hessian(energy), chunk_size="auto")(batch),
        ),
    }
    with adbackends.using("torch.func"):
        for name, (plain, auto) in cases.items():
            unchunked = peak(plain)
            limit = unchunked // 4
            with adbackends.memory_limit(limit):
                adbackends.forget_chunks()
                first = peak(auto)  # the measuring call
                later = peak(auto)
                times = interleaved({"none": plain, "auto": auto}, rounds)
                chosen = [c for c in adbackends.chunk_choices() if c.limit == limit]
            rows.append(
                {
                    "case": name,
                    "unchunked_peak": unchunked,
                    "limit": limit,
                    "first_call_peak": first,
                    "peak": later,
                    "chunk": chosen[0].chunk if chosen else None,
                    "units": chosen[0].units if chosen else None,
                    "time_unchunked": times["none"],
                    "time_limited": times["auto"],
                    "ratio": times["ratio"],
                }
            )
    return rows


def p11b(rounds: int) -> List[Dict[str, Any]]:
    rows = []
    for n in (16, 256):
        f = mlp(n, 4 * n, n)
        x = torch.randn(n, generator=torch.Generator().manual_seed(3))
        with adbackends.using("torch.func"):
            plain_t = adbackends.jacrev(f)
            auto_t = adbackends.jacrev(f, chunk_size="auto")
            variants = {"none": functools.partial(plain_t, x), "auto": functools.partial(auto_t, x)}
            times = interleaved(variants, rounds)
        rows.append(
            {
                "case": f"jacrev n={n}",
                "time_none": times["none"],
                "time_auto": times["auto"],
                "ratio": times["ratio"],
            }
        )
    return rows


def sweep(rounds: int) -> Dict[str, List[Dict[str, Any]]]:
    """Peak and time against the chunk: torch.func's jacrev and a reverse Hessian."""
    import torch.func as tf

    f = mlp(1024, 4096, 1024)
    x = torch.randn(1024, generator=torch.Generator().manual_seed(1))
    g = mlp(512, 2048, 1)
    energy = lambda t: g(t).square().sum()  # noqa: E731
    y = torch.randn(512, generator=torch.Generator().manual_seed(4))
    out: Dict[str, List[Dict[str, Any]]] = {"jacobian": [], "hessian": []}
    for chunk in (1, 4, 16, 64, 256, None):
        jac = lambda c=chunk: tf.jacrev(f, chunk_size=c)(x)  # noqa: E731
        hes = lambda c=chunk: tf.jacrev(tf.jacrev(energy), chunk_size=c)(y)  # noqa: E731
        for name, fn in (("jacobian", jac), ("hessian", hes)):
            seconds = interleaved({"t": fn}, max(3, rounds // 3))["t"]
            out[name].append({"chunk": chunk, "peak": peak(fn), "time": seconds})
    return out


def figure(data: Dict[str, Any]) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, title) in zip(
        axes,
        (
            ("jacobian", "jacrev, n = 1024 (hidden 4096)"),
            ("hessian", "Hessian, n = 512 (hidden 2048)"),
        ),
    ):
        rows = data["sweep"][name]
        chunks = [r["chunk"] or 1024 if name == "jacobian" else r["chunk"] or 512 for r in rows]
        ax.plot(chunks, [r["peak"] / 2**20 for r in rows], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk_size (rows; the last point is unchunked)")
        ax.set_ylabel("peak extra memory (MiB)", color="tab:blue")
        ax.set_title(title)
        twin = ax.twinx()
        twin.plot(chunks, [r["time"] * 1e3 for r in rows], "s--", color="tab:red")
        twin.set_ylabel("time (ms)", color="tab:red")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=100)
    return True


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else 31
    torch.set_num_threads(1)
    data = {
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "P11a": p11a(rounds),
        "P11b": p11b(rounds * 4),
        "sweep": sweep(rounds),
    }
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    drawn = figure(data)
    for row in data["P11a"]:
        print(
            f"P11a {row['case']}: limit {row['limit'] / 2**20:.2f} MiB (unchunked peak "
            f"{row['unchunked_peak'] / 2**20:.2f} MiB), peak {row['peak'] / 2**20:.2f} MiB "
            f"(first call {row['first_call_peak'] / 2**20:.2f}), chunk {row['chunk']} of "
            f"{row['units']}, time ratio {row['ratio']:.3f}"
        )
    for row in data["P11b"]:
        print(f"P11b {row['case']}: auto / None = {row['ratio']:.3f}")
    print("figure:", FIGURE if drawn else "not drawn (matplotlib missing)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
