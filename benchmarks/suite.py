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
import tempfile
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


def _backends(names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Every backend that loads here, or those named (chains such as ``"functorch>loop"`` too)."""
    from adbackends.bench import _backends, _quiet

    if names is None:
        return _backends()
    import adbackends

    with _quiet():
        return {name: adbackends.get(name) for name in names}


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


def _p1_run(
    f: Callable[[Any], Any], args: Mapping[str, Any], repeats: int, min_time: float
) -> List[Row]:
    """One run of P1: per transform, the call ratio and the A/A control."""
    import torch.func

    import adbackends

    rows = []
    for name, arg in args.items():
        ours, theirs = getattr(adbackends, name), getattr(torch.func, name)
        calls = compare(
            {
                "adbackends": _applied(ours, f, arg),
                "torch.func": _applied(theirs, f, arg),
                "again": _applied(theirs, f, arg),
            },
            repeats=repeats,
            min_time=min_time,
        )
        rows.append(
            {
                "transform": name,
                "ratio": median_ratio(calls["adbackends"], calls["torch.func"]),
                "control_ratio": median_ratio(calls["again"], calls["torch.func"]),
                "torch_func_call_us": statistics.median(calls["torch.func"]) * 1e6,
            }
        )
    return rows


def _p1_make(
    f: Callable[[Any], Any], args: Mapping[str, Any], repeats: int, min_time: float
) -> List[Row]:
    """Making the transform alone, adbackends against torch.func, per transform."""
    import torch.func

    import adbackends

    rows = []
    for name, arg in args.items():
        ours, theirs = getattr(adbackends, name), getattr(torch.func, name)
        makes = compare(
            {"adbackends": partial(ours, f), "torch.func": partial(theirs, f)},
            repeats=repeats,
            min_time=min_time,
        )
        call = compare({"torch.func": _applied(theirs, f, arg)}, repeats=3, min_time=min_time)
        extra = statistics.median(a - b for a, b in zip(makes["adbackends"], makes["torch.func"]))
        per_call = statistics.median(call["torch.func"])
        rows.append(
            {
                "transform": name,
                "dispatch_us": extra * 1e6,
                "overhead_ratio": 1.0 + extra / per_call,
            }
        )
    return rows


def p1_dispatch(
    *, runs: int = 1, repeats: int = 11, min_time: float = 0.05, target: float = 1.02
) -> Row:
    """``adbackends.X(f)(x)`` against ``torch.func.X(f)(x)`` for a small ``f``, ``runs`` times.

    The target holds "in every run", so P1 is repeated ``runs`` times in one
    process and every run's ratio is kept. Two modes: ``auto`` (what users
    get: on torch 2 the chain ``torch.func>loop``) and ``strict``
    (``adbackends.use("torch.func")``).

    torch.func timed against itself gives ``control_ratio``, the noise floor
    of a whole-call ratio here. Making the transform alone is timed too
    (``make``): the registry's cost is paid there, so that difference over
    one call's time resolves the overhead better than a whole-call ratio.
    """
    import torch

    import adbackends

    if "torch.func" not in adbackends.available():
        return {"skipped": f"needs torch.func (torch >= 2); this is torch {torch.__version__}"}
    x = torch.randn(4, dtype=torch.float64)
    xs = torch.randn(16, 4, dtype=torch.float64)

    def f(t: Any) -> Any:
        return t.sin() * t.sum()

    args = {"jacrev": x, "vmap": xs}
    out: Row = {"runs": runs, "target": target, "modes": {}}
    for mode in ("auto", "strict"):
        adbackends.use("torch.func" if mode == "strict" else "auto")
        try:
            active = adbackends.current().name
            for name, arg in args.items():
                ours, theirs = getattr(adbackends, name), getattr(torch.func, name)
                if not torch.equal(ours(f)(arg), theirs(f)(arg)):
                    raise AssertionError(f"adbackends.{name} and torch.func.{name} disagree")
            every = [_p1_run(f, args, repeats, min_time) for _ in range(runs)]
            make = _p1_make(f, args, repeats, min_time)
        finally:
            adbackends.use(None)
        summary = []
        for i, name in enumerate(args):
            ratios = [rows[i]["ratio"] for rows in every]
            summary.append(
                {
                    "transform": name,
                    "ratios": ratios,
                    "controls": [rows[i]["control_ratio"] for rows in every],
                    "max": max(ratios),
                    "met": [r <= target for r in ratios],
                    "all_met": all(r <= target for r in ratios),
                    "torch_func_call_us": statistics.median(
                        rows[i]["torch_func_call_us"] for rows in every
                    ),
                    **{k: v for k, v in make[i].items() if k != "transform"},
                }
            )
        out["modes"][mode] = {"active": active, "transforms": summary}
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


def tanh_sum_problem(batch: int, features: int = 16) -> Tuple[Callable[[Any], Any], Any]:
    """``f(v) = sum(tanh(W v))`` with ``W`` of ``features x features``, and a batch of ``v``."""
    import torch

    gen = torch.Generator().manual_seed(2)
    w = torch.randn(features, features, generator=gen, dtype=torch.float64) / features**0.5
    xs = torch.randn(batch, features, generator=gen, dtype=torch.float64)
    return (lambda v: torch.tanh(w @ v).sum()), xs


def p3_loop_vmap(
    sizes: Sequence[int] = (8, 64, 256, 1024), *, repeats: int = 15, min_time: float = 0.05
) -> List[Row]:
    """Loop ``vmap`` / a hand-written loop plus ``torch.stack``, for two functions.

    ``tanh``: ``sum(tanh(W v))`` with 16 features; ``pair energy``: the pair
    energy of 8 points (see :func:`adbackends.bench.pair_energy`).
    """
    import torch

    loop = _backends()["loop"]
    out = []
    for case in ("tanh", "pair energy"):
        for b in sizes:
            if case == "tanh":
                f, xs = tanh_sum_problem(b)
            else:
                f, xs = pair_energy, geometries(b)
            fns = {
                "loop": _applied(loop.vmap, f, xs),
                "stack_loop": partial(stack_loop_vmap, f, xs),
            }
            results = {name: fn() for name, fn in fns.items()}
            times = compare(fns, repeats=repeats, min_time=min_time, warmup=False)
            out.append(
                {
                    "case": case,
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


def _child_env(cache_dir: Optional[str] = None) -> Dict[str, str]:
    """The environment of child interpreters: no backend named by the caller's shell.

    ``cache_dir``: the directory of adbackends' probe cache (``ADBACKENDS_CACHE_DIR``).
    """
    env = dict(os.environ)
    env.pop("TAD_AD_BACKEND", None)
    if cache_dir is not None:
        env.pop("ADBACKENDS_NO_CACHE", None)
        env["ADBACKENDS_CACHE_DIR"] = cache_dir
    return env


def _child_json(args: Sequence[str], env: Mapping[str, str]) -> Any:
    proc = subprocess.run(
        [sys.executable, *args], env=dict(env), check=True, capture_output=True, text=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _process_seconds(script: str, env: Mapping[str, str]) -> float:
    """Seconds for a fresh ``python -c script``, start to exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], env=dict(env), check=True)
    return time.perf_counter() - start


def p4_cold_start(pairs: int = 10, runs: int = 3, cold_rounds: int = 3) -> Row:
    """A fresh ``python -c`` importing and taking one transform, with and without adbackends.

    adbackends keeps probe results on disk, so only a process that finds the
    cache empty runs the probes. The part uses fresh temporary cache
    directories: ``cold_rounds`` times, a program whose first transform is a
    ``vmap`` runs against an empty cache next to the torch.func program
    (``cold_cache_vmap_ratio``); then the cache is warmed by one process and
    the scripts alternate ``pairs`` times (forward, then backward order);
    each ratio is the median of the per-round ratios. ``import torch`` alone
    shows how much of a cold start is torch's own. Whole-process ratios are
    noisy, so adbackends' own cost is also measured inside one process
    (``own_cost_ms``, median of ``runs``), after torch has done its
    first-use work, together with where a cold start's time goes
    (``stages_ms``).
    """
    with tempfile.TemporaryDirectory(prefix="adbackends-bench-cache-") as base:
        cold: Dict[str, List[float]] = {"adbackends": [], "torch.func": []}
        plain = _child_env(os.path.join(base, "unused"))
        for rnd in range(cold_rounds):
            env = _child_env(os.path.join(base, f"cold{rnd}"))  # a new, empty cache
            order = ["adbackends", "torch.func"][:: 1 if rnd % 2 == 0 else -1]
            for which in order:
                script = _COLD[f"{which} vmap"]
                cold[which].append(
                    _process_seconds(script, env if which == "adbackends" else plain)
                )
        env = _child_env(os.path.join(base, "warm"))
        _process_seconds(_COLD["adbackends vmap"], env)  # the one process that fills the cache
        times: Dict[str, List[float]] = {name: [] for name in _COLD}
        names = list(_COLD)
        for _ in range(min(pairs, 2)):  # warm the file system's cache too
            _process_seconds(_COLD["adbackends"], env)
        for rep in range(pairs):
            for name in names if rep % 2 == 0 else names[::-1]:
                times[name].append(_process_seconds(_COLD[name], env))
        child = str(HERE / "cold_child.py")
        own = statistics.median(_child_json([child, "own"], env) * 1e3 for _ in range(runs))
        stages: Dict[str, Dict[str, List[float]]] = {"adbackends": {}, "torch.func": {}}
        for _ in range(runs):
            for which, into in stages.items():
                for key, value in _child_json([child, "stages", which], env).items():
                    into.setdefault(key, []).append(value * 1e3)
    return {
        "pairs": pairs,
        "cold_rounds": cold_rounds,
        "adbackends_s": statistics.median(times["adbackends"]),
        "torch_func_s": statistics.median(times["torch.func"]),
        "import_torch_s": statistics.median(times["import torch"]),
        "ratio": median_ratio(times["adbackends"], times["torch.func"]),
        "adbackends_vmap_s": statistics.median(times["adbackends vmap"]),
        "torch_func_vmap_s": statistics.median(times["torch.func vmap"]),
        "vmap_ratio": median_ratio(times["adbackends vmap"], times["torch.func vmap"]),
        "cold_cache_adbackends_vmap_s": statistics.median(cold["adbackends"]),
        "cold_cache_torch_func_vmap_s": statistics.median(cold["torch.func"]),
        "cold_cache_vmap_ratio": median_ratio(cold["adbackends"], cold["torch.func"]),
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
    names: Optional[Sequence[str]] = None,
) -> List[Row]:
    """Every backend that loads, on every workload, at each size.

    A backend whose median call took more than ``too_slow`` seconds at one
    size is not timed at the larger sizes of that workload (listed under
    ``skipped``): its times only grow, and the suite should end in minutes.
    ``names``: the backends to time (default: every backend that loads).
    """
    from adbackends.bench import time_backends

    backends = _backends(names)
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


# -- P7: the fallback chain's cost ----------------------------------------------------


def _p7_problem(features: int = 16) -> Dict[str, Callable[[Any], Any]]:
    """The functions of P7: plain ones, and ones that call ``.item()`` (vmap refuses those)."""
    import torch

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(features, features, generator=gen, dtype=torch.float64) / features**0.5

    def scalar(v: Any) -> Any:
        return torch.tanh(w @ v).sum()

    def vector(v: Any) -> Any:
        return torch.tanh(w @ v) * v.sum()

    def scalar_item(v: Any) -> Any:
        return torch.tanh(w @ v).sum() * v.sum().item()

    def vector_item(v: Any) -> Any:
        return torch.tanh(w @ v) * v.sum().item()

    return {
        "scalar": scalar,
        "vector": vector,
        "scalar_item": scalar_item,
        "vector_item": vector_item,
    }


def _p7_calls(
    backends: Mapping[str, Any], cases: Sequence[Tuple[str, str, Any]], fns: Mapping[str, Any]
) -> Dict[str, Dict[str, Callable[[], Any]]]:
    """Per case, the call to time under each backend; the transform is made on every call."""
    out: Dict[str, Dict[str, Callable[[], Any]]] = {}
    for call, fname, arg in cases:
        f = fns[fname]
        per: Dict[str, Callable[[], Any]] = {}
        for label, b in backends.items():
            if call == "jacrev":
                per[label] = partial(lambda b, f, a: b.jacrev(f)(a), b, f, arg)
            elif call == "vmap":
                per[label] = partial(lambda b, f, a: b.vmap(f)(a), b, f, arg)
            else:
                per[label] = partial(lambda b, f, a: b.vmap(b.jacrev(f))(a), b, f, arg)
        label = f"vmap(jacrev({fname}))" if call == "vmap_jacrev" else f"{call}({fname})"
        out[label] = per
    return out


def _p7_measure(
    calls: Mapping[str, Mapping[str, Callable[[], Any]]],
    over: str,
    target: float,
    repeats: int,
    min_time: float,
) -> List[Row]:
    """Time each case's calls side by side; the first one's ratio to ``over``, with ``target``."""
    import warnings

    import torch

    from adbackends import FallbackWarning

    rows = []
    for case, per in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            results = {label: fn() for label, fn in per.items()}  # a fallback happens here
            times = compare(per, repeats=repeats, min_time=min_time, warmup=False)
        first = next(iter(per))
        ref = results[over]
        row: Row = {
            "call": case,
            "timed": first,
            "over": over,
            "ratio": median_ratio(times[first], times[over]),
            "target": target,
            "ms": {label: statistics.median(ts) * 1e3 for label, ts in times.items()},
            "others": {
                label: median_ratio(times[first], ts)
                for label, ts in times.items()
                if label not in (first, over)
            },
            "max_abs_diff": max(float((r - ref).abs().max()) for r in results.values()),
            "equal": all(torch.equal(r, ref) for r in results.values()),
        }
        row["met"] = row["ratio"] <= target
        rows.append(row)
    return rows


def p7_chain(
    *,
    batch: int = 64,
    legacy_batch: int = 256,
    repeats: int = 15,
    min_time: float = 0.05,
) -> Row:
    """What the fallback chain costs, in three parts.

    ``a``: calls that never fall back, through the chain auto picks on torch 2
    (``torch.func>loop``) / through the ``torch.func`` backend (target 1.02);
    the ``torch.func`` functions themselves are timed too, for scale.
    ``b``: calls of functions that already fell back (they call ``.item()``),
    through the chain / through the ``loop`` backend (target 1.05).
    ``c``, torch 1.13 only: ``vmap`` of a plain function through
    ``functorch>loop`` / through ``loop`` at batch ``legacy_batch``
    (target 0.1). A part that cannot run here says why (``skipped``).
    """
    import torch

    import adbackends
    from adbackends import fallback

    fns = _p7_problem()
    x = torch.randn(16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    xs = torch.randn(batch, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    big = torch.randn(
        legacy_batch, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    names = adbackends.available()
    major = int(str(torch.__version__).split(".")[0])
    out: Row = {"batch": batch, "legacy_batch": legacy_batch}
    fallback.forget_fallbacks()
    if "torch.func" not in names:
        note = f"needs torch.func (torch >= 2); this is torch {torch.__version__}"
        out["a"] = out["b"] = {"skipped": note}
    else:
        chain = adbackends.get("torch.func>loop")
        auto = adbackends.get("auto").name
        import torch.func

        plain = _p7_calls(
            {
                "torch.func>loop": chain,
                "torch.func": adbackends.get("torch.func"),
                "torch.func functions": torch.func,
            },
            [("jacrev", "vector", x), ("vmap", "scalar", xs), ("vmap_jacrev", "vector", xs)],
            fns,
        )
        out["a"] = {
            "auto": auto,
            "rows": _p7_measure(plain, "torch.func", 1.02, repeats, min_time),
        }
        refused = _p7_calls(
            {"torch.func>loop": chain, "loop": adbackends.get("loop")},
            [("vmap", "scalar_item", xs), ("vmap_jacrev", "vector_item", xs)],
            fns,
        )
        out["b"] = {
            "auto": auto,
            "rows": _p7_measure(refused, "loop", 1.05, repeats, min_time),
            "fell_back": sorted({fb.function for fb in fallback.fallbacks()}),
        }
    if major >= 2 or "functorch" not in names:
        why = "torch >= 2 (torch.func is there)" if major >= 2 else "no functorch"
        out["c"] = {"skipped": f"needs functorch without torch.func (torch < 2); here {why}"}
    else:
        legacy = _p7_calls(
            {"functorch>loop": adbackends.get("functorch>loop"), "loop": adbackends.get("loop")},
            [("vmap", "scalar", big), ("vmap_jacrev", "vector", big)],
            fns,
        )
        out["c"] = {
            "auto": adbackends.get("auto").name,
            "rows": _p7_measure(legacy, "loop", 0.1, repeats, min_time),
        }
    fallback.forget_fallbacks()
    return out


# -- the parts, full and quick ----------------------------------------------------------

#: Every part, in the order it runs.
PARTS: Tuple[str, ...] = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "S")
#: What ``--quick`` runs unless parts are named: the parts that start no interpreter.
QUICK_PARTS: Tuple[str, ...] = ("P1", "P2", "P3", "P5", "P7", "S")


def steps(
    quick: bool = False, p1_runs: int = 1, backends: Optional[Sequence[str]] = None
) -> Dict[str, Callable[[], Any]]:
    """Each part as a callable with no arguments; ``quick``: tiny sizes, one repeat.

    ``p1_runs``: how many times P1 runs; ``backends``: the backends of P5
    (default: every one that loads).
    """
    if not quick:
        return {
            "P1": partial(p1_dispatch, runs=p1_runs),
            "P2": p2_loop_jacrev,
            "P3": p3_loop_vmap,
            "P4": p4_cold_start,
            "P5": partial(p5_grid, names=backends),
            "P6": p6_memory,
            "P7": p7_chain,
            "S": strategy,
        }
    fast = {"repeats": 1, "min_time": 0.0}
    return {
        "P1": partial(p1_dispatch, runs=p1_runs, **fast),
        "P2": partial(p2_loop_jacrev, (3, 6), **fast),
        "P3": partial(p3_loop_vmap, (2, 4), **fast),
        "P4": partial(p4_cold_start, pairs=1, runs=1, cold_rounds=1),
        "P5": partial(p5_grid, {name: (2, 3) for name in GRID}, names=backends, **fast),
        "P6": partial(p6_memory, m=16, n=4, chunks=(None, 4)),
        "P7": partial(p7_chain, batch=3, legacy_batch=4, **fast),
        "S": partial(strategy, (2, 4), **fast),
    }
