"""P10: ``auto`` against the fastest built-in backend, over the P5 grid.

``python benchmarks/p10_auto.py [--out FILE]`` times, for every workload and
size of the P5 grid (jacrev, vmap, batched forces, batched Hessians), the
automatic choice and every built-in backend, and reports ``auto / fastest``:
a short interleaved run of all of them finds the fastest built-in backend
that computes the case (smallest median); then auto and that backend alone
are timed in many short interleaved pairs, and the figure is the median over
repeats of the per-repeat ratio. Target: <= 1.1 at every size.

A backend whose median call took more than a second at one size is not timed
at the larger sizes of that workload (it only gets slower and is never the
fastest there); its entry says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from adbackends.bench import compare, median_ratio, workload  # noqa: E402
from benchmarks.suite import GRID  # noqa: E402


def run(repeats: int = 21, min_time: float = 0.01, too_slow: float = 1.0) -> Dict[str, Any]:
    import torch

    import adbackends
    from adbackends.registry import REGISTRY

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = adbackends.get("auto")
        builtins = {
            n: REGISTRY.get(n)
            for n in ("torch.func", "functorch", "loop")
            if REGISTRY.failure(n) is None
        }
    rows: List[Dict[str, Any]] = []
    for name, sizes in GRID.items():
        slow: List[str] = []
        for size in sizes:
            make = workload(name, size)
            fns = {"auto": make(auto)}
            fns.update({b: make(backend) for b, backend in builtins.items() if b not in slow})
            results = {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for b, fn in list(fns.items()):
                    try:
                        results[b] = fn()
                    except Exception as exc:  # a backend that cannot compute the case
                        print(f"{name} {size}: {b} raised {exc!r}")
                        del fns[b]
                # First which built-in backend is fastest (a short run of all),
                # then auto against that one alone, in many short interleaved
                # pairs, so that a shared machine's drift falls on both alike.
                survey = compare(fns, repeats=3, min_time=min_time, warmup=False)
                others = {b: statistics.median(t) for b, t in survey.items() if b != "auto"}
                fastest = min(others, key=others.__getitem__)
                pair = {"auto": fns["auto"], fastest: fns[fastest]}
                times = compare(pair, repeats=repeats, min_time=min_time, warmup=False)
            medians = {b: statistics.median(t) for b, t in times.items()}
            ref = results[fastest]
            row = {
                "workload": name,
                "size": size,
                "auto_is": auto.name,
                "seconds": medians,
                "survey_seconds": others,
                "fastest": fastest,
                "auto_over_fastest": median_ratio(times["auto"], times[fastest]),
                "max_abs_diff": float((results["auto"] - ref).abs().max()),
                "not_timed": list(slow),
            }
            print(
                f"{name:9} {size:5}  auto {medians['auto'] * 1e3:9.3f} ms  "
                f"fastest {fastest} {medians[fastest] * 1e3:9.3f} ms  "
                f"auto/fastest {row['auto_over_fastest']:.3f}  diff {row['max_abs_diff']:.1e}"
                + (f"  (not timed: {', '.join(slow)})" if slow else ""),
                flush=True,
            )
            slow += [b for b, t in others.items() if t > too_slow]
            rows.append(row)
    ratios = [r["auto_over_fastest"] for r in rows]
    return {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "auto": auto.name,
        "repeats": repeats,
        "min_time": min_time,
        "rows": rows,
        "max": max(ratios),
        "geometric_mean": statistics.geometric_mean(ratios),
        "met": all(r <= 1.1 for r in ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the data as JSON here")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--min-time", type=float, default=0.01, help="seconds per sample")
    args = parser.parse_args()
    data = run(repeats=args.repeats, min_time=args.min_time)
    print(
        f"P10 on torch {data['torch']} (auto: {data['auto']}): max {data['max']:.3f}, "
        f"geometric mean {data['geometric_mean']:.3f}, target <= 1.1 "
        f"{'met' if data['met'] else 'MISSED'}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
