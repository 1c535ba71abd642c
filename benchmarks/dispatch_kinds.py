"""P1 by kind of callable: ``adbackends.X(f)(x)`` / ``torch.func.X(f)(x)`` under ``auto``.

``python benchmarks/dispatch_kinds.py [--runs 10] [--rst FILE]``

For ``jacrev``, ``vmap``, ``grad``, ``vjp`` and ``jvp``, with four kinds of
callable: a builtin (``torch.sin``, ``torch.sum``), a lambda written in the
call (made anew on every call, as in tutorials), a ``def`` function, and a
closure over ``torch.func.functional_call`` of an ``nn.Module``. The
transform is made on every call, as users write it.

Each run times the three callables interleaved (adbackends, torch.func,
torch.func again as the A/A control), in blocks of calls, over repeats; its
ratio is the median of the per-repeat ratios. The target (<= 1.02) holds in
every run, so every run's ratio is kept and the worst is reported beside the
median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple


def cases(module: Any) -> Dict[Tuple[str, str], Callable[[], Any]]:
    """Every (transform, kind) case, calling ``module``'s transforms (adbackends or torch.func)."""
    import torch
    import torch.func as tf

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    xs = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    v = torch.randn(4, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(4, 4, dtype=torch.float64)
    with torch.no_grad():  # the same weights for both modules' cases
        model.weight.copy_(torch.randn(4, 4, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    params = dict(model.named_parameters())

    def f(t: Any) -> Any:
        return t.sin() * t.sum()

    def f_scalar(t: Any) -> Any:
        return (t.sin() * t.sum()).sum()

    def call(t: Any) -> Any:
        return tf.functional_call(model, params, (t,))

    def call_scalar(t: Any) -> Any:
        return tf.functional_call(model, params, (t,)).sum()

    m = module
    return {
        ("jacrev", "builtin"): lambda: m.jacrev(torch.sin)(x),
        ("jacrev", "lambda"): lambda: m.jacrev(lambda t: t.sin() * t.sum())(x),
        ("jacrev", "def"): lambda: m.jacrev(f)(x),
        ("jacrev", "functional_call"): lambda: m.jacrev(call)(x),
        ("vmap", "builtin"): lambda: m.vmap(torch.sin)(xs),
        ("vmap", "lambda"): lambda: m.vmap(lambda t: t.sin() * t.sum())(xs),
        ("vmap", "def"): lambda: m.vmap(f)(xs),
        ("vmap", "functional_call"): lambda: m.vmap(call)(xs),
        ("grad", "builtin"): lambda: m.grad(torch.sum)(x),
        ("grad", "lambda"): lambda: m.grad(lambda t: (t.sin() * t.sum()).sum())(x),
        ("grad", "def"): lambda: m.grad(f_scalar)(x),
        ("grad", "functional_call"): lambda: m.grad(call_scalar)(x),
        ("vjp", "builtin"): lambda: m.vjp(torch.sin, x)[1](v),
        ("vjp", "lambda"): lambda: m.vjp(lambda t: t.sin() * t.sum(), x)[1](v),
        ("vjp", "def"): lambda: m.vjp(f, x)[1](v),
        ("vjp", "functional_call"): lambda: m.vjp(call, x)[1](v),
        ("jvp", "builtin"): lambda: m.jvp(torch.sin, (x,), (v,)),
        ("jvp", "lambda"): lambda: m.jvp(lambda t: t.sin() * t.sum(), (x,), (v,)),
        ("jvp", "def"): lambda: m.jvp(f, (x,), (v,)),
        ("jvp", "functional_call"): lambda: m.jvp(call, (x,), (v,)),
    }


def _block(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _same(a: Any, b: Any) -> bool:
    import torch
    from torch.utils._pytree import tree_flatten

    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(torch.allclose(p, q) for p, q in zip(la, lb))


def run(runs: int = 10, repeats: int = 11, calls: int = 40) -> List[Dict[str, Any]]:
    import torch
    import torch.func

    import adbackends

    torch.set_num_threads(1)
    ours, theirs = cases(adbackends), cases(torch.func)
    active = adbackends.current().name
    rows = []
    for key in ours:
        a, b = ours[key], theirs[key]
        if not _same(a(), b()):
            raise AssertionError(f"adbackends and torch.func disagree on {key}")
        for _ in range(10):  # warm-up: caches, allocator
            a(), b()
        ratios, controls = [], []
        for _ in range(runs):
            per, ctl = [], []
            for _ in range(repeats):
                ta, tb, tc = _block(a, calls), _block(b, calls), _block(b, calls)
                per.append(ta / tb)
                ctl.append(tc / tb)
            ratios.append(statistics.median(per))
            controls.append(statistics.median(ctl))
        rows.append(
            {
                "transform": key[0],
                "kind": key[1],
                "active": active,
                "ratios": ratios,
                "max": max(ratios),
                "median": statistics.median(ratios),
                "control": statistics.median(controls),
                "torch_func_us": _block(b, calls) * 1e6,
            }
        )
        print(
            f"{key[0]:7} {key[1]:16} median {rows[-1]['median']:.3f}  worst {max(ratios):.3f}"
            f"  A/A {rows[-1]['control']:.3f}  torch.func {rows[-1]['torch_func_us']:.0f} us",
            flush=True,
        )
    return rows


def rst(rows: List[Dict[str, Any]], target: float = 1.02) -> str:
    lines = [
        f".. list-table:: P1 by kind of callable (target <= {target} in every run), "
        f"auto: {rows[0]['active']}",
        "   :header-rows: 1",
        "",
        "   * - transform",
        "     - callable",
        "     - median of runs",
        "     - worst run",
        "     - A/A control",
        "     - torch.func call",
        "     - met in every run",
    ]
    for r in rows:
        met = "yes" if r["max"] <= target else f"no ({sum(x > target for x in r['ratios'])} runs)"
        lines += [
            f"   * - ``{r['transform']}``",
            f"     - {r['kind']}",
            f"     - {r['median']:.3f}",
            f"     - {r['max']:.3f}",
            f"     - {r['control']:.3f}",
            f"     - {r['torch_func_us']:.0f} µs",
            f"     - {met}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--rst", help="write the table as reStructuredText to this file")
    args = parser.parse_args()
    rows = run(args.runs, args.repeats)
    if args.rst:
        with open(args.rst, "w", encoding="utf-8") as handle:
            handle.write(rst(rows))


if __name__ == "__main__":
    main()
