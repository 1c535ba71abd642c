"""Per-call fallback: a native backend where it can, another backend where it must.

A :class:`ChainBackend` joins a *native* backend (torch.func, functorch) and a
*fallback* (usually the loop backend). Each transform it builds runs the
native transform first; when the native backend says, through its
:meth:`~adbackends.Backend.cannot_transform` hook, that it cannot transform
*this* function (``.item()``, data-dependent control flow, a ctx-style
autograd.Function, checkpointing, ...), the same call runs on the fallback.
An error in the function itself is never retried.

Where it falls back: at the outermost transform of a composed call. Inside a
running native transform, an inner transform's refusal propagates out and the
outer call falls back as a whole. Inside a fallback (loop) call the inner
transforms are outermost again, so ``vmap(jacrev(f))`` over a function with
``.item()`` loops over the batch while each ``jacrev`` stays native.

The random number generators are restored before the retry, so
``randomness="same"``/``"different"`` give what the fallback alone gives from
the same seed; for other transforms the snapshot is taken until a function
has once run natively.

Remember and say: the first fallback of a function warns once
(:class:`FallbackWarning`) with the reason and the fix, and logs at INFO;
later calls of the same function (the same code, also through freshly built
transform wrappers) go straight to the fallback. :func:`fallbacks` lists
what fell back and why; :func:`forget_fallbacks` forgets it.

Building is cheap: a chain keeps each transform it built for a plain Python
function on that function (``__adbackends_built__``, at most a few dozen per
function, freed with it), so ``adbackends.vmap(f)(x)`` in a loop builds the
transform once and finds it again.
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from types import FunctionType
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple

from ._shared import ArgNums, RngState, external_stacklevel
from .backend import Backend, Refusal

__all__ = ["ChainBackend", "Fallback", "FallbackWarning", "fallbacks", "forget_fallbacks"]

log = logging.getLogger("adbackends")


class FallbackWarning(UserWarning):
    """A call ran on the fallback backend because the native one cannot transform it.

    Filter it like any warning, e.g. ``warnings.simplefilter("ignore",
    adbackends.FallbackWarning)`` or ``-W ignore::adbackends.FallbackWarning``.
    """


class Fallback(NamedTuple):
    """One function that fell back, as :func:`fallbacks` lists it.

    Attributes
    ----------
    function : str
        The function's qualified name, with the transforms around it
        (``"vmap(jacrev(energy))"``).
    transform : str
        The outermost transform that fell back.
    native, fallback : str
        The backends: the one that could not, and the one that ran it.
    kind, reason, fix : str
        From the native backend's :class:`~adbackends.backend.Refusal`.
    calls : int
        How many calls have gone to the fallback so far.
    """

    function: str
    transform: str
    native: str
    fallback: str
    kind: str
    reason: str
    fix: str
    calls: int


class _Record:
    __slots__ = ("calls", "fallback", "function", "native", "refusal", "transform")

    def __init__(
        self, function: str, transform: str, native: str, fallback: str, refusal: Refusal
    ) -> None:
        self.function = function
        self.transform = transform
        self.native = native
        self.fallback = fallback
        self.refusal = refusal
        self.calls = 0


class _Depth(threading.local):
    depth = 0  # native chain transforms running in this thread
    quiet = 0  # chain fallbacks running in this thread: they have warned already


_running = _Depth()
#: Where a chain keeps the transforms it built for a plain function, on the
#: function itself: they live exactly as long as the function does.
_BUILT = "__adbackends_built__"
_BUILT_MAX = 32  # native chain transforms running in this thread
_memory: Dict[Tuple[Any, ...], _Record] = {}
#: Calls run at once (vjp, jvp, linearize) that have run natively: they skip
#: the generator snapshot from then on.
_native_ok: Set[Tuple[Any, ...]] = set()
_NATIVE_OK_MAX = 4096
_lock = threading.Lock()


def fallbacks() -> List[Fallback]:
    """Every function that fell back in this process, and why.

    Examples
    --------
    >>> import adbackends
    >>> adbackends.forget_fallbacks()
    >>> adbackends.fallbacks()
    []
    """
    with _lock:
        records = list(_memory.values())
    return [
        Fallback(r.function, r.transform, r.native, r.fallback, *r.refusal, r.calls)
        for r in records
    ]


def forget_fallbacks() -> None:
    """Forget every remembered fallback: the next call of each tries the native backend again.

    The warning is then given again on the next fallback.
    """
    with _lock:
        _memory.clear()


# -- identity of a function across freshly built wrappers --------------------------------


def _identity(func: Any) -> Any:
    """What makes two callables "the same function" for remembering a fallback.

    Functions are the same when their code is: ``lambda`` defined on one line
    and rebuilt in a loop is one function. Transform wrappers built by a chain
    carry their own key, which includes the function they wrap.
    """
    marker = getattr(func, "__adbackends_chain__", None)
    if marker is not None:
        return marker[0]
    code = getattr(func, "__code__", None)
    if code is not None:
        return code
    inner = getattr(func, "__func__", None)  # a bound method
    if inner is not None:
        return _identity(inner)
    if isinstance(func, functools.partial):
        return ("partial", _identity(func.func))
    try:
        hash(func)
    except TypeError:
        return type(func)
    return func


def _label(func: Any) -> str:
    marker = getattr(func, "__adbackends_chain__", None)
    if marker is not None:
        _, transform, inner = marker
        return f"{transform}({_label(inner)})"
    if isinstance(func, functools.partial):
        return f"partial({_label(func.func)})"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return str(name) if name else type(func).__name__


# -- the chain ------------------------------------------------------------------------------


class ChainBackend(Backend):
    """A native backend with a per-call fallback, selected as ``"native>fallback"``.

    Examples
    --------
    >>> import torch, adbackends
    >>> chain = adbackends.get("torch.func>loop")  # doctest: +SKIP
    >>> chain.vmap(lambda v: v * v.sum().item())(torch.ones(2, 3))  # doctest: +SKIP
    tensor([[3., 3., 3.],
            [3., 3., 3.]])
    """

    origin = "chain"

    def __init__(self, native: Backend, fallback: Backend) -> None:
        self.native_backend = native
        self.fallback_backend = fallback
        self.name = f"{native.name}>{fallback.name}"
        self._names = (native.name, fallback.name)

    @property
    def version(self) -> str:
        return f"{self.native_backend.version} > {self.fallback_backend.version}"

    def __repr__(self) -> str:
        native, fallback = self.native_backend, self.fallback_backend
        return f"<adbackends chain {self.name!r}: {native!r}, then {fallback!r}>"

    # -- the transforms ---------------------------------------------------------------

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        def make(backend: Backend) -> Callable[..., Any]:
            return backend.jacrev(
                func,
                argnums,
                has_aux=has_aux,
                chunk_size=chunk_size,
                _preallocate_and_copy=_preallocate_and_copy,
            )

        return self._chained(
            "jacrev", func, make, True, (argnums, has_aux, chunk_size, _preallocate_and_copy)
        )

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        def make(backend: Backend) -> Callable[..., Any]:
            return backend.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)

        # With randomness="error" a native vmap raises at the first random
        # draw, so nothing can have drawn before a refusal: no RNG snapshot.
        return self._chained(
            "vmap",
            func,
            make,
            "always" if randomness != "error" else False,
            (in_dims, out_dims, randomness, chunk_size),
        )

    def grad(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        found = self._built("grad", func, (argnums, has_aux))
        if found is not None:
            return found

        def make(backend: Backend) -> Callable[..., Any]:
            return backend.grad(func, argnums, has_aux)

        return self._chained("grad", func, make, True, (argnums, has_aux))

    def grad_and_value(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        found = self._built("grad_and_value", func, (argnums, has_aux))
        if found is not None:
            return found

        def make(backend: Backend) -> Callable[..., Any]:
            return backend.grad_and_value(func, argnums, has_aux)

        return self._chained("grad_and_value", func, make, True, (argnums, has_aux))

    def jacfwd(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        has_aux: bool = False,
        *,
        randomness: str = "error",
    ) -> Callable[..., Any]:
        def make(backend: Backend) -> Callable[..., Any]:
            return backend.jacfwd(func, argnums, has_aux, randomness=randomness)

        # As for vmap: with randomness="error" nothing draws before a refusal.
        return self._chained(
            "jacfwd",
            func,
            make,
            "always" if randomness != "error" else False,
            (argnums, has_aux, randomness),
        )

    def hessian(self, func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
        def make(backend: Backend) -> Callable[..., Any]:
            return backend.hessian(func, argnums)

        return self._chained("hessian", func, make, True, (argnums,))

    # vjp, jvp and linearize run at once: the call itself is chained, without
    # building a transform wrapper first (see _now).

    def vjp(self, func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
        if _running.depth:  # inside a native transform: its outer call decides
            return self.native_backend.vjp(func, *primals, has_aux=has_aux)
        return self._now("vjp", func, primals, {"has_aux": has_aux})

    def jvp(
        self,
        func: Callable[..., Any],
        primals: Any,
        tangents: Any,
        *,
        strict: bool = False,
        has_aux: bool = False,
    ) -> Any:
        if _running.depth:
            return self.native_backend.jvp(func, primals, tangents, strict=strict, has_aux=has_aux)
        return self._now("jvp", func, (primals, tangents), {"strict": strict, "has_aux": has_aux})

    def linearize(self, func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
        if _running.depth:
            return self.native_backend.linearize(func, *primals)
        return self._now("linearize", func, primals, {})  # type: ignore[no-any-return]

    def fjacrev(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """The native backend's: ``fjacrev`` never falls back."""
        return self.native_backend.fjacrev(*args, **kwargs)

    def fvmap(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """The native backend's: ``fvmap`` never falls back."""
        return self.native_backend.fvmap(*args, **kwargs)

    def native(self) -> Backend:
        return self.native_backend.native()

    def cannot_transform(self, exc: BaseException) -> Optional[Refusal]:
        # As the fallback of another chain, this chain has already tried its
        # own fallback; what reaches the outer chain is the last word.
        return self.fallback_backend.cannot_transform(exc)

    # -- the mechanism ------------------------------------------------------------------

    def _built(
        self, transform: str, func: Callable[..., Any], args: Tuple[Any, ...]
    ) -> Optional[Callable[..., Any]]:
        """The transform :meth:`_chained` built and kept on ``func`` for these arguments, if any.

        The lookup :meth:`_chained` starts with, for a caller that would
        otherwise make a builder only to have it found unneeded.
        """
        if type(func) is not FunctionType:
            return None
        built = func.__dict__.get(_BUILT)
        if built is None:
            return None
        try:
            return built.get((self, transform, func, args))  # type: ignore[no-any-return]
        except TypeError:  # unhashable arguments
            return None

    def _chained(
        self,
        transform: str,
        func: Callable[..., Any],
        make: Callable[[Backend], Callable[..., Any]],
        snapshot_rng: Any,
        args: Optional[Tuple[Any, ...]] = None,
    ) -> Callable[..., Any]:
        # Building the transform is on every call's path (adbackends.vmap(f)(x)
        # in a loop): a transform built once for a plain function is kept on
        # the function, keyed by this chain, the transform and its arguments,
        # and found again by the next identical build.
        built: Optional[Dict[Any, Any]] = None
        build_key: Any = None
        if args is not None and type(func) is FunctionType:
            build_key = (self, transform, func, args)
            built = func.__dict__.get(_BUILT)
            if built is not None:
                try:
                    found = built.get(build_key)
                except TypeError:  # unhashable arguments (a list of in_dims)
                    build_key = None
                else:
                    if found is not None:
                        return found  # type: ignore[no-any-return]
        native = self.native_backend
        try:
            native_t = make(native)
        except Exception as exc:
            # The native backend cannot even build this transform (an argument
            # an old functorch lacks): the whole transform is the fallback's.
            refusal = native.cannot_transform(exc)
            if refusal is None:
                raise
            log.info(
                "%s cannot build %s (%s); using %s",
                native.name,
                transform,
                refusal.reason,
                self.fallback_backend.name,
            )
            return make(self.fallback_backend)
        key = (self._names, transform, _identity(func))
        chain = self
        fallback_t: Optional[Callable[..., Any]] = None
        # Until the function has once run natively, each call snapshots the
        # generators so a retry sees the state the native attempt saw. After
        # that the snapshot (about 1 us) is skipped, unless the caller asked
        # for randomness, where it is always taken.
        always_snapshot = snapshot_rng == "always"
        snapshot = bool(snapshot_rng)

        def run_fallback(*args: Any, **kwargs: Any) -> Any:
            nonlocal fallback_t
            if fallback_t is None:
                fallback_t = make(chain.fallback_backend)
            # Inner transforms that fall back in here are remembered, but the
            # user has been told about this function once already.
            _running.quiet += 1
            try:
                return fallback_t(*args, **kwargs)
            finally:
                _running.quiet -= 1

        def call(*args: Any, **kwargs: Any) -> Any:
            running = _running
            if running.depth:  # inside a native transform: its outer call decides
                return native_t(*args, **kwargs)
            record = _memory.get(key) if _memory else None
            if record is not None:
                record.calls += 1
                return run_fallback(*args, **kwargs)
            nonlocal snapshot
            rng = RngState() if snapshot else None
            running.depth = 1
            try:
                result = native_t(*args, **kwargs)
                if not always_snapshot:
                    snapshot = False
                return result
            except Exception as exc:
                refusal = native.cannot_transform(exc)
                if refusal is None:
                    raise
                error = exc
            finally:
                running.depth = 0
            if rng is not None:
                rng.restore()
            _remember(key, call, chain, refusal)
            try:
                return run_fallback(*args, **kwargs)
            except Exception as second:
                _attach(second, error, native.name)
                raise

        call.__adbackends_chain__ = (key, transform, func)  # type: ignore[attr-defined]
        if build_key is not None:
            try:
                if built is None:
                    built = func.__dict__.setdefault(_BUILT, {})
                if len(built) < _BUILT_MAX:
                    built[build_key] = call
            except TypeError:  # unhashable arguments
                pass
        return call

    def _now(
        self,
        transform: str,
        func: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Any:
        """``transform(func, *args, **kwargs)`` run at once, as a :meth:`_chained` call runs it.

        The same steps, for transforms that return results rather than a
        function (vjp, jvp, linearize): the native backend first, with the
        random generators restored and the fallback run where it refuses; a
        function remembered as falling back goes straight to the fallback.
        No wrapper is built, as nothing would keep it. Only called outside
        native transforms (the callers check ``_running.depth``).
        """
        # Nothing remembered (the usual case): no key to make and look up yet.
        key = (self._names, transform, _identity(func)) if _memory else None
        record = _memory.get(key) if key is not None else None
        if record is not None:
            record.calls += 1
            return self._run_fallback(transform, func, args, kwargs)
        native = self.native_backend
        good = (self._names, transform, _identity(func))
        rng = None if good in _native_ok else RngState()
        running = _running
        running.depth = 1
        try:
            result = getattr(native, transform)(func, *args, **kwargs)
            if rng is not None and len(_native_ok) < _NATIVE_OK_MAX:
                _native_ok.add(good)
            return result
        except Exception as exc:
            refusal = native.cannot_transform(exc)
            if refusal is None:
                raise
            error = exc
        finally:
            running.depth = 0
        if rng is not None:
            rng.restore()
        if key is None:
            key = good
        _remember(key, _Ran(key, transform, func), self, refusal)
        try:
            return self._run_fallback(transform, func, args, kwargs)
        except Exception as second:
            _attach(second, error, native.name)
            raise

    def _run_fallback(
        self,
        transform: str,
        func: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Any:
        # As in _chained: the user has been told about this function already.
        _running.quiet += 1
        try:
            return getattr(self.fallback_backend, transform)(func, *args, **kwargs)
        finally:
            _running.quiet -= 1


class _Ran:
    """Stands for a call run at once (vjp, jvp, linearize) where a fallback is remembered."""

    __slots__ = ("__adbackends_chain__",)

    def __init__(self, key: Tuple[Any, ...], transform: str, func: Any) -> None:
        self.__adbackends_chain__ = (key, transform, func)


def _remember(key: Tuple[Any, ...], call: Any, chain: ChainBackend, refusal: Refusal) -> None:
    from .probes import probing

    if probing():  # a probe's own functions are not the user's
        return
    quiet = _running.quiet > 0
    _, transform, func = call.__adbackends_chain__
    native, fallback = chain._names
    with _lock:
        record = _memory.get(key)
        first = record is None
        if first:
            record = _memory[key] = _Record(_label(call), transform, native, fallback, refusal)
        record.calls += 1  # type: ignore[union-attr]
    if not first:
        return
    text = (
        f"{native} cannot {transform} {_label(func)} ({refusal.reason.rstrip('.')}). This "
        f"call and later calls of it run on the {fallback} backend instead "
        f"(adbackends.fallbacks() lists them). To let {native} transform it: {refusal.fix}."
    )
    log.info("%s", text)
    if not quiet:
        warnings.warn(text, FallbackWarning, stacklevel=external_stacklevel())


def _attach(second: BaseException, first: BaseException, native: str) -> None:
    """Keep the native backend's error with the fallback's, where a reader looks."""
    second.adbackends_native_error = first  # type: ignore[attr-defined]
    if second.__cause__ is None:
        second.__cause__ = first
    note = getattr(second, "add_note", None)
    if note is not None:
        note(f"(the {native} backend could not transform it first: {first})")
