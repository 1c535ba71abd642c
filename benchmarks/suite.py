"""The measurements of the full benchmark suite; each part returns plain data.

Every figure is either a ratio of two things timed side by side in the same
run (interleaved, median over repeats of the per-repeat ratios) or, in the
grid, a median time per call with the ratio to the fastest in the same run.
See :func:`adbackends.bench.compare`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from adbackends.bench import compare, dense_problem, geometries, median_ratio, pair_energy

HERE = Path(__file__).resolve().parent
Row = Dict[str, Any]


def _applied(transform: Callable[..., Any], f: Callable[..., Any], x: Any) -> Callable[[], Any]:
    """``transform(f)(x)`` as a callable: the transform is made on every call, as users do."""
    return lambda: transform(f)(x)


def _backends() -> Dict[str, Any]:
    from adbackends.bench import _backends

    return _backends()


def elementwise_problem(n: int) -> Tuple[Callable[[Any], Any], Any]:
    """``f(x) = sin(x) * sum(cos(x))``: a dense Jacobian, but O(n) per backward pass.

    Every operation is elementwise or a sum, so a call is mostly
    per-operation overhead.
    """
    import torch

    x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (lambda t: torch.sin(t) * torch.cos(t).sum()), x


def grad_loop_jacobian(f: Callable[[Any], Any], x: Any) -> Any:
    """A hand-written Jacobian: one ``torch.autograd.grad`` per output element."""
    import torch

    x = x.detach().requires_grad_(True)
    out = f(x).reshape(-1)
    eye = torch.eye(out.numel(), dtype=out.dtype)
    rows = [
        torch.autograd.grad(out, x, grad_outputs=eye[j], retain_graph=True)[0]
        for j in range(out.numel())
    ]
    return torch.stack(rows).reshape(out.shape + x.shape)


def stack_loop_vmap(f: Callable[[Any], Any], xs: Any) -> Any:
    """A hand-written vmap: ``f`` per sample, then ``torch.stack``."""
    import torch

    return torch.stack([f(x) for x in xs.unbind(0)])


def _max_diff(results: Mapping[str, Any]) -> float:
    values = list(results.values())
    return max(float((r - values[0]).abs().max()) for r in values)


# -- P1: dispatch overhead ------------------------------------------------------------


def p1_dispatch(*, repeats: int = 21, min_time: float = 0.1) -> List[Row]:
    """``adbackends.X(f)(x)`` against ``torch.func.X(f)(x)`` for a small ``f``.

    Measured on whatever backend is active (recorded as ``active``); it is
    meant for torch.func, or a chain that runs torch.func first.

    torch.func timed against itself gives ``control_ratio``, the noise floor
    of a whole-call ratio here. Making the transform alone is timed too: the
    registry's whole cost is paid there (the function it returns is
    torch.func's own), so that difference over one call's time resolves the
    overhead far better than the ratio of two whole calls.
    """
    import torch
    import torch.func

    import adbackends

    active = adbackends.current().name
    x = torch.randn(4, dtype=torch.float64)
    xs = torch.randn(16, 4, dtype=torch.float64)

    def f(t: Any) -> Any:
        return t.sin() * t.sum()

    out = []
    for name, ours, theirs, arg in (
        ("jacrev", adbackends.jacrev, torch.func.jacrev, x),
        ("vmap", adbackends.vmap, torch.func.vmap, xs),
    ):
        if not torch.equal(ours(f)(arg), theirs(f)(arg)):
            raise AssertionError(f"adbackends.{name} and torch.func.{name} disagree")
        calls = compare(
            {
                "adbackends": _applied(ours, f, arg),
                "torch.func": _applied(theirs, f, arg),
                "again": _applied(theirs, f, arg),
            },
            repeats=repeats,
            min_time=min_time,
        )
        makes = compare(
            {"adbackends": partial(ours, f), "torch.func": partial(theirs, f)},
            repeats=repeats,
            min_time=min_time,
        )
        call = statistics.median(calls["torch.func"])
        extra = statistics.median(a - b for a, b in zip(makes["adbackends"], makes["torch.func"]))
        out.append(
            {
                "transform": name,
                "active": active,
                "ratio": median_ratio(calls["adbackends"], calls["torch.func"]),
                "control_ratio": median_ratio(calls["again"], calls["torch.func"]),
                "torch_func_call_us": call * 1e6,
                "dispatch_us": extra * 1e6,
                "overhead_ratio": 1.0 + extra / call,
            }
        )
    return out


# -- P2 and P3: the loop backend against hand-written loops ---------------------------


def p2_loop_jacrev(
    sizes: Sequence[int] = (8, 64, 256), *, repeats: int = 9, min_time: float = 0.05
) -> List[Row]:
    """Loop ``jacrev`` / ``autograd.functional.jacobian`` and / a hand-written grad loop."""
    import torch
    from torch.autograd.functional import jacobian

    loop = _backends()["loop"]
    out = []
    for n in sizes:
        f, x = dense_problem(n)
        fns = {
            "loop": _applied(loop.jacrev, f, x),
            "functional": partial(jacobian, f, x, vectorize=False),
            "grad_loop": partial(grad_loop_jacobian, f, x),
        }
        results = {name: fn() for name, fn in fns.items()}
        times = compare(fns, repeats=repeats, min_time=min_time, warmup=False)
        out.append(
            {
                "n": n,
                "loop_ms": statistics.median(times["loop"]) * 1e3,
                "vs_functional": median_ratio(times["loop"], times["functional"]),
                "vs_grad_loop": median_ratio(times["loop"], times["grad_loop"]),
                "max_abs_diff": _max_diff(results),
                "equal": all(torch.equal(r, results["loop"]) for r in results.values()),
            }
        )
    return out


def p3_loop_vmap(
    sizes: Sequence[int] = (8, 64, 256, 1024), *, repeats: int = 9, min_time: float = 0.05
) -> List[Row]:
    """Loop ``vmap`` / a hand-written loop plus ``torch.stack`` (the pair energy)."""
    import torch

    loop = _backends()["loop"]
    out = []
    for b in sizes:
        xs = geometries(b)
        fns = {
            "loop": _applied(loop.vmap, pair_energy, xs),
            "stack_loop": partial(stack_loop_vmap, pair_energy, xs),
        }
        results = {name: fn() for name, fn in fns.items()}
        times = compare(fns, repeats=repeats, min_time=min_time, warmup=False)
        out.append(
            {
                "batch": b,
                "loop_ms": statistics.median(times["loop"]) * 1e3,
                "vs_stack_loop": median_ratio(times["loop"], times["stack_loop"]),
                "equal": torch.equal(results["loop"], results["stack_loop"]),
            }
        )
    return out


# -- P4: cold start -------------------------------------------------------------------

_COLD = {
    "adbackends": "import torch, adbackends; adbackends.jacrev(torch.sin)(torch.ones(3))",
    "torch.func": "import torch, torch.func; torch.func.jacrev(torch.sin)(torch.ones(3))",
    "adbackends vmap": "import torch, adbackends; adbackends.vmap(torch.sin)(torch.ones(2, 3))",
    "torch.func vmap": "import torch, torch.func; torch.func.vmap(torch.sin)(torch.ones(2, 3))",
    "import torch": "import torch",
}


def _child_env() -> Dict[str, str]:
    """The environment of child interpreters: no backend named by the caller's shell."""
    env = dict(os.environ)
    env.pop("TAD_AD_BACKEND", None)
    return env


def _child_json(args: Sequence[str], env: Mapping[str, str]) -> Any:
    proc = subprocess.run(
        [sys.executable, *args], env=dict(env), check=True, capture_output=True, text=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def p4_cold_start(pairs: int = 10, runs: int = 5) -> Row:
    """A fresh ``python -c`` importing and taking one Jacobian, with and without adbackends.

    The scripts alternate (forward, then backward order); each ratio is the
    median of the per-round ratios. A program whose first transform is a
    ``vmap`` is timed the same way, and ``import torch`` alone shows how much
    of a cold start is torch's own. Whole-process ratios are noisy, so
    adbackends' own cost is also measured inside one process (``own_cost_ms``,
    median of ``runs``), after torch has done its first-use work, together
    with where a cold start's time goes (``stages_ms``).
    """
    env = _child_env()
    times: Dict[str, List[float]] = {name: [] for name in _COLD}
    names = list(_COLD)
    for _ in range(min(pairs, 2)):  # warm the file cache first
        subprocess.run([sys.executable, "-c", _COLD["adbackends"]], env=env, check=True)
    for rep in range(pairs):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", _COLD[name]], env=env, check=True)
            times[name].append(time.perf_counter() - start)
    child = str(HERE / "cold_child.py")
    own = statistics.median(_child_json([child, "own"], env) * 1e3 for _ in range(runs))
    stages: Dict[str, Dict[str, List[float]]] = {"adbackends": {}, "torch.func": {}}
    for _ in range(runs):
        for which, into in stages.items():
            for key, value in _child_json([child, "stages", which], env).items():
                into.setdefault(key, []).append(value * 1e3)
    return {
        "pairs": pairs,
        "adbackends_s": statistics.median(times["adbackends"]),
        "torch_func_s": statistics.median(times["torch.func"]),
        "import_torch_s": statistics.median(times["import torch"]),
        "ratio": median_ratio(times["adbackends"], times["torch.func"]),
        "adbackends_vmap_s": statistics.median(times["adbackends vmap"]),
        "torch_func_vmap_s": statistics.median(times["torch.func vmap"]),
        "vmap_ratio": median_ratio(times["adbackends vmap"], times["torch.func vmap"]),
        "own_cost_ms": own,
        "own_cost_ratio": 1.0 + own / 1e3 / statistics.median(times["torch.func"]),
        "stages_ms": {
            which: {key: statistics.median(vals) for key, vals in into.items()}
            for which, into in stages.items()
        },
    }


# -- P5: every backend, every workload, over sizes -------------------------------------

#: The sizes of the grid: ``n`` for jacrev, the batch for the others.
GRID: Dict[str, Tuple[int, ...]] = {
    "jacrev": (8, 64, 256, 1024),
    "vmap": (8, 64, 256, 1024),
    "forces": (4, 16, 64, 256),
    "hessians": (4, 16, 64, 256),
}


def p5_grid(
    sizes: Mapping[str, Sequence[int]] = GRID,
    *,
    repeats: int = 5,
    min_time: float = 0.02,
    too_slow: float = 1.0,
) -> List[Row]:
    """Every backend that loads, on every workload, at each size.

    A backend whose median call took more than ``too_slow`` seconds at one
    size is not timed at the larger sizes of that workload (listed under
    ``skipped``): its times only grow, and the suite should end in minutes.
    """
    from adbackends.bench import time_backends

    backends = _backends()
    rows = []
    for name, values in sizes.items():
        slow: List[str] = []
        for size in values:
            todo = {b: backend for b, backend in backends.items() if b not in slow}
            row = time_backends(name, size, backends=todo, repeats=repeats, min_time=min_time)
            row["backends"] = list(backends)
            row["skipped"] = list(slow)
            slow += [b for b, t in row["seconds"].items() if t > too_slow]
            rows.append(row)
    return rows


# -- P6: peak memory ------------------------------------------------------------------


def p6_memory(
    m: int = 4096,
    n: int = 256,
    chunks: Sequence[Optional[int]] = (None, 256),
    names: Optional[Sequence[str]] = None,
) -> List[Row]:
    """Peak extra memory of one ``jacrev`` with ``m`` outputs, per backend and chunk size.

    Each case runs in a fresh interpreter (Linux only, see ``memory_child.py``):
    the figure is the peak resident set during the Jacobian minus the resident
    set just before. ``names`` limits the backends (default: all that load).
    """
    env = _child_env()
    out = []
    for name in names if names is not None else list(_backends()):
        for chunk in chunks:
            args = [name, str(m), str(n), "none" if chunk is None else str(chunk)]
            proc = subprocess.run(
                [sys.executable, str(HERE / "memory_child.py"), *args],
                env=env,
                capture_output=True,
                text=True,
            )
            row: Row = {"backend": name, "chunk_size": chunk, "m": m, "n": n}
            if proc.returncode != 0:
                row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            else:
                data = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(
                    peak_mib=data["peak_bytes"] / 2**20,
                    result_mib=data["result_bytes"] / 2**20,
                    peak_over_result=data["peak_bytes"] / data["result_bytes"],
                )
            out.append(row)
    return out


# -- S: a size-aware strategy ---------------------------------------------------------


def strategy(
    sizes: Sequence[int] = (4, 8, 16, 32, 64, 128, 256, 512),
    kinds: Sequence[str] = ("elementwise", "dense"),
    *,
    repeats: int = 7,
    min_time: float = 0.05,
) -> List[Row]:
    """A plain ``autograd.grad`` loop and the loop backend against ``torch.func.jacrev``.

    For each kind of problem and ``n``: both times over torch.func's, and
    whether the three Jacobians are bitwise equal (else the largest gap).
    """
    import torch
    import torch.func

    loop = _backends()["loop"]
    out = []
    for kind in kinds:
        for n in sizes:
            f, x = elementwise_problem(n) if kind == "elementwise" else dense_problem(n)
            fns = {
                "torch.func": _applied(torch.func.jacrev, f, x),
                "grad_loop": partial(grad_loop_jacobian, f, x),
                "loop": _applied(loop.jacrev, f, x),
            }
            results = {name: fn() for name, fn in fns.items()}
            times = compare(fns, repeats=repeats, min_time=min_time, warmup=False)
            ref = results["torch.func"]
            out.append(
                {
                    "kind": kind,
                    "n": n,
                    "torch_func_ms": statistics.median(times["torch.func"]) * 1e3,
                    "grad_loop_vs_torch_func": median_ratio(
                        times["grad_loop"], times["torch.func"]
                    ),
                    "loop_vs_torch_func": median_ratio(times["loop"], times["torch.func"]),
                    "bitwise_equal": all(torch.equal(ref, r) for r in results.values()),
                    "max_abs_diff": _max_diff(results),
                }
            )
    return out


# -- the parts, full and quick ----------------------------------------------------------

#: Every part, in the order it runs.
PARTS: Tuple[str, ...] = ("P1", "P2", "P3", "P4", "P5", "P6", "S")
#: What ``--quick`` runs unless parts are named: the parts that start no interpreter.
QUICK_PARTS: Tuple[str, ...] = ("P1", "P2", "P3", "P5", "S")


def steps(quick: bool = False) -> Dict[str, Callable[[], Any]]:
    """Each part as a callable with no arguments; ``quick``: tiny sizes, one repeat."""
    if not quick:
        return {
            "P1": p1_dispatch,
            "P2": p2_loop_jacrev,
            "P3": p3_loop_vmap,
            "P4": p4_cold_start,
            "P5": p5_grid,
            "P6": p6_memory,
            "S": strategy,
        }
    fast = {"repeats": 1, "min_time": 0.0}
    return {
        "P1": partial(p1_dispatch, **fast),
        "P2": partial(p2_loop_jacrev, (3, 6), **fast),
        "P3": partial(p3_loop_vmap, (2, 4), **fast),
        "P4": partial(p4_cold_start, pairs=1, runs=1),
        "P5": partial(p5_grid, {name: (2, 3) for name in GRID}, **fast),
        "P6": partial(p6_memory, m=16, n=4, chunks=(None, 4)),
        "S": partial(strategy, (2, 4), **fast),
    }
