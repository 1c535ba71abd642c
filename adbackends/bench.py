"""A short benchmark: what each backend that loads here costs on a few workloads.

``adbackends bench`` calls :func:`run` and prints :func:`format_table`. Every
backend that loads here (plugins included) times the same workloads:

``jacrev``
    ``f(x) = tanh(W x) * sum(x**2)``, ``x`` of size n, Jacobian n x n;
``vmap``
    a pair energy of 8 points, mapped over a batch of geometries;
``forces``
    ``vmap(jacrev(energy))``: Lennard-Jones forces of 8 atoms, batched;
``hessians``
    ``vmap(jacrev(jacrev(energy)))``: the same energy's Hessians, batched.

Everything is float64 with fixed seeds. Times are medians over repeats taken
side by side (see :func:`compare`); only ratios measured in the same run mean
much on a shared machine.

Examples
--------
>>> from adbackends.bench import compare
>>> times = compare({"a": lambda: None, "b": lambda: None}, repeats=3, min_time=1e-4)
>>> sorted(times), len(times["a"])
(['a', 'b'], 3)
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "WORKLOADS",
    "compare",
    "format_table",
    "median_ratio",
    "run",
    "summary",
    "time_backends",
    "workload",
]

Call = Callable[[], Any]
#: Builds, for one backend, the call to time (the transform is made inside it,
#: on every call, as programs do).
Maker = Callable[[Any], Call]

#: A result differing from the first backend's by more than this, relative to
#: its largest entry, is an approximation (a finite-difference plugin, say):
#: it is reported but never called fastest.
EXACT_RTOL = 1e-12

#: The workloads, with the word their size is given in.
WORKLOADS: Dict[str, str] = {"jacrev": "n", "vmap": "batch", "forces": "batch", "hessians": "batch"}


# -- timing -------------------------------------------------------------------------


def _run(fn: Call, number: int) -> float:
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


def _calibrate(fn: Call, min_time: float, warmup: bool) -> int:
    """How many calls of ``fn`` last at least ``min_time`` seconds together."""
    if warmup:  # first-call costs (imports, probes, caches) are not measured
        fn()
    number = 1
    while True:
        elapsed = _run(fn, number)
        if elapsed >= min_time or number >= 1 << 20:
            return number
        number = max(number * 2, int(number * min_time / max(elapsed, 1e-9) * 1.2))


def compare(
    fns: Mapping[str, Call],
    *,
    repeats: int = 7,
    min_time: float = 0.05,
    warmup: bool = True,
) -> Dict[str, List[float]]:
    """Time several callables side by side; seconds per call, one per repeat.

    Each callable is calibrated once, so that one sample lasts at least
    ``min_time``; then every repeat times each callable once, in an order
    that rotates and reverses from repeat to repeat (A B, B A, B A, A B, ...),
    so that drift in the machine's speed falls on all of them alike.

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
        caller already has.

    Returns
    -------
    dict of str to list of float
        Per name, the seconds per call of each repeat, in repeat order.
    """
    names = list(fns)
    numbers = {name: _calibrate(fns[name], min_time, warmup) for name in names}
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        order = names[shift:] + names[:shift]
        if (rep // len(names)) % 2:
            order.reverse()
        for name in order:
            times[name].append(_run(fns[name], numbers[name]) / numbers[name])
    return times


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over repeats of ``a[i] / b[i]``, for samples taken side by side."""
    return statistics.median(x / y for x, y in zip(a, b))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide functorch's deprecation notice while timing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# -- workloads ----------------------------------------------------------------------


def dense_problem(n: int, m: Optional[int] = None) -> Tuple[Callable[[Any], Any], Any]:
    """``f(x) = tanh(W x) * sum(x**2)`` and ``x`` of size ``n``; ``W`` is ``m x n``.

    The Jacobian is dense and one backward pass costs about one forward pass.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(m or n, n, generator=gen, dtype=torch.float64) / n**0.5

    def f(t: Any) -> Any:
        return torch.tanh(w @ t) * (t * t).sum()

    return f, x


def pair_energy(pos: Any) -> Any:
    """``sum 1 / sqrt(1 + r_ij**2)`` over all pairs of one ``(atoms, 3)`` geometry."""
    diff = pos.unsqueeze(0) - pos.unsqueeze(1)
    return (diff * diff).sum(-1).add(1.0).rsqrt().sum()


def lennard_jones(pos: Any) -> Any:
    """The Lennard-Jones energy (``sigma = epsilon = 1``) of one ``(atoms, 3)`` geometry."""
    import torch

    i, j = torch.triu_indices(pos.shape[0], pos.shape[0], 1)
    d = pos[i] - pos[j]
    inv6 = (d * d).sum(-1).reciprocal().pow(3)
    return 4.0 * (inv6 * inv6 - inv6).sum()


def geometries(batch: int, atoms: int = 8, seed: int = 1) -> Any:
    """``batch`` geometries of ``atoms`` atoms, shape ``(batch, atoms, 3)``.

    Atoms sit on a cubic lattice at about the Lennard-Jones minimum
    (``2**(1/6)``), each displaced by a little noise, so no two come close.
    """
    import torch

    side = math.ceil(atoms ** (1 / 3) - 1e-9)
    r = torch.arange(side, dtype=torch.float64)
    lattice = torch.cartesian_prod(r, r, r)[:atoms] * 2 ** (1 / 6)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, atoms, 3, generator=gen, dtype=torch.float64)
    return lattice + 0.05 * noise


def workload(name: str, size: int) -> Maker:
    """The call to time for workload ``name`` at ``size``, given a backend.

    Parameters
    ----------
    name : str
        One of :data:`WORKLOADS`.
    size : int
        ``n`` for ``jacrev``, the batch for the others.

    Returns
    -------
    callable
        ``make(backend)`` returns a callable with no arguments that applies
        the backend's transforms to the workload's function and input.
    """
    if name == "jacrev":
        f, x = dense_problem(size)
        return lambda b: lambda: b.jacrev(f)(x)
    if name == "vmap":
        xs = geometries(size)
        return lambda b: lambda: b.vmap(pair_energy)(xs)
    if name == "forces":
        xs = geometries(size)
        return lambda b: lambda: b.vmap(b.jacrev(lennard_jones))(xs)
    if name == "hessians":
        xs = geometries(size)
        return lambda b: lambda: b.vmap(b.jacrev(b.jacrev(lennard_jones)))(xs)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def _backends() -> Dict[str, Any]:
    """Every backend that loads here, by name, in automatic order."""
    from .registry import REGISTRY

    with _quiet():
        return {name: REGISTRY.get(name) for name in REGISTRY.available()}


def time_backends(
    name: str,
    size: int,
    *,
    backends: Optional[Mapping[str, Any]] = None,
    repeats: int = 5,
    min_time: float = 0.02,
) -> Dict[str, Any]:
    """Time every backend on one workload at one size, side by side.

    Parameters
    ----------
    name, size
        The workload (see :func:`workload`).
    backends : dict of str to Backend, optional
        Default: every backend that loads here.
    repeats, min_time
        As for :func:`compare`.

    Returns
    -------
    dict
        ``workload``, ``size``, ``backends`` (the names tried), ``seconds``
        (median per call, per backend that ran), ``relative`` (to the
        fastest), ``fastest``, ``max_abs_diff`` (from the first backend's
        result), ``inexact`` (backends whose result is an approximation) and
        ``errors`` (backends that raised, with the error).
    """
    backends = dict(_backends() if backends is None else backends)
    make = workload(name, size)
    fns: Dict[str, Call] = {}
    results: Dict[str, Any] = {}
    errors: Dict[str, str] = {}
    for bname, backend in backends.items():
        call = make(backend)
        try:
            with _quiet():
                results[bname] = call()
        except Exception as exc:  # a backend that cannot run this is reported, not fatal
            errors[bname] = f"{type(exc).__name__}: {exc}"
            continue
        fns[bname] = call
    row: Dict[str, Any] = {
        "workload": name,
        "size": size,
        "backends": list(backends),
        "seconds": {},
        "relative": {},
        "fastest": None,
        "max_abs_diff": {},
        "inexact": [],
        "errors": errors,
    }
    if not fns:
        return row
    with _quiet():
        times = compare(fns, repeats=repeats, min_time=min_time, warmup=False)
    medians = {bname: statistics.median(ts) for bname, ts in times.items()}
    ref = next(iter(results.values()))
    scale = float(ref.abs().max()) or 1.0
    diffs = {bname: float((res - ref).abs().max()) for bname, res in results.items()}
    exact = [bname for bname in medians if diffs[bname] <= EXACT_RTOL * scale]
    best = min(exact or medians, key=medians.__getitem__)
    row.update(
        seconds=medians,
        relative={bname: medians[bname] / medians[best] for bname in medians},
        fastest=best,
        max_abs_diff=diffs,
        inexact=[bname for bname in medians if bname not in exact],
    )
    return row


# -- the short run ------------------------------------------------------------------


def _machine() -> Dict[str, Any]:
    import torch

    from . import __version__

    return {
        "adbackends": __version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _selection() -> Dict[str, Optional[str]]:
    """The backend automatic selection picks here, and the one this process uses."""
    from .errors import BackendError
    from .selection import _auto, _choose

    out: Dict[str, Optional[str]] = {"auto": None, "active": None, "source": None}
    with contextlib.suppress(BackendError):
        out["auto"] = _auto().backend.name
    with contextlib.suppress(BackendError):
        choice = _choose()
        out["active"], out["source"] = choice.backend.name, choice.source
    return out


def run(tiny: bool = False) -> Dict[str, Any]:
    """The short run behind ``adbackends bench``.

    Parameters
    ----------
    tiny : bool
        Tiny sizes and one repeat: checks that everything runs, in a second
        or two; the times mean nothing.

    Returns
    -------
    dict
        ``machine`` (versions, CPU and thread counts), ``selection`` (what
        automatic selection picks here and what this process uses), ``rows``
        (one per workload and size, see :func:`time_backends`) and
        ``summary`` (the sentence :func:`summary` writes).
    """
    if tiny:
        sizes, repeats, min_time = (2, 4), 1, 0.0
    else:
        sizes, repeats, min_time = (8, 256), 3, 0.02
    backends = _backends()
    rows = [
        time_backends(name, size, backends=backends, repeats=repeats, min_time=min_time)
        for name in ("jacrev", "vmap", "forces")
        for size in sizes
    ]
    data: Dict[str, Any] = {"machine": _machine(), "selection": _selection(), "rows": rows}
    data["summary"] = summary(data)
    return data


def _where(row: Mapping[str, Any]) -> str:
    return f"{row['workload']} at {WORKLOADS.get(row['workload'], 'size')} {row['size']}"


def summary(data: Mapping[str, Any]) -> str:
    """One sentence: what auto uses here, which backend is fastest, and by how much.

    The fastest is the backend with the smallest geometric mean of its time
    relative to each row's fastest, among backends that ran every row with
    exact results. The sentence then names how much slower auto's choice is,
    or, when auto's choice is the fastest, the slowest of the others, at the
    row where the gap is largest.
    """
    rows = data["rows"]
    sel = data["selection"]
    # A fallback chain is named "native>fallback": the native backend is what runs.
    chain = (sel["auto"] or "").split(">")
    auto = chain[0] or None
    head = f"auto uses {auto} here" if auto else "auto finds no usable backend here"
    if len(chain) > 1:
        head += f" (falling back to {', then '.join(chain[1:])})"
    if sel["active"] and sel["active"] != sel["auto"]:
        head += f" (this process uses {sel['active']}, chosen by {sel['source']})"
    names = rows[0]["backends"] if rows else []
    full = [n for n in names if all(n in r["seconds"] and n not in r["inexact"] for r in rows)]
    if len(full) < 2:
        return f"{head}; too few backends ran every workload exactly to compare."
    score = {n: math.exp(statistics.mean(math.log(r["relative"][n]) for r in rows)) for n in full}
    best = min(full, key=score.__getitem__)
    if auto in full and auto != best:
        other = auto
    else:  # auto's choice is the fastest: contrast the slowest, built-in backends first
        from .selection import AUTO_ORDER

        rest = [n for n in full if n != best]
        other = max([n for n in rest if n in AUTO_ORDER] or rest, key=score.__getitem__)
    worst = max(rows, key=lambda r: r["seconds"][other] / r["seconds"][best])
    gap = worst["seconds"][other] / worst["seconds"][best]
    return (
        f"{head}; for these workloads {best} is fastest; "
        f"{other} is {_fmt_ratio(gap)}x slower for {_where(worst)}."
    )


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:.2g}" if ratio < 10 else f"{ratio:.0f}"


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _cell(row: Mapping[str, Any], name: str) -> str:
    if name in row["errors"]:
        return "failed"
    if name == row["fastest"]:
        return f"{_fmt_time(row['seconds'][name])}  *  "
    mark = "~x" if name in row["inexact"] else " x"
    return f"{_fmt_time(row['seconds'][name])} {mark}{_fmt_ratio(row['relative'][name]):<3}"


def format_table(data: Mapping[str, Any]) -> str:
    """The short run as text: a table of times per backend, ending with :func:`summary`."""
    mach = data["machine"]
    rows = data["rows"]
    names = rows[0]["backends"] if rows else []
    width = max([len(n) for n in names] + [16])
    head = f"{'workload':<10} {'size':>9}  " + "  ".join(f"{n:>{width}}" for n in names)
    lines = [
        f"adbackends {mach['adbackends']} (torch {mach['torch']}, Python {mach['python']}, "
        f"{mach['cpus']} CPUs, {mach['torch_threads']} torch threads), float64:",
        "  jacrev    f(x) = tanh(W x) * sum(x^2), x of size n",
        "  vmap      pair energy of 8 points, over a batch of geometries",
        "  forces    vmap(jacrev(Lennard-Jones energy)), 8 atoms, over a batch",
        "time per call (median); * fastest, xR = R times the fastest's time,",
        "~ an approximation (differs from the first backend's result)",
        "",
        head,
        "-" * len(head),
    ]
    for row in rows:
        size = f"{WORKLOADS.get(row['workload'], '')} {row['size']}"
        cells = "  ".join(f"{_cell(row, n):>{width}}" for n in names)
        lines.append(f"{row['workload']:<10} {size:>9}  {cells}")
    for row in rows:
        for name, why in row["errors"].items():
            lines.append(f"{name} failed for {_where(row)}: {why}")
    lines += ["", data["summary"]]
    return "\n".join(lines)
