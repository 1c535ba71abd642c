"""The transform family's targets: ``python benchmarks/family.py [--quick]``.

Every figure is a ratio of two things timed side by side in one run
(interleaved, median over repeats of the per-repeat ratios; see
:func:`adbackends.bench.compare`), single-threaded, in float64, on
``f(x) = sum(tanh(W x) ** 2)`` (or ``tanh(W x) ** 2``, its vector version,
for the transforms of vector functions).

P8a
    Each public transform under ``auto`` / torch.func's own, built and called
    on every call as users do: at most 1.02.
P8b
    The loop backend's ``hessian`` / ``torch.autograd.functional.hessian``:
    at most 0.9.
P8c
    The loop backend's ``jvp`` / ``torch.autograd.functional.jvp``: at most 1.0.
P8d
    ``adbackends.hessian`` under ``auto`` / the faster (per repeat) of
    ``torch.func.hessian`` and ``torch.func.jacrev(torch.func.jacrev(f))``:
    at most 1.1.

Prints a table with each target met or missed and writes the results to
``benchmarks/family_results.json``. ``--quick`` runs few, short repeats: it
checks that everything works, the figures mean little.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "family_results.json"

#: Target per part: the ratio must be at most this.
TARGETS: Dict[str, float] = {"P8a": 1.02, "P8b": 0.9, "P8c": 1.0, "P8d": 1.1}
DISPATCH_N = 64
HESSIAN_SIZES = (8, 64, 256)
JVP_SIZES = (8, 64, 256)
AUTO_HESSIAN_SIZES = (8, 32, 64, 128, 256)

Row = Dict[str, Any]


def problem(n: int) -> Tuple[Callable[[Any], Any], Callable[[Any], Any], Any, Any]:
    """``(f, g, x, v)``: the scalar function, its vector version, a point, a direction."""
    import torch

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)

    def f(t: Any) -> Any:
        return (torch.tanh(w @ t) ** 2).sum()

    def g(t: Any) -> Any:
        return torch.tanh(w @ t) ** 2

    return f, g, x, v


def _ratio(
    fns: Dict[str, Callable[[], Any]],
    mine: str,
    theirs: Sequence[str],
    repeats: int,
    min_time: float,
) -> Tuple[float, Dict[str, float]]:
    """``mine`` over the fastest of ``theirs``, per repeat; the median; and median times."""
    from adbackends.bench import compare

    times = compare(fns, repeats=repeats, min_time=min_time)
    ratios = [
        times[mine][r] / min(times[name][r] for name in theirs) for r in range(len(times[mine]))
    ]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return statistics.median(ratios), medians


def _row(part: str, case: str, ratio: float, medians: Dict[str, float], mine: str) -> Row:
    return {
        "part": part,
        "case": case,
        "ratio": ratio,
        "target": TARGETS[part],
        "met": ratio <= TARGETS[part],
        "time_s": medians[mine],
        "times_s": medians,
    }


def _check(a: Any, b: Any, what: str) -> None:
    """The two sides compute the same thing (a benchmark of a wrong result means nothing)."""
    import torch
    from torch.utils._pytree import tree_flatten

    flat_a, flat_b = tree_flatten(a)[0], tree_flatten(b)[0]
    tensors = [(x, y) for x, y in zip(flat_a, flat_b) if isinstance(x, torch.Tensor)]
    if len(flat_a) != len(flat_b) or not all(
        torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in tensors
    ):
        raise AssertionError(f"{what}: the two sides differ")


def p8a(repeats: int, min_time: float) -> List[Row]:
    """Dispatch: each public transform under auto / torch.func's own."""
    import torch.func as tf

    import adbackends as ad

    f, g, x, v = problem(DISPATCH_N)
    ct = v

    def vjp_of(vjp: Any) -> Callable[[], Any]:
        def call() -> Any:
            out, fn = vjp(g, x)
            return out, fn(ct)

        return call

    def linearize_of(linearize: Any) -> Callable[[], Any]:
        def call() -> Any:
            out, fn = linearize(g, x)
            return out, fn(v)

        return call

    cases: Dict[str, Tuple[Callable[[], Any], Callable[[], Any]]] = {
        "grad": (lambda: ad.grad(f)(x), lambda: tf.grad(f)(x)),
        "grad_and_value": (lambda: ad.grad_and_value(f)(x), lambda: tf.grad_and_value(f)(x)),
        "vjp": (vjp_of(ad.vjp), vjp_of(tf.vjp)),
        "jvp": (lambda: ad.jvp(g, (x,), (v,)), lambda: tf.jvp(g, (x,), (v,))),
        "jacfwd": (lambda: ad.jacfwd(g)(x), lambda: tf.jacfwd(g)(x)),
        "hessian": (lambda: ad.hessian(f)(x), lambda: tf.hessian(f)(x)),
        "linearize": (linearize_of(ad.linearize), linearize_of(tf.linearize)),
    }
    rows = []
    for name, (mine, theirs) in cases.items():
        _check(mine(), theirs(), f"P8a {name}")
        ratio, medians = _ratio(
            {"auto": mine, "torch.func": theirs}, "auto", ["torch.func"], repeats, min_time
        )
        rows.append(_row("P8a", f"{name} n={DISPATCH_N}", ratio, medians, "auto"))
    return rows


def p8b(repeats: int, min_time: float, sizes: Sequence[int]) -> List[Row]:
    """The loop hessian / torch.autograd.functional.hessian."""
    import torch.autograd.functional as taf

    import adbackends as ad

    loop = ad.get("loop")
    rows = []
    for n in sizes:
        f, _, x, _ = problem(n)
        mine = lambda f=f, x=x: loop.hessian(f)(x)  # noqa: E731
        theirs = lambda f=f, x=x: taf.hessian(f, x)  # noqa: E731
        _check(mine(), theirs(), f"P8b n={n}")
        ratio, medians = _ratio(
            {"loop": mine, "autograd.functional": theirs},
            "loop",
            ["autograd.functional"],
            repeats,
            min_time,
        )
        rows.append(_row("P8b", f"hessian n={n}", ratio, medians, "loop"))
    return rows


def p8c(repeats: int, min_time: float, sizes: Sequence[int]) -> List[Row]:
    """The loop jvp / torch.autograd.functional.jvp."""
    import torch.autograd.functional as taf

    import adbackends as ad

    loop = ad.get("loop")
    rows = []
    for n in sizes:
        _, g, x, v = problem(n)
        mine = lambda g=g, x=x, v=v: loop.jvp(g, (x,), (v,))  # noqa: E731
        theirs = lambda g=g, x=x, v=v: taf.jvp(g, x, v)  # noqa: E731
        _check(mine(), theirs(), f"P8c n={n}")
        ratio, medians = _ratio(
            {"loop": mine, "autograd.functional": theirs},
            "loop",
            ["autograd.functional"],
            repeats,
            min_time,
        )
        rows.append(_row("P8c", f"jvp n={n}", ratio, medians, "loop"))
    return rows


def p8d(repeats: int, min_time: float, sizes: Sequence[int]) -> List[Row]:
    """adbackends.hessian under auto / the faster of torch.func's two Hessians."""
    import torch.func as tf

    import adbackends as ad

    rows = []
    for n in sizes:
        f, _, x, _ = problem(n)
        fns = {
            "auto": lambda f=f, x=x: ad.hessian(f)(x),
            "torch.func.hessian": lambda f=f, x=x: tf.hessian(f)(x),
            "jacrev(jacrev)": lambda f=f, x=x: tf.jacrev(tf.jacrev(f))(x),
        }
        _check(fns["auto"](), fns["torch.func.hessian"](), f"P8d n={n}")
        ratio, medians = _ratio(
            fns, "auto", ["torch.func.hessian", "jacrev(jacrev)"], repeats, min_time
        )
        rows.append(_row("P8d", f"hessian n={n}", ratio, medians, "auto"))
    return rows


def run(quick: bool = False) -> Dict[str, Any]:
    """Every part; plain data."""
    import torch

    import adbackends as ad

    torch.set_num_threads(1)
    repeats, min_time = (3, 0.01) if quick else (15, 0.05)
    rows: List[Row] = []
    rows += p8a(repeats, min_time)
    rows += p8b(repeats, min_time, HESSIAN_SIZES)
    rows += p8c(repeats, min_time, JVP_SIZES)
    rows += p8d(repeats, min_time, AUTO_HESSIAN_SIZES)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "repeats": repeats,
        "min_time_s": min_time,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "adbackends": ad.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
        "auto": ad.current().name,
        "targets": TARGETS,
        "rows": rows,
    }


def format_table(data: Dict[str, Any]) -> str:
    """The rows as a plain-text table."""
    header = ("part", "case", "ratio", "target", "", "time")
    lines = [
        (
            r["part"],
            r["case"],
            f"{r['ratio']:.3f}",
            f"<= {r['target']:g}",
            "met" if r["met"] else "MISSED",
            f"{r['time_s'] * 1e6:.1f} us",
        )
        for r in data["rows"]
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    met = sum(r["met"] for r in data["rows"])
    out.append(f"{met}/{len(data['rows'])} met (auto is {data['auto']})")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/family.py", description="Time the transform family's targets."
    )
    parser.add_argument("--quick", action="store_true", help="few short repeats: checks only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    data = run(quick=args.quick)
    print(format_table(data))
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
