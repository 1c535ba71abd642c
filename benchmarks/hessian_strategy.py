"""Which Hessian strategy should the torch.func backend use by default?

``python benchmarks/hessian_strategy.py [--sizes 8,32,128,256] [--repeats 15]``

Compares, on one CPU thread in float64, ``torch.func.hessian`` (forward over
reverse: ``jacfwd(jacrev(f))``) with ``torch.func.jacrev(torch.func.jacrev(f))``
(reverse over reverse) for ``f(x) = (tanh(W @ x) ** 2).sum()`` with ``W`` of
shape ``n x n``. The two are timed interleaved (one call of each per round,
alternating which goes first) and the ratio ``reverse / forward`` is taken per
round; the table gives the median time of each and the median of the ratios,
which is robust to the machine's load drifting during the run.

Prints a table and, with ``--json PATH``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable, Dict, List


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(n: int, repeats: int) -> Dict[str, float]:
    import torch
    import torch.func as tf

    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=gen, dtype=torch.float64)

    def f(v: Any) -> Any:
        return (torch.tanh(w @ v) ** 2).sum()

    forward = tf.hessian(f)
    reverse = tf.jacrev(tf.jacrev(f))
    if not torch.allclose(forward(x), reverse(x), rtol=1e-10, atol=1e-12):
        raise AssertionError(f"n={n}: the two strategies disagree")
    for _ in range(2):  # warm up both
        forward(x)
        reverse(x)
    t_fwd: List[float] = []
    t_rev: List[float] = []
    ratios: List[float] = []
    for k in range(repeats):
        if k % 2:
            a = _time(lambda: forward(x))
            b = _time(lambda: reverse(x))
        else:
            b = _time(lambda: reverse(x))
            a = _time(lambda: forward(x))
        t_fwd.append(a)
        t_rev.append(b)
        ratios.append(b / a)
    return {
        "n": n,
        "forward_s": statistics.median(t_fwd),
        "reverse_s": statistics.median(t_rev),
        "reverse_over_forward": statistics.median(ratios),
    }


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,128,256")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    rows = [measure(int(n), args.repeats) for n in args.sizes.split(",")]
    print(f"torch {torch.__version__}, 1 thread, float64, f = (tanh(W @ x) ** 2).sum()")
    print(f"{'n':>5} {'hessian (fwd-over-rev)':>24} {'jacrev(jacrev)':>16} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['n']:>5} {r['forward_s'] * 1e3:>21.3f} ms {r['reverse_s'] * 1e3:>13.3f} ms "
            f"{r['reverse_over_forward']:>6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": str(torch.__version__), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
