"""Benchmarks: what each backend costs here, measured side by side.

``python -m adbackends bench`` runs a short version (seconds; up to about half
a minute on a busy machine): every backend that loads here times ``jacrev``
and ``vmap`` on a small and a large problem, and the table marks the fastest.
``--json`` prints it as JSON. The environment variable
``ADBACKENDS_BENCH_TINY`` (or ``--tiny`` here) asks for a minimal run that
only checks that everything works.

``python -m adbackends.bench --full`` runs the whole suite (minutes);
``--only P1,P4`` picks parts, ``--threads N`` calls ``torch.set_num_threads``
first, ``--save FILE`` also writes the JSON:

P1
    dispatch overhead: ``adbackends.jacrev(f)(x)`` / ``torch.func.jacrev(f)(x)``
    and the same for ``vmap``, for a small ``f``;
P2
    the loop backend's ``jacrev`` / ``torch.autograd.functional.jacobian``
    (``vectorize=False``) and / a hand-written ``torch.autograd.grad`` loop;
P3
    the loop backend's ``vmap`` / a hand-written loop plus ``torch.stack``;
P4
    cold start: a fresh interpreter that imports and takes one Jacobian, with
    adbackends / with plain torch.func;
P5
    every backend's ``jacrev`` and ``vmap`` over a grid of sizes, fastest marked;
P6
    peak memory of ``jacrev`` for 4096 outputs, per backend and ``chunk_size``;
S
    the size-aware strategy question: a plain ``autograd.grad`` loop against
    ``torch.func.jacrev`` across sizes, with a check that the results agree.

Every figure is a ratio of two things measured in the same run, interleaved
(A, B, B, A, ...) and summarised by the median over repeats, because absolute
times drift on shared machines. Nothing here asserts on a time.

Examples
--------
>>> from adbackends.bench import compare
>>> times = compare({"a": lambda: None, "b": lambda: None}, repeats=3, min_time=1e-4)
>>> sorted(times)
['a', 'b']
>>> len(times["a"])
3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "EXACT_RTOL",
    "PARTS",
    "TINY_ENV",
    "cli_bench",
    "compare",
    "full",
    "grad_loop_jacobian",
    "grid",
    "jac_problem",
    "main",
    "median_ratio",
    "p1_dispatch",
    "p2_loop_jacrev",
    "p3_loop_vmap",
    "p4_cold_start",
    "p6_memory",
    "quick",
    "stack_loop_vmap",
    "strategy",
    "vmap_problem",
]

#: Set this environment variable to a non-empty value for a minimal run
#: (tiny sizes, one repeat): it checks that the benchmark works, not speed.
TINY_ENV = "ADBACKENDS_BENCH_TINY"

Table = Dict[str, Any]


# -- timing ---------------------------------------------------------------------


def _calibrate(fn: Callable[[], Any], min_time: float, warmup: bool = True) -> int:
    """How many calls of ``fn`` take at least ``min_time`` seconds together."""
    if warmup:  # first-call costs (imports, probes, caches) are not measured
        fn()
    number = 1
    while True:
        elapsed = _run(fn, number)
        if elapsed >= min_time or number >= 1 << 20:
            return number
        number = max(number * 2, int(number * min_time / max(elapsed, 1e-9) * 1.2))


def _run(fn: Callable[[], Any], number: int) -> float:
    """Seconds for ``number`` calls of ``fn``, with the garbage collector off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def compare(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    min_time: float = 0.05,
    warmup: bool = True,
) -> Dict[str, List[float]]:
    """Time several callables side by side; seconds per call, one per repeat.

    Each callable is calibrated once (so that one sample lasts at least
    ``min_time``), then every repeat times each of them once, in an order
    that rotates and reverses from repeat to repeat, so that drift in the
    machine's speed falls on all of them alike.

    Parameters
    ----------
    fns : dict of str to callable
        The things to time, each called with no arguments.
    repeats : int
        Samples per callable.
    min_time : float
        Seconds one sample should last at least.
    warmup : bool
        Call each callable once before timing it; pass ``False`` when the
        caller has already done so.

    Returns
    -------
    dict of str to list of float
        Per name, the seconds per call of each repeat, in repeat order.
    """
    names = list(fns)
    numbers = {name: _calibrate(fns[name], min_time, warmup) for name in names}
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(repeats):
        # Rotate each repeat and reverse every other round: for two
        # callables, A B, B A, B A, A B, ...
        shift = rep % len(names)
        order = names[shift:] + names[:shift]
        if (rep // len(names)) % 2:
            order.reverse()
        for name in order:
            times[name].append(_run(fns[name], numbers[name]) / numbers[name])
    return times


def _applied(transform: Callable[..., Any], f: Callable[..., Any], x: Any) -> Callable[[], Any]:
    """``transform(f)(x)`` as a callable: the transform is made on every call, as users do."""

    def run() -> Any:
        return transform(f)(x)

    return run


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over repeats of ``a[i] / b[i]`` (samples taken side by side)."""
    return statistics.median(x / y for x, y in zip(a, b))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide functorch's deprecation notice while timing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# -- problems -----------------------------------------------------------------


def jac_problem(
    n: int, m: Optional[int] = None, kind: str = "dense"
) -> Tuple[Callable[[Any], Any], Any]:
    """A Jacobian problem with input ``x`` of size ``n`` (float64, fixed seed).

    ``kind="dense"``: ``f(x) = tanh(W x) * sum(x**2)`` with ``W`` of shape
    ``m x n`` (``m = n`` by default); the Jacobian is dense and one backward
    pass costs about one forward pass, ``O(m n)``.

    ``kind="elementwise"``: ``f(x) = sin(x) * sum(cos(x))``; the Jacobian is
    dense too, but every operation is elementwise or a sum, so one backward
    pass costs ``O(n)`` and a call is dominated by per-operation overhead.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "elementwise":

        def g(t: Any) -> Any:
            return torch.sin(t) * torch.cos(t).sum()

        return g, x
    if kind != "dense":
        raise ValueError(f"unknown problem kind {kind!r}")
    w = torch.randn(m or n, n, generator=gen, dtype=torch.float64) / n**0.5

    def f(t: Any) -> Any:
        return torch.tanh(w @ t) * (t * t).sum()

    return f, x


def vmap_problem(batch: int, atoms: int = 8) -> Tuple[Callable[[Any], Any], Any]:
    """A per-sample energy, batched: pairwise ``1/sqrt(1 + r**2)`` over ``atoms`` points.

    ``f`` maps one ``(atoms, 3)`` geometry to a scalar, like the pair
    potentials of dispersion corrections; the input is ``(batch, atoms, 3)``.
    """
    import torch

    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(batch, atoms, 3, generator=gen, dtype=torch.float64)

    def f(pos: Any) -> Any:
        diff = pos.unsqueeze(0) - pos.unsqueeze(1)
        return (diff * diff).sum(-1).add(1.0).rsqrt().sum()

    return f, xs


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
    """A hand-written vmap: call ``f`` per sample and ``torch.stack`` the results."""
    import torch

    return torch.stack([f(x) for x in xs.unbind(0)])


# -- environment --------------------------------------------------------------


def _machine() -> Dict[str, Any]:
    import torch

    from . import __version__

    return {
        "adbackends": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _backends() -> Dict[str, Any]:
    """Every backend that loads here, by name, in automatic order."""
    from .registry import REGISTRY

    with _quiet():
        return {name: REGISTRY.get(name) for name in REGISTRY.available()}


def _agree(results: Dict[str, Any]) -> Dict[str, float]:
    """Largest absolute difference of each result from the first one."""
    names = list(results)
    ref = results[names[0]]
    return {name: float((results[name] - ref).abs().max()) for name in names}


#: A backend whose result differs from the first backend's by more than this
#: (relative to the result's largest entry) computes something else, such as
#: a finite-difference approximation, and is never marked fastest.
EXACT_RTOL = 1e-12


# -- P5 and the short run: every backend over sizes -------------------------------


def grid(
    jac_sizes: Sequence[int],
    vmap_sizes: Sequence[int],
    *,
    repeats: int = 5,
    min_time: float = 0.02,
) -> List[Dict[str, Any]]:
    """Every backend's ``jacrev`` and ``vmap`` at each size (P5).

    Returns one row per (transform, size): seconds per call for each backend
    (median over repeats), each backend's time relative to the fastest, the
    fastest's name, and each backend's largest deviation from the first
    backend's result (a check that they all compute the same thing). A
    backend that raises is left out of the row and listed under ``errors``.
    """
    backends = _backends()
    rows: List[Dict[str, Any]] = []
    cases: List[Tuple[str, int]] = [("jacrev", n) for n in jac_sizes]
    cases += [("vmap", n) for n in vmap_sizes]
    for transform, size in cases:
        if transform == "jacrev":
            f, x = jac_problem(size)
        else:
            f, x = vmap_problem(size)
        fns: Dict[str, Callable[[], Any]] = {}
        results: Dict[str, Any] = {}
        errors: Dict[str, str] = {}
        for name, backend in backends.items():
            run = _applied(getattr(backend, transform), f, x)
            try:
                with _quiet():
                    results[name] = run()
            except Exception as exc:  # a backend that cannot run this is reported, not fatal
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            fns[name] = run
        with _quiet():
            times = compare(fns, repeats=repeats, min_time=min_time, warmup=False)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        diffs = _agree(results)
        scale = float(next(iter(results.values())).abs().max()) or 1.0
        exact = [name for name in medians if diffs[name] <= EXACT_RTOL * scale]
        best = min(exact, key=medians.__getitem__)
        rows.append(
            {
                "transform": transform,
                "size": size,
                "seconds": medians,
                "relative": {name: medians[name] / medians[best] for name in medians},
                "fastest": best,
                "max_abs_diff": diffs,
                "inexact": [name for name in medians if name not in exact],
                "errors": errors,
                "backends": list(backends),
            }
        )
    return rows


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _format_grid(rows: List[Dict[str, Any]], label: Dict[str, str]) -> str:
    names = rows[0]["backends"] if rows else []
    width = max([len(n) for n in names] + [16])
    head = f"{'transform':<10} {'size':>7}  " + "  ".join(f"{n:>{width}}" for n in names)
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = []
        for name in names:
            if name not in row["seconds"]:
                cells.append(f"{'failed':>{width}}")
                continue
            if name == row["fastest"]:
                mark = "  *  "
            else:
                mark = f" x{row['relative'][name]:<3.2g}"
                if name in row["inexact"]:
                    mark = mark.replace(" x", "~x")
            cells.append(f"{_fmt_time(row['seconds'][name]) + mark:>{width}}")
        size = f"{label.get(row['transform'], '')}{row['size']}"
        lines.append(f"{row['transform']:<10} {size:>7}  " + "  ".join(cells))
    for row in rows:
        for name, why in row["errors"].items():
            lines.append(f"{name} failed at {row['transform']} {row['size']}: {why}")
    return "\n".join(lines)


def quick(tiny: bool = False) -> Table:
    """The short run behind ``python -m adbackends bench``.

    Parameters
    ----------
    tiny : bool
        Tiny sizes and one repeat: checks that everything runs, in about a
        second; the times mean nothing.

    Returns
    -------
    dict
        ``machine`` (versions, CPU count), ``rows`` (see :func:`grid`) and
        ``fastest``: for each transform, the fastest backend for the small
        and the large problem.
    """
    if tiny:
        small, large, repeats, min_time = 2, 4, 1, 0.0
    else:
        small, large, repeats, min_time = 8, 256, 3, 0.02
    rows = grid([small, large], [small, large], repeats=repeats, min_time=min_time)
    fastest: Dict[str, Dict[str, str]] = {}
    for row in rows:
        kind = "small" if row["size"] == small else "large"
        fastest.setdefault(row["transform"], {})[kind] = row["fastest"]
    return {
        "machine": _machine(),
        "sizes": {"small": small, "large": large},
        "rows": rows,
        "fastest": fastest,
    }


def _format_quick(data: Table) -> str:
    mach = data["machine"]
    lines = [
        f"adbackends {mach['adbackends']} benchmark (torch {mach['torch']}, "
        f"Python {mach['python']}, {mach['cpus']} CPUs, {mach['torch_threads']} torch threads)",
        "jacrev: f(x) = tanh(W x) * sum(x^2), x of size n, Jacobian n x n (float64)",
        "vmap:   pairwise energy of 8 points, batch of b geometries (float64)",
        "time per call (median); * fastest, xR = R times the fastest's time,",
        f"~ result differs from the first backend's (relative > {EXACT_RTOL:g}): not exact",
        "",
        _format_grid(data["rows"], {"jacrev": "n=", "vmap": "b="}),
        "",
    ]
    for transform, kinds in data["fastest"].items():
        lines.append(
            f"fastest {transform}: small problems {kinds['small']}, large problems {kinds['large']}"
        )
    lines.append("(the whole suite: python -m adbackends.bench --full)")
    return "\n".join(lines)


def cli_bench(args: argparse.Namespace) -> int:
    """``python -m adbackends bench``: the short run; ``--json`` prints JSON.

    A minimal run (for tests) is asked for with ``args.tiny`` or the
    environment variable ``ADBACKENDS_BENCH_TINY``.
    """
    tiny = bool(getattr(args, "tiny", False) or os.environ.get(TINY_ENV, "").strip())
    data = quick(tiny=tiny)
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2))
    else:
        print(_format_quick(data))
    return 0


# -- P1: dispatch overhead ------------------------------------------------------


def p1_dispatch(*, repeats: int = 21, min_time: float = 0.1) -> List[Dict[str, Any]]:
    """``adbackends.X(f)(x)`` against ``torch.func.X(f)(x)`` for a small ``f`` (P1).

    The same call timed against itself gives ``control_ratio``: the noise
    floor of a whole-call ratio on this machine. Making the transform alone
    is timed too (``adbackends.jacrev(f)`` against ``torch.func.jacrev(f)``):
    the registry's whole cost is paid there, since the function it returns
    is torch.func's own, so the difference of the two, divided by the time
    of a whole call, is the overhead with far less noise than the ratio of
    two whole calls.
    """
    import torch
    import torch.func

    from . import transforms
    from .selection import _choose

    if _choose().backend.name != "torch.func":
        raise RuntimeError("P1 measures the registry on top of torch.func; select it first")
    x = torch.randn(4, dtype=torch.float64)
    xs = torch.randn(16, 4, dtype=torch.float64)

    def f(t: Any) -> Any:
        return t.sin() * t.sum()

    out = []
    for name, ours, theirs, arg in (
        ("jacrev", transforms.jacrev, torch.func.jacrev, x),
        ("vmap", transforms.vmap, torch.func.vmap, xs),
    ):
        assert torch.equal(ours(f)(arg), theirs(f)(arg))
        # "again" is torch.func a second time: the A/A control whose ratio
        # shows how far two identical things drift apart here.
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
                "ratio": median_ratio(calls["adbackends"], calls["torch.func"]),
                "control_ratio": median_ratio(calls["again"], calls["torch.func"]),
                "torch_func_call_us": call * 1e6,
                "dispatch_us": extra * 1e6,
                "overhead_ratio": 1.0 + extra / call,
            }
        )
    return out


# -- P2 and P3: the loop backend against hand-written loops -------------------------


def p2_loop_jacrev(
    sizes: Sequence[int] = (8, 64, 256), *, repeats: int = 9, min_time: float = 0.05
) -> List[Dict[str, Any]]:
    """Loop ``jacrev`` / ``autograd.functional.jacobian`` and / a grad loop (P2)."""
    import torch
    from torch.autograd.functional import jacobian

    from .registry import REGISTRY

    loop = REGISTRY.get("loop")
    out = []
    for n in sizes:
        f, x = jac_problem(n)
        fns: Dict[str, Callable[[], Any]] = {
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
                "max_abs_diff": max(_agree(results).values()),
                "equal": all(torch.equal(r, results["loop"]) for r in results.values()),
            }
        )
    return out


def p3_loop_vmap(
    sizes: Sequence[int] = (8, 64, 256, 1024), *, repeats: int = 9, min_time: float = 0.05
) -> List[Dict[str, Any]]:
    """Loop ``vmap`` / a hand-written loop plus ``torch.stack`` (P3)."""
    import torch

    from .registry import REGISTRY

    loop = REGISTRY.get("loop")
    out = []
    for b in sizes:
        f, xs = vmap_problem(b)
        fns: Dict[str, Callable[[], Any]] = {
            "loop": _applied(loop.vmap, f, xs),
            "stack_loop": partial(stack_loop_vmap, f, xs),
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


# -- P4: cold start -------------------------------------------------------------

_COLD = {
    "adbackends": "import torch, adbackends; adbackends.jacrev(torch.sin)(torch.ones(3))",
    "torch.func": "import torch, torch.func; torch.func.jacrev(torch.sin)(torch.ones(3))",
    "adbackends vmap": "import torch, adbackends; adbackends.vmap(torch.sin)(torch.ones(2, 3))",
    "torch.func vmap": "import torch, torch.func; torch.func.vmap(torch.sin)(torch.ones(2, 3))",
    "import torch": "import torch",
}


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("TAD_AD_BACKEND", None)
    env.pop(TINY_ENV, None)
    return env


def p4_cold_start(pairs: int = 10) -> Dict[str, Any]:
    """A fresh ``python -c`` importing and doing one jacrev, with and without adbackends (P4).

    The scripts alternate (forward, then backward order); the ratio is the
    median of the per-round ratios. The same is done for a program whose
    first transform is a ``vmap`` (``vmap_ratio``), and ``import torch``
    alone is timed to show how much of a cold start is torch itself.

    Whole-process ratios are noisy (a cold start is seconds of file reads
    and imports), so adbackends' own cost is also measured directly: see
    :func:`_own_cost`.
    """
    env = _child_env()
    times: Dict[str, List[float]] = {name: [] for name in _COLD}
    names = list(_COLD)
    for _ in range(2):  # warm the file cache first
        subprocess.run([sys.executable, "-c", _COLD["adbackends"]], env=env, check=True)
    for rep in range(pairs):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", _COLD[name]], env=env, check=True)
            times[name].append(time.perf_counter() - start)
    stages = _cold_stages(env)
    own = _own_cost(env)
    return {
        "own_cost_ms": own,
        "own_cost_ratio": 1.0 + own / 1e3 / statistics.median(times["torch.func"]),
        "pairs": pairs,
        "adbackends_s": statistics.median(times["adbackends"]),
        "torch_func_s": statistics.median(times["torch.func"]),
        "import_torch_s": statistics.median(times["import torch"]),
        "ratio": median_ratio(times["adbackends"], times["torch.func"]),
        "adbackends_vmap_s": statistics.median(times["adbackends vmap"]),
        "torch_func_vmap_s": statistics.median(times["torch.func vmap"]),
        "vmap_ratio": median_ratio(times["adbackends vmap"], times["torch.func vmap"]),
        "stages_ms": stages,
    }


_STAGES = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
if sys.argv[1] == "adbackends":
    import adbackends
    t2 = time.perf_counter()
    adbackends.current()
    jacrev = adbackends.jacrev
else:
    import torch.func
    t2 = time.perf_counter()
    jacrev = torch.func.jacrev
t3 = time.perf_counter()
jacrev(torch.sin)(torch.ones(3))
t4 = time.perf_counter()
jacrev(torch.sin)(torch.ones(3))
t5 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import": t2 - t1, "selection and probes": t3 - t2,
                  "first jacrev": t4 - t3, "second jacrev": t5 - t4}))
"""


_OWN_COST = """
import json, time
import torch, torch.func
torch.func.jacrev(torch.sin)(torch.ones(3))
torch.func.vmap(torch.sin)(torch.ones(2, 3))
t0 = time.perf_counter()
import adbackends
adbackends.current()
adbackends.jacrev(torch.sin)
print(json.dumps(time.perf_counter() - t0))
"""


def _own_cost(env: Dict[str, str], runs: int = 5) -> float:
    """adbackends' own share of a cold start, in ms (median of ``runs``).

    Measured in a fresh process after torch has done its own first-use work
    (one torch.func jacrev and vmap): importing adbackends, selecting the
    backend with its probes, and making one transform.
    """
    samples = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", _OWN_COST], env=env, check=True, capture_output=True, text=True
        )
        samples.append(json.loads(proc.stdout.strip().splitlines()[-1]) * 1e3)
    return statistics.median(samples)


def _cold_stages(env: Dict[str, str], runs: int = 5) -> Dict[str, Dict[str, float]]:
    """Where a cold start's time goes, with and without adbackends (median ms)."""
    samples: Dict[str, Dict[str, List[float]]] = {"adbackends": {}, "torch.func": {}}
    for _ in range(runs):
        for which, into in samples.items():
            proc = subprocess.run(
                [sys.executable, "-c", _STAGES, which],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            for key, value in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                into.setdefault(key, []).append(value * 1e3)
    return {
        which: {key: statistics.median(vals) for key, vals in into.items()}
        for which, into in samples.items()
    }


# -- P6: peak memory --------------------------------------------------------------

_MEMORY = """
import json, sys, warnings
warnings.simplefilter("ignore", FutureWarning)
import torch
import adbackends
from adbackends.bench import jac_problem

name, m, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
chunk = None if chunk == "none" else int(chunk)
backend = adbackends.get(name)

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

f, x = jac_problem(n, m)
small_f, small_x = jac_problem(4, 8)
backend.jacrev(small_f, chunk_size=chunk)(small_x)  # load code paths first
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
jac = backend.jacrev(f, chunk_size=chunk)(x)
peak = status("VmHWM")
print(json.dumps({"peak_bytes": peak - before, "result_bytes": jac.numel() * jac.element_size(),
                  "shape": list(jac.shape)}))
"""


def p6_memory(
    m: int = 4096,
    n: int = 256,
    chunks: Sequence[Optional[int]] = (None, 256),
    names: Optional[Sequence[str]] = None,
) -> List[Dict[str, Any]]:
    """Peak extra memory of one ``jacrev`` with ``m`` outputs, per backend and chunk (P6).

    Each case runs in a fresh interpreter (Linux only): after the imports
    and a tiny warm-up, the kernel's peak-RSS counter is reset
    (``/proc/self/clear_refs``), the Jacobian is taken, and the figure is
    the peak resident set (``VmHWM``) minus the resident set just before.
    torch's CPU allocator returns large blocks to the system, so this is the
    most that the computation had allocated at once, plus allocator slack.
    ``names`` limits the backends (default: every one that loads here).
    """
    env = _child_env()
    out = []
    for name in names if names is not None else list(_backends()):
        for chunk in chunks:
            args = [name, str(m), str(n), "none" if chunk is None else str(chunk)]
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY, *args], env=env, capture_output=True, text=True
            )
            row: Dict[str, Any] = {"backend": name, "chunk_size": chunk, "m": m, "n": n}
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


# -- the size-aware strategy question -------------------------------------------------


def strategy(
    sizes: Sequence[int] = (4, 8, 16, 32, 64, 128, 256, 512),
    kinds: Sequence[str] = ("elementwise", "dense"),
    *,
    repeats: int = 7,
    min_time: float = 0.05,
) -> List[Dict[str, Any]]:
    """A plain ``autograd.grad`` loop against ``torch.func.jacrev``, across sizes.

    For each kind of problem (see :func:`jac_problem`) and ``n``: the grad
    loop's time / torch.func's, the loop backend's time / torch.func's, and
    whether the grad loop's Jacobian is bitwise equal to torch.func's (and
    the largest difference when it is not).
    """
    import torch
    import torch.func

    from .registry import REGISTRY

    loop = REGISTRY.get("loop")
    out = []
    for kind in kinds:
        for n in sizes:
            f, x = jac_problem(n, kind=kind)
            fns: Dict[str, Callable[[], Any]] = {
                "torch.func": _applied(torch.func.jacrev, f, x),
                "grad_loop": partial(grad_loop_jacobian, f, x),
                "loop": _applied(loop.jacrev, f, x),
            }
            ref = fns["torch.func"]()
            mine = fns["grad_loop"]()
            theirs = fns["loop"]()
            times = compare(fns, repeats=repeats, min_time=min_time, warmup=False)
            out.append(
                {
                    "kind": kind,
                    "n": n,
                    "torch_func_ms": statistics.median(times["torch.func"]) * 1e3,
                    "grad_loop_vs_torch_func": median_ratio(
                        times["grad_loop"], times["torch.func"]
                    ),
                    "loop_vs_torch_func": median_ratio(times["loop"], times["torch.func"]),
                    "bitwise_equal": bool(torch.equal(ref, mine) and torch.equal(ref, theirs)),
                    "max_abs_diff": max(
                        float((ref - mine).abs().max()), float((ref - theirs).abs().max())
                    ),
                }
            )
    return out


# -- the full suite -----------------------------------------------------------------


#: The parts of the full suite, in the order they run.
PARTS: Tuple[str, ...] = ("P1", "P2", "P3", "P4", "P5", "P6", "S")


def full(parts: Sequence[str] = PARTS) -> Table:
    """Run the parts of the suite named in ``parts``; returns everything as data.

    A part that cannot run here (P1, P4 and S need torch.func, so torch >= 2.0)
    is recorded as ``{"error": "..."}`` and the others still run.
    """
    import torch

    command = " ".join(["python", "-m", "adbackends.bench", *sys.argv[1:]])
    data: Table = {"machine": _machine(), "command": command}
    steps: Dict[str, Callable[[], Any]] = {
        "P1": p1_dispatch,
        "P2": p2_loop_jacrev,
        "P3": p3_loop_vmap,
        "P4": p4_cold_start,
        "P5": partial(grid, (8, 64, 256, 1024), (8, 64, 256, 1024)),
        "P6": p6_memory,
        "S": strategy,
    }
    torch.manual_seed(0)
    for part in parts:
        start = time.perf_counter()
        try:
            with _quiet():
                data[part] = steps[part]()
        except Exception as exc:  # one part failing must not lose the others
            data[part] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{part} took {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    return data


def _format_full(data: Table) -> str:
    data = dict(data)  # parts that failed are dropped below, from this copy only
    mach = data["machine"]
    lines = [
        f"adbackends {mach['adbackends']}, torch {mach['torch']}, Python {mach['python']}, "
        f"{mach['cpus']} CPUs ({mach['torch_threads']} torch threads), {mach['platform']}",
    ]
    for part in PARTS:
        if isinstance(data.get(part), dict) and "error" in data[part]:
            lines.append(f"{part} could not run here: {data[part]['error']}")
            del data[part]
    if "P1" in data:
        lines += ["", "P1 dispatch overhead (target <= 1.02)"]
        for r in data["P1"]:
            lines.append(
                f"  {r['transform']:<7} call ratio {r['ratio']:.3f} (A/A control "
                f"{r['control_ratio']:.3f})   dispatch "
                f"{r['dispatch_us']:.2f} us on a {r['torch_func_call_us']:.0f} us call "
                f"-> {r['overhead_ratio']:.4f}"
            )
    if "P2" in data:
        lines += ["", "P2 loop jacrev (target <= 0.9 vs functional.jacobian)"]
        for r in data["P2"]:
            lines.append(
                f"  n={r['n']:<5} {r['loop_ms']:8.3f} ms   / functional.jacobian "
                f"{r['vs_functional']:.3f}   / grad loop {r['vs_grad_loop']:.3f}   "
                f"max|diff| {r['max_abs_diff']:.1e}"
            )
    if "P3" in data:
        lines += ["", "P3 loop vmap (target <= 1.10 vs loop + torch.stack)"]
        for r in data["P3"]:
            lines.append(
                f"  b={r['batch']:<5} {r['loop_ms']:8.3f} ms   / stack loop "
                f"{r['vs_stack_loop']:.3f}   equal {r['equal']}"
            )
    if "P4" in data:
        r = data["P4"]
        lines += [
            "",
            "P4 cold start (target <= 1.03)",
            f"  adbackends {r['adbackends_s']:.3f} s   torch.func {r['torch_func_s']:.3f} s   "
            f"import torch {r['import_torch_s']:.3f} s   ratio {r['ratio']:.3f} "
            f"({r['pairs']} alternating rounds)",
            f"  adbackends' own cost after torch's first-use work: {r['own_cost_ms']:.1f} ms "
            f"-> {r['own_cost_ratio']:.4f} of the torch.func cold start",
            f"  first transform a vmap: adbackends {r['adbackends_vmap_s']:.3f} s   torch.func "
            f"{r['torch_func_vmap_s']:.3f} s   ratio {r['vmap_ratio']:.3f}",
        ]
        for which, stages in r["stages_ms"].items():
            lines.append(
                f"  {which:<10} " + ", ".join(f"{k} {v:.1f} ms" for k, v in stages.items())
            )
    if "P5" in data:
        lines += ["", "P5 every backend (* fastest, xR = R times the fastest)"]
        lines.append(_format_grid(data["P5"], {"jacrev": "n=", "vmap": "b="}))
    if "P6" in data:
        lines += ["", "P6 peak extra memory of jacrev (RSS high-water mark)"]
        for r in data["P6"]:
            what = f"  {r['backend']:<11} chunk_size={r['chunk_size']!s:<5}"
            if "error" in r:
                lines.append(f"{what} failed: {r['error']}")
            else:
                lines.append(
                    f"{what} m={r['m']} n={r['n']}  peak {r['peak_mib']:7.1f} MiB  "
                    f"(result {r['result_mib']:.1f} MiB, x{r['peak_over_result']:.1f})"
                )
    if "S" in data:
        lines += ["", "S size-aware strategy: grad loop and loop backend / torch.func.jacrev"]
        for r in data["S"]:
            lines.append(
                f"  {r['kind']:<11} n={r['n']:<5} torch.func {r['torch_func_ms']:8.3f} ms"
                f"   grad loop x{r['grad_loop_vs_torch_func']:.2f}"
                f"   loop x{r['loop_vs_torch_func']:.2f}   "
                f"bitwise equal {r['bitwise_equal']} (max|diff| {r['max_abs_diff']:.1e})"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m adbackends.bench``: the short run, or ``--full`` for the suite."""
    parser = argparse.ArgumentParser(
        prog="python -m adbackends.bench", description="Benchmark the autodiff backends here."
    )
    parser.add_argument("--full", action="store_true", help="run the whole suite (minutes)")
    parser.add_argument("--only", default="", help="with --full: comma-separated parts, e.g. P1,P4")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tiny", action="store_true", help="a minimal run (checks, not speed)")
    parser.add_argument("--save", default="", help="with --full: also write the JSON to this file")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads first (0: leave as is)"
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if not args.full:
        return cli_bench(args)
    parts = [p.strip().upper() for p in args.only.split(",") if p.strip()] or None
    unknown = sorted(set(parts or ()) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    data = full(parts) if parts else full()
    if args.save:
        with open(args.save, "w") as fh:
            json.dump(data, fh, indent=2)
    print(json.dumps(data, indent=2) if args.json else _format_full(data))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
