"""Transforms within a memory budget: ``chunk_size="auto"``, a memory limit, out of memory.

A *memory limit* bounds what one transform call allocates beyond what
exists when it starts (its inputs, the model's parameters). It is set with
:func:`set_max_memory` for the process, :func:`memory_limit` for a ``with``
block (this thread or asyncio task), or the environment variable
``TAD_AD_MAX_MEMORY`` (read lazily, at each call, never at import), innermost
first. Sizes are bytes as an int or a string with a unit: ``"512MiB"``,
``"2GiB"``, ``"1.5GB"``.

``jacrev``, ``jacfwd``, ``hessian`` and ``vmap`` then compute in chunks (of
Jacobian rows, basis directions or batch samples) chosen from a measurement:
the first call for a function and input shapes runs one row, then a chunk
that is safe by that measurement, fits a line (fixed cost plus cost per row)
through the two peaks, and runs the rest with the largest chunk the line
keeps under the limit. The chunk is remembered per function, transform,
input shapes and limit, so later calls run at once, without measuring.

Peak memory is measured on CPU by counting the bytes of every storage that
the call's operations create while it runs (a ``TorchDispatchMode`` with
weak references to the storages, freed bytes subtracted when a storage
dies), and on CUDA with ``torch.cuda.max_memory_allocated``. Where this torch
cannot count storages (torch 1.12 and 1.13: see :func:`cpu_meter_problem`),
a limit in force for a call on CPU tensors that has no chunk remembered
raises :class:`~adbackends.CapabilityError` instead of running unmeasured.

Without a limit, ``chunk_size="auto"`` runs the backend's unchunked
transform. Whenever the layer runs (``"auto"``, or a limit), an
out-of-memory error (``torch.OutOfMemoryError``, CUDA's, or the CPU
allocator's ``can't allocate memory``) is retried with half the chunk after
freeing memory, down to one row; the chunk that worked is remembered and one
:class:`MemoryWarning` per function says what ran and which limit would
have chosen it from the start. When one row at a time still does not fit,
the error propagates: a single backend raises it, and under a chain
(``torch.func>loop``) the native backend's refusal (kind
``"out_of_memory"``) sends the call to the fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import math
import os
import re
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from ._shared import ArgNums, basis_rows, batch_size, external_stacklevel, normalize_argnums

__all__ = [
    "ENV_VAR",
    "ChunkChoice",
    "MemoryWarning",
    "auto_backend",
    "chunk_choices",
    "cpu_meter_problem",
    "forget_chunks",
    "is_out_of_memory",
    "max_memory",
    "memory_limit",
    "parse_size",
    "set_max_memory",
]

#: The environment variable with the default memory limit.
ENV_VAR = "TAD_AD_MAX_MEMORY"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}
_NO_LIMIT = ("none", "unlimited", "inf")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?\s*([a-z]*)")
_SAFETY = 0.85  # of the room left: the line through two measurements is an estimate


class MemoryWarning(UserWarning):
    """A transform ran out of memory and was computed in smaller chunks instead."""


def parse_size(value: Any, what: str = "max_memory") -> Optional[int]:
    """Bytes from ``value``: an int, or a string such as ``"2GiB"``; ``None`` is no limit.

    ``K``/``KiB``, ``M``/``MiB``, ``G``/``GiB``, ``T``/``TiB`` are powers of
    1024; ``KB``, ``MB``, ``GB``, ``TB`` powers of 1000; case does not
    matter. ``"none"`` and ``"unlimited"`` mean no limit.

    Examples
    --------
    >>> from adbackends._memory import parse_size
    >>> parse_size("2GiB"), parse_size("1.5 MB"), parse_size(4096), parse_size("unlimited")
    (2147483648, 1500000, 4096, None)
    >>> parse_size("2 parsecs")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: max_memory='2 parsecs' is not a memory size: unknown unit 'parsecs'; ...
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(
            f"{what} must be a number of bytes (int), a size string such as '2GiB', or None; "
            f"got {type(value).__name__}"
        )
    hint = (
        "write bytes as an int or a number with one of the units B, K, KiB, KB, M, MiB, MB, "
        "G, GiB, GB, T, TiB, TB ('512MiB', '2GiB'), or 'none' for no limit"
    )
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _NO_LIMIT:
            return None
        match = _SIZE.fullmatch(text)
        if match is None:
            raise ValueError(f"{what}={value!r} is not a memory size; {hint}")
        number, exponent, unit = match.groups()
        if unit not in _UNITS:
            raise ValueError(
                f"{what}={value!r} is not a memory size: unknown unit {unit!r}; {hint}"
            )
        amount = float(number) * (10.0 ** int(exponent or 0)) * _UNITS[unit]
    else:
        amount = float(value)
    if not math.isfinite(amount):
        return None
    if amount < 1:
        raise ValueError(f"{what}={value!r} must be at least one byte; {hint}")
    return int(amount)


def format_size(size: Optional[float]) -> str:
    """``size`` bytes for a reader: ``"1.5 GiB"``; ``None`` is ``"no limit"``."""
    if size is None:
        return "no limit"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


# -- the limit ----------------------------------------------------------------------------

_UNSET: Any = object()
_process: Any = _UNSET
_context: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "adbackends_max_memory", default=_UNSET
)
_env_cache: Tuple[Optional[str], Optional[int]] = (None, None)


def set_max_memory(limit: Any) -> Optional[int]:
    """Set the memory limit for the whole process; returns it in bytes.

    ``limit`` is bytes (int) or a size string (``"2GiB"``); ``"none"`` means
    no limit even where ``TAD_AD_MAX_MEMORY`` sets one, and ``None`` forgets
    the setting so that the environment variable applies again.

    Examples
    --------
    >>> import adbackends
    >>> adbackends.set_max_memory("256MiB")
    268435456
    >>> adbackends.set_max_memory(None)
    """
    global _process
    if limit is None:
        _process = _UNSET
        return None
    _process = parse_size(limit)
    return _process  # type: ignore[no-any-return]


@contextlib.contextmanager
def memory_limit(limit: Any) -> Iterator[Optional[int]]:
    """A memory limit inside a ``with`` block, for this thread or asyncio task.

    ``limit`` is as for :func:`set_max_memory`; ``None`` here means no limit
    inside the block. Blocks nest; leaving one restores what was before.

    Examples
    --------
    >>> import torch, adbackends
    >>> with adbackends.memory_limit("64MiB"):
    ...     jac = adbackends.jacrev(torch.sin)(torch.zeros(3))
    >>> jac.shape
    torch.Size([3, 3])
    """
    value = parse_size(limit)
    token = _context.set(value)
    try:
        yield value
    finally:
        _context.reset(token)


# CPython's os.environ keeps its values in a dict that every assignment
# through os.environ updates: read it directly where it exists (tens of ns
# instead of half a microsecond, on every call), the public way elsewhere.
_ENV_DATA: Optional[Dict[Any, Any]] = getattr(os.environ, "_data", None)
_ENV_KEY: Any = None
if _ENV_DATA is not None:
    try:
        _ENV_KEY = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
    except AttributeError:  # not CPython's os.environ
        _ENV_DATA = None


def _env_raw() -> Optional[str]:
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return None if raw is None else os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    return os.environ.get(ENV_VAR)


def _env_set() -> bool:
    if _ENV_DATA is not None:
        return _ENV_KEY in _ENV_DATA
    return ENV_VAR in os.environ


def limited() -> bool:
    """Whether any limit may be in force (cheap: for building transforms)."""
    return _context.get() is not _UNSET or _process is not _UNSET or _env_set()


def max_memory() -> Optional[int]:
    """The memory limit in force here, in bytes, or ``None`` for none."""
    return _limit()[0]


def _limit() -> Tuple[Optional[int], str]:
    """The limit and where it comes from (the hot path of every "auto" call)."""
    value = _context.get()
    if value is not _UNSET:
        return value, "memory_limit()"
    if _process is not _UNSET:
        return _process, "set_max_memory()"
    raw = _env_raw()
    if not raw or raw.isspace():
        return None, "none set"
    global _env_cache
    if _env_cache[0] != raw:
        _env_cache = (raw, parse_size(raw, ENV_VAR))
    return _env_cache[1], ENV_VAR


def describe_limit() -> Dict[str, Any]:
    """The limit and its source, as plain data (for the report)."""
    try:
        value, source = _limit()
    except (TypeError, ValueError) as exc:
        return {"max_memory": None, "source": ENV_VAR, "error": str(exc)}
    return {"max_memory": value, "text": format_size(value), "source": source}


def report() -> Dict[str, Any]:
    """The limit, its source and the chunks chosen so far, as plain data (the report)."""
    data = describe_limit()
    data["chunks"] = [choice._asdict() for choice in chunk_choices()]
    return data


def format_report(data: Optional[Dict[str, Any]]) -> List[str]:
    """The report's lines about memory: the limit and each chunk chosen."""
    if not data:
        return []
    if data.get("error"):
        return [f"Memory limit: invalid {ENV_VAR}: {data['error']}"]
    lines = [f"Memory limit: {data['text']} (source: {data['source']})"]
    for choice in data.get("chunks", ()):
        peak = f", measured peak {format_size(choice['peak'])}" if choice["peak"] else ""
        why = (
            "after running out of memory"
            if choice["reason"] == "out_of_memory"
            else (f"for max_memory={format_size(choice['limit'])}")
        )
        lines.append(
            f"  {choice['transform']}({choice['function']}) on {choice['backend']}, inputs "
            f"{choice['shapes']}: chunk_size={choice['chunk']} of {choice['units']} {why}{peak}"
        )
    return lines


# -- measuring peak memory ----------------------------------------------------------------


class _Meter:
    """Bytes allocated since the meter started: now and at the peak."""

    def now(self) -> int:
        raise NotImplementedError

    def peak(self) -> int:
        raise NotImplementedError

    def reset_peak(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


_mode_class: Any = None


def _cpu_meter() -> _Meter:
    """A meter counting storages created by operations (any device, CPU included)."""
    global _mode_class
    if _mode_class is None:
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class StorageMeter(TorchDispatchMode, _Meter):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.live: Dict[int, int] = {}
                self.current = 0
                self.highest = 0

            def now(self) -> int:
                return self.current

            def peak(self) -> int:
                return self.highest

            def reset_peak(self) -> None:
                self.highest = self.current

            def _free(self, key: int) -> None:
                self.current -= self.live.pop(key, 0)

            def __torch_dispatch__(
                self, func: Any, types: Any, args: Any = (), kwargs: Any = None
            ) -> Any:
                out = func(*args, **(kwargs or {}))
                leaves = tree_flatten(out)[0]
                inputs = None
                for leaf in leaves:
                    if not isinstance(leaf, torch.Tensor):
                        continue
                    try:
                        storage = leaf.untyped_storage()
                        nbytes = storage.nbytes()
                        key = storage.data_ptr()
                    except (RuntimeError, NotImplementedError):  # no plain storage
                        continue
                    if nbytes == 0 or key in self.live:
                        continue
                    if inputs is None:  # an output that is an input or a view of one
                        inputs = set()
                        for a in tree_flatten((args, kwargs))[0]:
                            if isinstance(a, torch.Tensor):
                                try:
                                    inputs.add(a.untyped_storage().data_ptr())
                                except (RuntimeError, NotImplementedError):
                                    pass
                    if key in inputs:
                        continue
                    self.live[key] = nbytes
                    self.current += nbytes
                    if self.current > self.highest:
                        self.highest = self.current
                    weakref.finalize(storage, self._free, key)
                return out

        _mode_class = StorageMeter
    return _mode_class()  # type: ignore[no-any-return]


class _CudaMeter(_Meter):
    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = torch.cuda
        self.device = device
        self.start = 0

    def __enter__(self) -> _CudaMeter:
        self.cuda.synchronize(self.device)
        self.start = self.cuda.memory_allocated(self.device)
        self.cuda.reset_peak_memory_stats(self.device)
        return self

    def now(self) -> int:
        return int(self.cuda.memory_allocated(self.device)) - self.start

    def peak(self) -> int:
        return int(self.cuda.max_memory_allocated(self.device)) - self.start

    def reset_peak(self) -> None:
        self.cuda.reset_peak_memory_stats(self.device)


_cpu_problem: Any = _UNSET


def cpu_meter_problem() -> Optional[str]:
    """Why peak memory on CPU cannot be measured with this torch; ``None`` where it can.

    Checked once, on first use, by what the meter needs rather than by a
    version number: ``Tensor.untyped_storage()``, a ``TorchDispatchMode``
    that a ``with`` statement enters, a storage's Python object that lives
    exactly as long as its tensor's data, and a meter that counts a known
    allocation. torch 1.12 and 1.13 lack the first (1.12 the second too);
    torch 2.1 and later have all of them.

    Examples
    --------
    >>> from adbackends._memory import cpu_meter_problem
    >>> reason = cpu_meter_problem()
    >>> reason is None or isinstance(reason, str)
    True
    """
    global _cpu_problem
    if _cpu_problem is _UNSET:
        import torch

        stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
        if stack is not None and stack() > 0:
            # Another dispatch mode (fake tensors, a tracer) would see the trial
            # tensors: answer by attributes alone, and check fully next time.
            return _check_cpu_meter(trial=False)
        _cpu_problem = _check_cpu_meter()
    return _cpu_problem  # type: ignore[no-any-return]


def _check_cpu_meter(trial: bool = True) -> Optional[str]:
    import weakref

    import torch

    here = f"torch {torch.__version__}"
    if not hasattr(torch.Tensor, "untyped_storage"):
        return f"{here} has no Tensor.untyped_storage(), by which the meter tells storages apart"
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError:
        return f"{here} has no TorchDispatchMode, by which the meter sees each allocation"
    if not hasattr(TorchDispatchMode, "__enter__"):
        return f"{here}'s TorchDispatchMode cannot be entered with a with statement"
    if not trial:
        return None
    tensor = torch.empty(4)
    storage = tensor.untyped_storage()
    ref = weakref.ref(storage)
    del storage
    if ref() is None:
        return (
            f"{here} does not keep a storage's Python object while its tensor lives, so the "
            "meter cannot tell when a storage is freed"
        )
    try:
        with _cpu_meter() as meter:
            block = torch.empty(256, dtype=torch.float32)
            held = meter.now()
            del block
            counted = (held, meter.now())
    except Exception as exc:  # a dispatch mode this torch runs differently
        return f"the storage meter does not run on {here}: {type(exc).__name__}: {exc}"
    if counted != (1024, 0):
        return (
            f"the storage meter miscounts on {here}: {counted[0]} bytes held and "
            f"{counted[1]} after the free, for a 1024-byte tensor"
        )
    return None


def no_meter_error(backend: str, what: str, limit: Optional[int], problem: str) -> Exception:
    """The error for a memory limit on CPU tensors where no CPU meter works."""
    from .errors import CapabilityError

    return CapabilityError(
        backend,
        "cpu_memory_meter",
        f"{problem}; so no chunk can be chosen to keep {what} under the limit. What works "
        "here: no limit (chunk_size='auto' then runs unchunked and halves its chunk when the "
        "allocator refuses), an int chunk_size=, CUDA tensors (whose allocator statistics "
        "are the meter), the 'loop' backend (one row at a time), or torch >= 2.1",
        detail=f"max_memory={format_size(limit)} for CPU tensors",
    )


def meter_for(leaves: List[Any]) -> Optional[_Meter]:
    """The meter for a call on these tensors: CUDA's statistics, else the storage count.

    ``None`` where this torch has no CPU meter; :func:`cpu_meter_problem` says why.
    """
    for leaf in leaves:
        device = getattr(leaf, "device", None)
        if device is not None and device.type == "cuda":
            return _CudaMeter(device)
    if cpu_meter_problem() is not None:
        return None
    return _cpu_meter()


@contextlib.contextmanager
def measure() -> Iterator[_Meter]:
    """Measure the peak bytes allocated on CPU inside the block (``meter.peak()``).

    The measurement the chunk choice uses, for tests and benchmarks. Raises
    :class:`~adbackends.CapabilityError` where :func:`cpu_meter_problem` says
    this torch has none.
    """
    problem = cpu_meter_problem()
    if problem is not None:
        raise no_meter_error("adbackends", "a measured block", None, problem)
    meter = _cpu_meter()
    with meter:
        yield meter


def _storage_bytes(tensor: Any) -> int:
    """The bytes of a tensor just made by ``new_empty`` (contiguous, its own storage)."""
    return int(tensor.numel() * tensor.element_size())


# -- out of memory ------------------------------------------------------------------------

_OOM_TEXT = ("can't allocate memory", "CUDA out of memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (CUDA or CPU)."""
    import torch

    kind = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if kind is not None and isinstance(exc, kind):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    try:
        text = str(exc)
    except Exception:
        return False
    return any(fragment in text for fragment in _OOM_TEXT)


def _free_memory() -> None:
    """Give back what a failed attempt held before the retry."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- what was chosen ----------------------------------------------------------------------


class ChunkChoice(NamedTuple):
    """One chunk chosen for a function, as :func:`chunk_choices` lists it.

    Attributes
    ----------
    function, transform, backend : str
        The function's name, the transform and the backend that ran it.
    shapes : str
        The input shapes it was chosen for.
    units : int
        The rows (jacrev, hessian), directions (jacfwd) or samples (vmap).
    chunk : int
        The chunk chosen.
    limit : int or None
        The limit it was chosen for (``None``: after an out-of-memory error).
    peak : int or None
        The peak bytes measured while choosing, ``None`` where not measured.
    reason : str
        ``"limit"`` or ``"out_of_memory"``.
    """

    function: str
    transform: str
    backend: str
    shapes: str
    units: int
    chunk: int
    limit: Optional[int]
    peak: Optional[int]
    reason: str


_chunks: Dict[Tuple[Any, ...], ChunkChoice] = {}
_CHUNKS_MAX = 4096
_warned: set = set()
_oom_keys: set = set()  # (function, transform) with a chunk remembered after an OOM
_lock = threading.Lock()


class _Depth(threading.local):
    depth = 0  # chunked calls running in this thread: inner transforms run whole


_running = _Depth()


def chunk_choices() -> List[ChunkChoice]:
    """The chunks chosen so far in this process, per function, transform and shapes.

    Examples
    --------
    >>> import adbackends
    >>> adbackends.forget_chunks()
    >>> adbackends.chunk_choices()
    []
    """
    with _lock:
        return list(_chunks.values())


def forget_chunks() -> None:
    """Forget every chunk chosen (and the warnings given): the next calls measure again."""
    with _lock:
        _chunks.clear()
        _warned.clear()
        _oom_keys.clear()


def reset() -> None:
    """Forget the chunks chosen, the backends made automatic and the process-wide limit."""
    global _process
    forget_chunks()
    with _lock:
        _auto_backends.clear()
        _process = _UNSET


def _identity(func: Any) -> Any:
    marker = getattr(func, "__adbackends_chain__", None)  # a chain's transform wrapper
    if marker is not None:
        return marker[0]
    code = getattr(func, "__code__", None)
    if code is not None:
        return code
    inner = getattr(func, "__func__", None) or getattr(func, "func", None)
    if inner is not None and inner is not func:
        return ("wrapped", _identity(inner))
    try:
        hash(func)
    except TypeError:
        return type(func)
    return func


def _label(func: Any) -> str:
    marker = getattr(func, "__adbackends_chain__", None)
    if marker is not None:
        return f"{marker[1]}({_label(marker[2])})"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return str(name) if name else type(func).__name__


def _shape_key(leaves: List[Any]) -> Tuple[Any, ...]:
    return tuple(
        (tuple(leaf.shape), leaf.dtype, leaf.device)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
        else type(leaf)
        for leaf in leaves
    )


def _inside_transform() -> bool:
    """Inside a native transform (its tensors are wrapped) or a chunked call: run whole."""
    if _running.depth:
        return True
    try:
        from torch._C._functorch import peek_interpreter_stack
    except ImportError:  # torch < 2.0: functorch's own flag (in torch 1.13, or functorch 0.2)
        return _old_transforms_active()
    return peek_interpreter_stack() is not None


def _old_transforms_active() -> bool:
    import sys

    import torch

    active = getattr(getattr(torch._C, "_functorch", None), "are_transforms_active", None)
    if active is None:  # functorch 0.2 (torch 1.12): no transform runs unless it is imported
        module = sys.modules.get("functorch._C")
        active = getattr(module, "are_transforms_active", None)
    return bool(active()) if active is not None else False


class _Plan:
    """Runs ``run(start, stop)`` over ``units`` in chunks within the limit."""

    def __init__(
        self,
        transform: str,
        func: Any,
        backend: str,
        key: Tuple[Any, ...],
        leaves: List[Any],
        limit: Optional[int],
        oom: bool,
    ) -> None:
        self.transform = transform
        self.func = func
        self.backend = backend
        self.key = key
        self.leaves = leaves
        self.limit = limit
        self.oom = oom  # the unchunked call ran out of memory
        self.meter: Optional[_Meter] = None
        self.known = _chunks.get(key)
        self.kept = 0  # bytes that run() allocated to keep (the result), not per chunk

    def start(self) -> Optional[_Meter]:
        if self.known is None:
            self.meter = meter_for(self.leaves)
            problem = cpu_meter_problem() if self.meter is None else None
            if problem is not None and self.limit is not None and not self.oom:
                # Never run unmeasured under a limit the user set.
                what = f"{self.transform}({_label(self.func)})"
                raise no_meter_error(self.backend, what, self.limit, problem)
        return self.meter

    def run(self, units: int, run: Callable[[int, int], None], extra_per_unit: int = 0) -> None:
        """All ``units`` through ``run``, measuring on the first call."""
        if units == 0:
            run(0, 0)
            return
        meter = self.meter
        start = 0
        if self.known is not None:
            chunk = self.known.chunk
        elif self.oom or self.limit is None or meter is None:
            chunk = max(1, units // 2)
        else:
            start, chunk = self._probe(run, units, meter, self.limit)
        chunk = self._all(run, start, units, chunk)
        self._remember(units, chunk)

    def _probe(
        self, run: Callable[[int, int], None], units: int, meter: _Meter, limit: int
    ) -> Tuple[int, int]:
        """Run growing chunks (1, then at most 4 times the last), measuring each.

        A line through the last two (chunk, peak) points says which chunk
        fits in the room left; the chunks grow towards it, at most fourfold
        a step, so that an underestimate from a small chunk is caught before
        it costs much. Returns where the rest starts and the chunk for it.
        """
        points: List[Tuple[int, int]] = []
        start, size = 0, 1
        room = 0.0
        while True:
            before = meter.now()
            meter.reset_peak()
            kept = self.kept
            run(start, start + size)
            cost = max(1, meter.peak() - before - (self.kept - kept))
            start += size
            points.append((size, cost))
            room = (limit - meter.now()) * _SAFETY
            if room <= cost and len(points) == 1:
                self._too_small(cost)
                return start, 1
            if len(points) == 1:
                slope, fixed = float(cost), 0.0
            else:
                (c0, p0), (c1, p1) = points[-2], points[-1]
                slope = (p1 - p0) / (c1 - c0) if c1 != c0 else p1 / c1
                if slope <= 0:
                    slope = p1 / c1
                fixed = max(0.0, p1 - slope * c1)
            fits = max(1, int((room - fixed) // max(slope, 1.0)))
            if fits <= size * 4 or start >= units:
                return start, min(fits, units)
            size = min(size * 4, units - start)
            if size <= points[-1][0]:  # too few left to learn more
                return start, min(fits, units)

    def _all(self, run: Callable[[int, int], None], start: int, units: int, chunk: int) -> int:
        shrunk = False
        while start < units:
            stop = min(units, start + chunk)
            failed = False
            try:
                run(start, stop)
            except Exception as exc:
                if chunk == 1 or not is_out_of_memory(exc):
                    raise
                failed = True
            if failed:  # outside the except block: the traceback's frames are gone
                _free_memory()
                chunk = max(1, min(chunk, stop - start) // 2)
                shrunk = True
                continue
            start = stop
        if shrunk or self.oom:
            self.oom = True
        return chunk

    def _too_small(self, first: int) -> None:
        ident = (_identity(self.func), self.transform, "small")
        if ident in _warned:
            return
        _warned.add(ident)
        warnings.warn(
            f"max_memory={format_size(self.limit)} leaves too little room for "
            f"{self.transform}({_label(self.func)}) on {self.backend}: one row at a time "
            f"needs about {format_size(first)} beyond what the call already holds; it runs "
            f"one row at a time",
            MemoryWarning,
            stacklevel=external_stacklevel(),
        )

    def _remember(self, units: int, chunk: int) -> None:
        from .probes import probing

        if probing():
            return
        peak = self.meter.peak() if self.meter is not None else None
        if self.known is not None and not self.oom:
            return
        reason = "out_of_memory" if self.oom else "limit"
        shapes = ", ".join(
            str(tuple(entry[0])) if isinstance(entry, tuple) else entry.__name__
            for entry in self.key[-1]
        )
        choice = ChunkChoice(
            _label(self.func),
            self.transform,
            self.backend,
            shapes,
            units,
            chunk,
            self.limit,
            peak,
            reason,
        )
        with _lock:
            if len(_chunks) >= _CHUNKS_MAX:
                _chunks.clear()
            _chunks[self.key] = choice
            if self.oom:
                _oom_keys.add(self.key[:2])
        if self.oom:
            self._warn_oom(choice)

    def _warn_oom(self, choice: ChunkChoice) -> None:
        ident = (_identity(self.func), self.transform, "oom")
        if ident in _warned:
            return
        _warned.add(ident)
        avoid = (
            f"a limit of {format_size(choice.peak)} (adbackends.set_max_memory("
            f"{choice.peak}) or {ENV_VAR}={choice.peak}) chooses a chunk that fits from "
            f"the start"
            if choice.peak
            else f"a memory limit (adbackends.set_max_memory or {ENV_VAR}) chooses a chunk "
            f"that fits from the start"
        )
        warnings.warn(
            f"{self.backend} ran out of memory in {self.transform}({choice.function}) for "
            f"inputs of shapes {choice.shapes}; it ran with chunk_size={choice.chunk} of "
            f"{choice.units} instead, and later calls with these shapes do too. {avoid}.",
            MemoryWarning,
            stacklevel=external_stacklevel(),
        )


# -- the transforms -----------------------------------------------------------------------


def _flat(tree: Any) -> Tuple[List[Any], Any]:
    from torch.utils._pytree import tree_flatten

    return tree_flatten(tree)  # type: ignore[no-any-return]


def _unflat(leaves: List[Any], spec: Any) -> Any:
    from torch.utils._pytree import tree_unflatten

    return tree_unflatten(leaves, spec)


class _Chunked:
    """A transform that runs whole without a limit and in measured chunks within one."""

    def __init__(self, backend: Any, transform: str, func: Any, whole: Any, params: Any) -> None:
        self.backend = backend
        self.transform = transform
        self.func = func
        self.whole = whole
        self.params = params
        self.ident = (_identity(func), transform)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        limit = _limit()[0]
        if (limit is None and not _oom_keys) or _inside_transform():
            try:
                return self.whole(*args, **kwargs)
            except Exception as exc:
                if limit is not None or _inside_transform() or not is_out_of_memory(exc):
                    raise
                # Drop this frame's hold on the failed attempt before retrying.
                del exc
            _free_memory()
            return self._chunked(args, kwargs, None, oom=True)
        leaves = _flat((args, kwargs))[0]
        key = (*self.ident, self.params, limit, _shape_key(leaves))
        if limit is None:
            known = _chunks.get(key)
            if known is None:  # no chunk remembered for these shapes: try whole
                key = (*self.ident, self.params, None, _shape_key(leaves))
                try:
                    return self.whole(*args, **kwargs)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    del exc
                _free_memory()
                return self._chunked(args, kwargs, None, oom=True, key=key, leaves=leaves)
        return self._chunked(args, kwargs, limit, oom=False, key=key, leaves=leaves)

    def _chunked(
        self,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        limit: Optional[int],
        oom: bool,
        key: Any = None,
        leaves: Any = None,
    ) -> Any:
        if leaves is None:
            leaves = _flat((args, kwargs))[0]
        if key is None:
            key = (*self.ident, self.params, limit, _shape_key(leaves))
        plan = _Plan(self.transform, self.func, self.backend.name, key, leaves, limit, oom)
        meter = plan.start()
        _running.depth += 1
        try:
            with meter if meter is not None else contextlib.nullcontext():
                return self.compute(plan, args, kwargs)
        finally:
            _running.depth -= 1

    def compute(self, plan: _Plan, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        raise NotImplementedError


def _assemble(
    blocks_per_primal: List[List[Any]], primals_spec: Any, output_spec: Any, argnums: ArgNums
) -> Any:
    """torch.func's Jacobian structure: the output's tree of (per-argnum) primal trees."""
    per_output = [_unflat(list(blocks), primals_spec) for blocks in zip(*blocks_per_primal)]
    if not isinstance(argnums, tuple):
        per_output = [jac[0] for jac in per_output]
    return _unflat(per_output, output_spec)


class _Jacrev(_Chunked):
    """Reverse mode: one vjp, then ``vmap(vjp_fn)`` over chunks of basis rows."""

    def __init__(
        self,
        backend: Any,
        transform: str,
        func: Any,
        whole: Any,
        inner: Any,
        argnums: Any,
        has_aux: bool,
    ) -> None:
        super().__init__(backend, transform, func, whole, (argnums, has_aux))
        self.inner = inner  # the function differentiated: func, or its jacrev for hessian
        self.argnums = argnums
        self.has_aux = has_aux

    def compute(self, plan: _Plan, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if kwargs:
            return self.whole(*args, **kwargs)  # as torch.func: its own error
        backend, argnums, has_aux, func = self.backend, self.argnums, self.has_aux, self.inner
        positions = normalize_argnums(argnums, len(args))

        def partial(*primals: Any) -> Any:
            full = list(args)
            for pos, value in zip(positions, primals):
                full[pos] = value
            return func(*full)

        primals = tuple(args[pos] for pos in positions)
        aux = None
        if has_aux:
            output, vjp_fn, aux = backend.vjp(partial, *primals, has_aux=True)
        else:
            output, vjp_fn = backend.vjp(partial, *primals)
        flat_output, output_spec = _flat(output)
        flat_primals, primals_spec = _flat(primals)
        numels = [out.numel() for out in flat_output]
        total = sum(numels)
        if total == 0:
            return self.whole(*args)
        results: List[Any] = []
        rows_vjp = backend.vmap(vjp_fn)

        def run(start: int, stop: int) -> None:
            basis = basis_rows(flat_output, start, stop)
            rows = _flat(rows_vjp(_unflat(basis, output_spec)))[0]
            if not results:  # allocated after the rows: not part of a chunk's cost
                for row, primal in zip(rows, flat_primals):
                    results.append(row.new_empty((total, *primal.shape)))
                    plan.kept += _storage_bytes(results[-1])
            for result, row in zip(results, rows):
                result[start:stop].copy_(row)
            del rows, basis

        plan.run(total, run)
        per_primal = [
            [
                part.view(tuple(out.shape) + tuple(primal.shape))
                for part, out in zip(result.split(numels, dim=0), flat_output)
            ]
            for result, primal in zip(results, flat_primals)
        ]
        jacobian = _assemble(per_primal, primals_spec, output_spec, argnums)
        return (jacobian, aux) if has_aux else jacobian


class _Jacfwd(_Chunked):
    """Forward mode: ``vmap`` of one jvp over chunks of input basis directions."""

    def __init__(
        self, backend: Any, func: Any, whole: Any, argnums: Any, has_aux: bool, randomness: str
    ) -> None:
        super().__init__(backend, "jacfwd", func, whole, (argnums, has_aux, randomness))
        self.argnums = argnums
        self.has_aux = has_aux
        self.randomness = randomness

    def compute(self, plan: _Plan, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if kwargs:
            return self.whole(*args, **kwargs)
        backend, argnums, has_aux, func = self.backend, self.argnums, self.has_aux, self.func
        positions = normalize_argnums(argnums, len(args))
        primals = tuple(args[pos] for pos in positions)
        flat_primals, primals_spec = _flat(primals)
        in_numels = [p.numel() for p in flat_primals]
        total = sum(in_numels)
        if total == 0:
            return self.whole(*args)

        def partial(*values: Any) -> Any:
            full = list(args)
            for pos, value in zip(positions, values):
                full[pos] = value
            return func(*full)

        def push(*tangent_leaves: Any) -> Any:
            tangents = _unflat(list(tangent_leaves), primals_spec)
            result = backend.jvp(partial, primals, tangents, has_aux=has_aux)
            return (result[1], result[2]) if has_aux else result[1]

        mapped = backend.vmap(push, 0, (0, None) if has_aux else 0, self.randomness)
        state: Dict[str, Any] = {}

        def run(start: int, stop: int) -> None:
            basis = basis_rows(flat_primals, start, stop)
            out = mapped(*basis)
            if has_aux:
                out, state["aux"] = out
            leaves, spec = _flat(out)
            if "results" not in state:
                state["spec"] = spec
                state["shapes"] = [tuple(leaf.shape[1:]) for leaf in leaves]
                state["results"] = [leaf.new_empty((leaf[0].numel(), total)) for leaf in leaves]
                plan.kept += sum(_storage_bytes(r) for r in state["results"])
            for result, leaf in zip(state["results"], leaves):
                result[:, start:stop].copy_(leaf.reshape(stop - start, -1).t())
            del out, leaves, basis

        plan.run(total, run)
        per_output = []
        for result, shape in zip(state["results"], state["shapes"]):
            parts = result.split(in_numels, dim=1)
            per_output.append(
                [part.reshape(shape + tuple(p.shape)) for part, p in zip(parts, flat_primals)]
            )
        per_primal = [list(col) for col in zip(*per_output)]
        jacobian = _assemble(per_primal, primals_spec, state["spec"], argnums)
        return (jacobian, state["aux"]) if has_aux else jacobian


class _Vmap(_Chunked):
    """Batches of ``chunk`` samples through the backend's vmap, joined along out_dims."""

    def __init__(
        self, backend: Any, func: Any, whole: Any, in_dims: Any, out_dims: Any, randomness: str
    ) -> None:
        try:
            hash((in_dims, out_dims))
            params: Any = (in_dims, out_dims, randomness)
        except TypeError:
            params = (repr(in_dims), repr(out_dims), randomness)
        super().__init__(backend, "vmap", func, whole, params)
        self.in_dims = in_dims
        self.out_dims = out_dims
        self.randomness = randomness

    def compute(self, plan: _Plan, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        import torch
        from torch.utils._pytree import _broadcast_to_and_flatten

        whole, in_dims = self.whole, self.in_dims
        if not isinstance(in_dims, (int, tuple)) or not args:
            return whole(*args, **kwargs)
        flat_args, args_spec = _flat(args)
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        flat_dims = _broadcast_to_and_flatten(dims, args_spec)
        if flat_dims is None:
            return whole(*args, **kwargs)
        batch = batch_size(flat_args, flat_dims)
        if batch is None:
            return whole(*args, **kwargs)
        if batch == 0:
            return whole(*args, **kwargs)
        rng = torch.get_rng_state() if self.randomness == "same" else None
        outputs: List[Any] = []

        def run(start: int, stop: int) -> None:
            chunk = [
                arg if dim is None else arg.narrow(dim, start, stop - start)
                for arg, dim in zip(flat_args, flat_dims)
            ]
            if rng is not None:
                torch.set_rng_state(rng)
            outputs.append(whole(*_unflat(chunk, args_spec), **kwargs))

        plan.run(batch, run)
        if len(outputs) == 1:
            return outputs[0]
        flat_outputs = [_flat(out) for out in outputs]
        out_spec = flat_outputs[0][1]
        flat_out_dims = _broadcast_to_and_flatten(self.out_dims, out_spec)
        if flat_out_dims is None:
            return whole(*args, **kwargs)  # vmap's own error
        joined = []
        for i, dim in enumerate(flat_out_dims):
            parts = [leaves[i] for leaves, _ in flat_outputs]
            if dim is None:
                joined.append(parts[0])
            else:
                joined.append(torch.cat(parts, dim=dim))
                parts.clear()
        return _unflat(joined, out_spec)


# -- backends whose chunkable transforms are automatic ------------------------------------


class _AutoBackend:
    """A backend whose jacrev, jacfwd, hessian and vmap choose their chunk.

    Everything else is the wrapped backend's. A chain is rebuilt from two of
    these, so its native side retries out-of-memory errors with smaller
    chunks before the chain sends the call to its fallback.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        try:
            native = inner.native() is inner
        except Exception:  # no backend here has native transforms
            native = False
        #: A backend without native transforms (the loop) computes one row or
        #: sample at a time already: its unchunked transforms are the leanest.
        self.chunks = native

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"<adbackends auto chunks on {self.inner!r}>"

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Any = "auto",
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        inner = self.inner
        if chunk_size not in (None, "auto") or not self.chunks:
            chunk_size = None if chunk_size == "auto" else chunk_size
            return inner.jacrev(  # type: ignore[no-any-return]
                func,
                argnums,
                has_aux=has_aux,
                chunk_size=chunk_size,
                _preallocate_and_copy=_preallocate_and_copy,
            )
        whole = inner.jacrev(
            func, argnums, has_aux=has_aux, _preallocate_and_copy=_preallocate_and_copy
        )
        return _wrap(_Jacrev(inner, "jacrev", func, whole, func, argnums, has_aux), func)

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Any = "auto",
    ) -> Callable[..., Any]:
        inner = self.inner
        if chunk_size not in (None, "auto") or not self.chunks:
            chunk_size = None if chunk_size == "auto" else chunk_size
            return inner.vmap(  # type: ignore[no-any-return]
                func, in_dims, out_dims, randomness, chunk_size=chunk_size
            )
        whole = inner.vmap(func, in_dims, out_dims, randomness)
        return _wrap(_Vmap(inner, func, whole, in_dims, out_dims, randomness), func)

    def jacfwd(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        has_aux: bool = False,
        *,
        randomness: str = "error",
    ) -> Callable[..., Any]:
        inner = self.inner
        whole = inner.jacfwd(func, argnums, has_aux, randomness=randomness)
        if not self.chunks:
            return whole  # type: ignore[no-any-return]
        return _wrap(_Jacfwd(inner, func, whole, argnums, has_aux, randomness), func)

    def hessian(self, func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
        inner = self.inner
        whole = inner.hessian(func, argnums)
        if not self.chunks:
            return whole  # type: ignore[no-any-return]
        gradient = inner.jacrev(func, argnums)
        return _wrap(_Jacrev(inner, "hessian", func, whole, gradient, argnums, False), func)


def _wrap(chunked: _Chunked, func: Any) -> Callable[..., Any]:
    whole = chunked.whole
    context = _context.get

    @functools.wraps(func)
    def transformed(*args: Any, **kwargs: Any) -> Any:
        # No limit anywhere and no out-of-memory remembered (the usual case):
        # the unchunked transform, at the cost of four lookups.
        if context() is _UNSET and _process is _UNSET and not _oom_keys and not _env_set():
            try:
                return whole(*args, **kwargs)
            except Exception as exc:
                if _inside_transform() or not is_out_of_memory(exc):
                    raise
                del exc  # this frame's hold on the failed attempt
            _free_memory()
            return chunked._chunked(args, kwargs, None, oom=True)
        return chunked(*args, **kwargs)

    return transformed


_auto_backends: Dict[int, Tuple[Any, Any]] = {}


def auto_backend(backend: Any) -> Any:
    """``backend`` with automatic chunks; a chain is rebuilt with both sides automatic."""
    found = _auto_backends.get(id(backend))
    if found is not None and found[0] is backend:
        return found[1]
    # A link of a chain (fallback.LinkedBackend, a higher layer: known by what
    # it offers) is rebuilt in front of both sides made automatic.
    relinked = getattr(backend, "relinked", None)
    native = getattr(backend, "native_backend", None)
    fallback = getattr(backend, "fallback_backend", None)
    if relinked is not None and native is not None and fallback is not None:
        made: Any = relinked(auto_backend(native), auto_backend(fallback))
    else:
        made = _AutoBackend(backend)
    with _lock:
        if len(_auto_backends) >= 64:  # backends rebuilt by refresh(): forget old ones
            _auto_backends.clear()
        _auto_backends[id(backend)] = (backend, made)
    return made


def oom_refusal_fix() -> str:
    """What the out-of-memory refusal tells the user to do."""
    return (
        "pass chunk_size='auto' or set a memory limit (adbackends.set_max_memory('4GiB'), "
        f"adbackends.memory_limit(...) or {ENV_VAR}) so that the native transform computes "
        "in chunks that fit"
    )
