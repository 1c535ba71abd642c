"""Small pieces of logic that built-in backends and plugins would otherwise repeat.

This module imports nothing from the rest of the package (and torch only
inside functions), so every other module may use it. Plugin authors reach
these helpers through :mod:`adbackends.plugin`.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "NOTICES",
    "ArgNums",
    "Notices",
    "basis_rows",
    "batch_size",
    "RngState",
    "check_capability_names",
    "external_stacklevel",
    "native_call",
    "native_call_active",
    "normalize_argnums",
    "preserved_rng",
    "summarize_exception",
]

#: What ``argnums`` may be: one position or a tuple of positions.
ArgNums = Union[int, Tuple[int, ...]]


# -- Jacobian rows --------------------------------------------------------------


def basis_rows(flat_output: Sequence[Any], start: int, stop: int) -> List[Any]:
    """Rows ``start:stop`` of the identity over all output elements, split per output.

    Row ``r`` is the cotangent that picks output element ``r``; each piece has
    its output's dtype, device and shape, with the rows in front.
    """
    import torch

    pieces = []
    offset = 0
    rows = stop - start
    for out in flat_output:
        numel = out.numel()
        piece = out.new_zeros((rows, numel))
        lo, hi = max(start, offset), min(stop, offset + numel)
        if lo < hi:
            idx = torch.arange(lo, hi, device=out.device)
            piece[idx - start, idx - offset] = 1
        pieces.append(piece.view((rows, *out.shape)))
        offset += numel
    return pieces


def batch_size(flat_args: Sequence[Any], flat_dims: Sequence[Any]) -> Optional[int]:
    """The one size of the mapped dimension over the batched arguments, or ``None``.

    ``None`` where an argument with a dimension is not a tensor, a dimension
    is out of range or not an int, or the batched sizes differ or are none:
    the caller then hands the call to the whole transform, for its own error.
    """
    import torch

    sizes = set()
    for arg, dim in zip(flat_args, flat_dims):
        if dim is None:
            continue
        if not isinstance(arg, torch.Tensor) or not isinstance(dim, int):
            return None
        if not -arg.dim() <= dim < arg.dim():
            return None
        sizes.add(arg.size(dim))
    return sizes.pop() if len(sizes) == 1 else None


# -- one-time notices -------------------------------------------------------------


class Notices:
    """The notices given once per process (a deprecation warning, a log line), by key.

    One instance, :data:`NOTICES`, holds them all, so that one
    :meth:`reset` gives every notice again.

    Examples
    --------
    >>> from adbackends._shared import Notices
    >>> notices = Notices()
    >>> notices.first("functorch deprecated"), notices.first("functorch deprecated")
    (True, False)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._given: set = set()

    def first(self, key: Any) -> bool:
        """``True`` the first time ``key`` is asked for (then never again until reset)."""
        if key in self._given:
            return False
        with self._lock:
            if key in self._given:
                return False
            self._given.add(key)
            return True

    def __contains__(self, key: Any) -> bool:
        return key in self._given

    def reset(self) -> None:
        with self._lock:
            self._given.clear()


#: The process's one-time notices.
NOTICES = Notices()


# -- argnums -------------------------------------------------------------------


def _wrap_argnum(argnum: Any, num_args: int) -> int:
    if not isinstance(argnum, int) or isinstance(argnum, bool):
        raise RuntimeError(f"argnum must be int, got: {type(argnum)}")
    if 0 <= argnum < num_args:
        return argnum
    if -num_args <= argnum < 0:
        return argnum + num_args
    raise RuntimeError(f"Got argnum={argnum}, but only {num_args} positional inputs")


def normalize_argnums(argnums: Any, num_args: int) -> Tuple[int, ...]:
    """The non-negative positions ``argnums`` selects among ``num_args`` arguments.

    Checked in torch.func's order, with its exception type and messages, so a
    backend that validates with this raises what ``torch.func.jacrev`` raises.

    Raises
    ------
    RuntimeError
        For a type other than int or tuple of ints, an index out of range, an
        empty tuple or a repeated position.

    Examples
    --------
    >>> from adbackends.plugin import normalize_argnums
    >>> normalize_argnums(-1, 3), normalize_argnums((0, 2), 3)
    ((2,), (0, 2))
    >>> normalize_argnums((0, 0), 2)
    Traceback (most recent call last):
    ...
    RuntimeError: argnums elements must be unique, got (0, 0)
    """
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return (_wrap_argnum(argnums, num_args),)
    if not isinstance(argnums, tuple):
        raise RuntimeError(f"argnums must be int or Tuple[int, ...], got: {type(argnums)}")
    wrapped = tuple(_wrap_argnum(num, num_args) for num in argnums)
    if len(wrapped) == 0:
        raise RuntimeError("argnums must be non-empty")
    if len(set(wrapped)) != len(wrapped):
        raise RuntimeError(f"argnums elements must be unique, got {wrapped}")
    return wrapped


# -- exceptions -----------------------------------------------------------------


def summarize_exception(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, at most ``limit`` characters of message.

    Never raises, even for an exception whose ``str()`` does.

    Examples
    --------
    >>> from adbackends.plugin import summarize_exception
    >>> summarize_exception(ValueError("bad value\\nmore detail"))
    'ValueError: bad value'
    """
    try:
        lines = str(exc).strip().splitlines()
    except Exception:  # an exception whose str() fails still has a type
        lines = []
    first = lines[0].strip() if lines else ""
    if len(first) > limit:
        first = first[: max(limit - 3, 0)] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# -- random number generators ---------------------------------------------------


class RngState:
    """A snapshot of the default generators: CPU, and CUDA once it is initialised.

    Cheap enough to take once per call of a transform (about 1 us): the CPU
    state is read from the default generator, CUDA is asked only whether it is
    initialised (an uninitialised CUDA has drawn nothing), and states are
    compared as raw bytes.

    Examples
    --------
    >>> import torch
    >>> from adbackends.plugin import RngState
    >>> state = RngState()
    >>> a = torch.rand(2)
    >>> state.unchanged()
    False
    >>> state.restore()
    >>> torch.equal(torch.rand(2), a)
    True
    """

    __slots__ = ("cpu", "cuda")

    def __init__(self) -> None:
        import torch

        self.cpu = torch.default_generator.get_state()
        self.cuda: Optional[List[Any]] = None
        if torch.cuda.is_initialized():
            self.cuda = torch.cuda.get_rng_state_all()

    def restore(self) -> None:
        """Put the generators back to the snapshot."""
        import torch

        torch.default_generator.set_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def unchanged(self) -> bool:
        """Whether nothing has drawn from the generators since the snapshot."""
        import torch

        if not _same_bytes(torch.default_generator.get_state(), self.cpu):
            return False
        if self.cuda is not None:
            now = torch.cuda.get_rng_state_all()
            return all(_same_bytes(a, b) for a, b in zip(now, self.cuda))
        return True


def _same_bytes(a: Any, b: Any) -> bool:
    """Equality of two generator states (CPU uint8 tensors); ``torch.equal`` costs more."""
    import torch

    if a.numel() != b.numel() or not (a.is_contiguous() and b.is_contiguous()):
        return bool(torch.equal(a, b))
    from ctypes import string_at

    return string_at(a.data_ptr(), a.numel()) == string_at(b.data_ptr(), b.numel())


@contextlib.contextmanager
def preserved_rng() -> Iterator[RngState]:
    """Restore the default generators on leaving the block, whatever happened inside."""
    state = RngState()
    try:
        yield state
    finally:
        state.restore()


# -- capability declarations ----------------------------------------------------


def check_capability_names(names: Any, known: Any, what: str = "Backend.claims") -> Tuple[str, ...]:
    """``names`` as a tuple, checked to be a collection of known capability names.

    Raises
    ------
    TypeError
        When ``names`` is a str or not a tuple/list/set, or names an unknown
        capability; the message lists the valid names.
    """
    if isinstance(names, str) or not isinstance(names, (tuple, list, set, frozenset)):
        raise TypeError(
            f"{what} must be a tuple of capability names such as ('custom_function',), "
            f"got {names!r}"
        )
    unknown = [c for c in names if c not in known]
    if unknown:
        valid = ", ".join(repr(c) for c in known)
        raise TypeError(f"{what} names unknown capabilities {unknown!r}; valid: {valid}")
    return tuple(names)


# -- where a call comes from ----------------------------------------------------

_PACKAGE_DIR = __file__.rsplit("_shared.py", 1)[0]


def external_stacklevel() -> int:
    """The ``stacklevel`` for :func:`warnings.warn` that names the user's line.

    Counts the frames, from the caller of this function outwards, that belong
    to this package, so a warning points at the first line outside it however
    many of the package's layers (public wrapper, backend, adapter) lie between.
    """
    import sys

    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


# -- which call is being served ---------------------------------------------------

_NATIVE_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "adbackends_native_call", default=False
)


def native_call_active() -> bool:
    """Whether the code running now was called through ``fjacrev``/``fvmap``.

    Hints in error messages use it to name only backends that can serve such
    a call (those with native transforms).
    """
    return _NATIVE_CALL.get()


@contextlib.contextmanager
def native_call() -> Iterator[None]:
    """Mark the block as serving ``fjacrev``/``fvmap``."""
    token = _NATIVE_CALL.set(True)
    try:
        yield
    finally:
        _NATIVE_CALL.reset(token)
