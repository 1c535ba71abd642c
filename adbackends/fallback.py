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
from types import BuiltinFunctionType, FunctionType, MethodType
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

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


class _Running(threading.local):
    """What this thread is doing right now (not remembered: it unwinds with the calls)."""

    depth = 0  # native chain transforms running in this thread
    quiet = 0  # chain fallbacks running in this thread: they have warned already


class FallbackLog:
    """Everything the fallback chains remember, in one place with one reset.

    * ``records``: each function that fell back, with its refusal (at most
      ``limit``; the oldest is forgotten first, and falls back again,
      with a new warning, the next time it is called);
    * ``immediate``: the attempts of calls run at once (vjp, jvp,
      linearize), one per function and transform (at most
      ``immediate_limit``, the oldest dropped first);
    * ``builds``: the transforms the chains built, found again by an
      equivalent build (:class:`BuildCache`);
    * ``running``: what this thread is doing now (a thread-local).

    One instance, :data:`LOG`, serves the process;
    :func:`adbackends.fallbacks` and :func:`adbackends.forget_fallbacks` are
    its doors.
    """

    def __init__(self, limit: int = 1024, immediate_limit: int = 1024) -> None:
        self.limit = limit
        self.immediate_limit = immediate_limit
        self.lock = threading.Lock()
        self.records: Dict[Any, _Record] = {}
        self.immediate: Dict[Any, _Attempt] = {}
        self.builds = BuildCache()
        self.running = _Running()

    def remember(self, key: Any, label: str, transform: str, names: Any, refusal: Refusal) -> bool:
        """Record one fallback; ``True`` the first time ``key`` falls back."""
        with self.lock:
            record = self.records.get(key)
            first = record is None
            if record is None:
                if len(self.records) >= self.limit:
                    # Dicts keep insertion order: the first key is the oldest.
                    del self.records[next(iter(self.records))]
                record = self.records[key] = _Record(label, transform, names[0], names[1], refusal)
            record.calls += 1
        return first

    def keep_immediate(self, key: Any, attempt: _Attempt) -> None:
        with self.lock:
            immediate = self.immediate
            immediate[key] = attempt
            while len(immediate) > self.immediate_limit:
                del immediate[next(iter(immediate))]

    def entries(self) -> List[Fallback]:
        with self.lock:
            records = list(self.records.values())
        return [
            Fallback(r.function, r.transform, r.native, r.fallback, *r.refusal, r.calls)
            for r in records
        ]

    def forget(self) -> None:
        """Forget what fell back (the next call tries the native backend again)."""
        with self.lock:
            self.records.clear()
            self.immediate.clear()

    def reset(self) -> None:
        """Forget everything, the built transforms included."""
        self.forget()
        self.builds.clear()


class BuildCache:
    """The transforms the chains built, found again when the same build is asked for.

    Building is on every call's path (``adbackends.vmap(f)(x)`` in a loop).
    A build is the same when the chain, the transform, its arguments and the
    function are; a function is the same when it would behave the same:

    * a plain Python function: the same object, or one with the same code,
      globals, closure cells and defaults (a ``lambda`` written in the call
      and made anew on each pass of a loop);
    * a bound method: the same function bound to the same object;
    * ``functools.partial``: the same function, arguments and keywords (the
      same objects);
    * anything else hashable (a builtin such as ``torch.sin``, an
      ``nn.Module``): the same object.

    A function made with ``def`` keeps its own builds
    (``__adbackends_built__``, at most ``per_function``), which live exactly
    as long as it does: a ``def`` is kept by its owner, and one made anew on
    every call (a closure) must not be kept alive here. The rest (lambdas,
    builtins, methods, partials, modules) are kept here, at most ``limit``,
    the least recently used dropped first; each keeps the callable it wraps,
    and what that references, alive until it is dropped or the log is
    reset.
    """

    per_function = 32
    limit = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: Dict[Any, Callable[..., Any]] = {}

    def find(self, key: Any, func: Any) -> Optional[Callable[..., Any]]:
        if type(func) is FunctionType and func.__code__.co_name != "<lambda>":
            own = func.__dict__.get(_BUILT)
            return None if own is None else own.get(key)  # type: ignore[no-any-return]
        entries = self._entries
        if not entries:
            return None
        shared = (key, _equivalent(func))
        found = entries.pop(shared, None)
        if found is not None:
            entries[shared] = found  # most recently used last
        return found

    def keep(self, key: Any, func: Any, call: Callable[..., Any]) -> None:
        if type(func) is FunctionType and func.__code__.co_name != "<lambda>":
            self._keep_own(func, key, call)
            return
        shared = _equivalent(func)
        if shared is None:
            return
        with self._lock:
            entries = self._entries
            try:
                entries[(key, shared)] = call
            except TypeError:  # unhashable arguments or defaults
                return
            while len(entries) > self.limit:
                # find() reorders without the lock: take the oldest as it is now.
                try:
                    entries.pop(next(iter(entries)), None)
                except (StopIteration, RuntimeError):
                    break

    def _keep_own(self, func: Any, key: Any, call: Callable[..., Any]) -> None:
        own = func.__dict__.get(_BUILT)
        if own is None:
            own = func.__dict__.setdefault(_BUILT, {})
        if len(own) < self.per_function:
            own[key] = call

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _typed(args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """``args`` as a key in which ``True``, ``1`` and ``1.0`` differ, as they do to torch.func."""
    out = []
    for value in args:
        kind = type(value)
        if kind is int or kind is str or value is None:
            out.append(value)
        elif kind is tuple:
            out.append((tuple, _typed(value)))
        else:
            out.append((kind, value))
    return tuple(out)


#: Where a plain function keeps the transforms built for it.
_BUILT = "__adbackends_built__"


def _equivalent(func: Any) -> Any:
    """A hashable key equal for callables that behave the same, or ``None``.

    Identities (``id``) stand for closure cells, defaults and arguments:
    their own ``==`` may compare contents (cells do, tensors broadcast). The
    cached transform keeps the first such callable alive, so no ``id`` in a
    live key can be reused.
    """
    kind = type(func)
    if kind is FunctionType:
        closure = func.__closure__
        defaults = func.__defaults__
        kwdefaults = func.__kwdefaults__
        return (
            func.__code__,
            id(func.__globals__),
            None if closure is None else tuple(map(id, closure)),
            None if defaults is None else tuple(map(id, defaults)),
            None if kwdefaults is None else tuple((k, id(v)) for k, v in kwdefaults.items()),
        )
    if kind is MethodType:
        inner = _equivalent(func.__func__)
        return None if inner is None else ("method", inner, id(func.__self__))
    if kind is functools.partial:
        inner = _equivalent(func.func)
        if inner is None:
            return None
        return (
            "partial",
            inner,
            tuple(map(id, func.args)),
            tuple((k, id(v)) for k, v in func.keywords.items()),
        )
    try:
        hash(func)
    except TypeError:
        return None
    return ("object", id(func))


#: The process's fallback log.
LOG = FallbackLog()


def fallbacks() -> List[Fallback]:
    """Every function that fell back in this process, and why.

    Examples
    --------
    >>> import adbackends
    >>> adbackends.forget_fallbacks()
    >>> adbackends.fallbacks()
    []
    """
    return LOG.entries()


def forget_fallbacks() -> None:
    """Forget every remembered fallback: the next call of each tries the native backend again.

    The warning is then given again on the next fallback.
    """
    LOG.forget()


# -- identity of a function across freshly built wrappers --------------------------------


def _identity(func: Any) -> Any:
    """What makes two callables "the same function" for remembering a fallback.

    Functions are the same when their code is: ``lambda`` defined on one line
    and rebuilt in a loop is one function. Transform wrappers built by a chain
    carry their own key, which includes the function they wrap.
    """
    kind = type(func)
    if kind is FunctionType:
        code = func.__code__
        return func.__adbackends_chain__[0] if code is _WRAPPER_CODE else code
    if kind is BuiltinFunctionType:
        return func
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


class LinkedBackend(Backend):
    """A backend in front of others: ``native_backend`` first, ``fallback_backend`` after.

    What every link of a chain answers the same way: ``fjacrev``/``fvmap``
    are the native backend's (they never fall back, nor are compiled), and a
    refusal is the fallback's to judge, since it ran last.
    """

    native_backend: Backend
    fallback_backend: Backend

    def relinked(self, native: Backend, fallback: Backend) -> LinkedBackend:
        """The same kind of link in front of other backends (``_memory`` wraps both sides)."""
        raise NotImplementedError

    def fjacrev(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """The native backend's: ``fjacrev`` never falls back."""
        return self.native_backend.fjacrev(*args, **kwargs)

    def fvmap(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        """The native backend's: ``fvmap`` never falls back."""
        return self.native_backend.fvmap(*args, **kwargs)

    def native(self) -> Backend:
        return self.native_backend.native()

    def cannot_transform(self, exc: BaseException) -> Optional[Refusal]:
        # As the fallback of another link, this one has already tried its own
        # fallback; what reaches the outer link is the last word.
        return self.fallback_backend.cannot_transform(exc)


class ChainBackend(LinkedBackend):
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

    def __init__(
        self, native: Backend, fallback: Backend, log: Optional[FallbackLog] = None
    ) -> None:
        self.native_backend = native
        self.fallback_backend = fallback
        self.log = LOG if log is None else log
        self.name = f"{native.name}>{fallback.name}"
        self._names = (native.name, fallback.name)

    def relinked(self, native: Backend, fallback: Backend) -> ChainBackend:
        return ChainBackend(native, fallback, self.log)

    @property
    def version(self) -> str:
        return f"{self.native_backend.version} > {self.fallback_backend.version}"

    def __repr__(self) -> str:
        native, fallback = self.native_backend, self.fallback_backend
        return f"<adbackends chain {self.name!r}: {native!r}, then {fallback!r}>"

    # -- the transforms ---------------------------------------------------------------
    # Each builds through _build (a transform wrapper) or runs through _now
    # (vjp, jvp and linearize compute at once); both end in _attempt.

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        args = (argnums, has_aux, chunk_size, _preallocate_and_copy)
        key, found = self._find("jacrev", func, args)
        if found is not None:
            return found
        return self._build(
            "jacrev",
            func,
            key,
            lambda b: b.jacrev(
                func,
                argnums,
                has_aux=has_aux,
                chunk_size=chunk_size,
                _preallocate_and_copy=_preallocate_and_copy,
            ),
            True,
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
        key, found = self._find("vmap", func, (in_dims, out_dims, randomness, chunk_size))
        if found is not None:
            return found
        # With randomness="error" a native vmap raises at the first random
        # draw, so nothing can have drawn before a refusal: no RNG snapshot.
        return self._build(
            "vmap",
            func,
            key,
            lambda b: b.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size),
            _ALWAYS if randomness != "error" else False,
        )

    def grad(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        key, found = self._find("grad", func, (argnums, has_aux))
        if found is not None:
            return found
        return self._build("grad", func, key, lambda b: b.grad(func, argnums, has_aux), True)

    def grad_and_value(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        key, found = self._find("grad_and_value", func, (argnums, has_aux))
        if found is not None:
            return found
        return self._build(
            "grad_and_value", func, key, lambda b: b.grad_and_value(func, argnums, has_aux), True
        )

    def jacfwd(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        has_aux: bool = False,
        *,
        randomness: str = "error",
    ) -> Callable[..., Any]:
        key, found = self._find("jacfwd", func, (argnums, has_aux, randomness))
        if found is not None:
            return found
        # As for vmap: with randomness="error" nothing draws before a refusal.
        return self._build(
            "jacfwd",
            func,
            key,
            lambda b: b.jacfwd(func, argnums, has_aux, randomness=randomness),
            _ALWAYS if randomness != "error" else False,
        )

    def hessian(self, func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
        key, found = self._find("hessian", func, (argnums,))
        if found is not None:
            return found
        return self._build("hessian", func, key, lambda b: b.hessian(func, argnums), True)

    def vjp(self, func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
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
        return self._now("jvp", func, (primals, tangents), {"strict": strict, "has_aux": has_aux})

    def linearize(self, func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
        return self._now("linearize", func, primals, {})  # type: ignore[no-any-return]

    # -- the mechanism ------------------------------------------------------------------

    def _find(
        self, transform: str, func: Callable[..., Any], args: Tuple[Any, ...]
    ) -> Tuple[Any, Optional[Callable[..., Any]]]:
        """``(key, transform built before for an equivalent build or None)``.

        The lookup comes first and makes nothing: ``adbackends.vmap(f)(x)``
        in a loop pays only for it. A key of ``None`` means the arguments
        cannot be a key (a list of ``in_dims``): built every time.
        """
        types = tuple(map(type, args))
        if tuple in types:  # (0, 1.0) == (0, 1): nested values get their types too
            key: Any = (self, transform, _typed(args))
        else:  # True == 1 == 1.0 to a dict, not to torch.func
            key = (self, transform, args, types)
        try:
            return key, self.log.builds.find(key, func)
        except TypeError:  # unhashable arguments
            return None, None

    def _build(
        self,
        transform: str,
        func: Callable[..., Any],
        key: Any,
        make: Callable[[Backend], Callable[..., Any]],
        snapshot: Any,
    ) -> Callable[..., Any]:
        """The chained transform of ``func``, built now and kept under ``key``."""
        call = self._make(transform, func, make, snapshot)
        if key is not None and getattr(call, "__adbackends_chain__", None) is not None:
            self.log.builds.keep(key, func, call)
        return call

    def _make(
        self,
        transform: str,
        func: Callable[..., Any],
        make: Callable[[Backend], Callable[..., Any]],
        snapshot: Any,
    ) -> Callable[..., Any]:
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
        attempt = _Attempt(self, transform, func, native_t, make, snapshot)
        call = _wrapper(native_t, attempt.run, self.log.running)
        call.__adbackends_chain__ = (attempt.key, transform, func)  # type: ignore[attr-defined]
        return call

    def _now(
        self,
        transform: str,
        func: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Any:
        """``transform(func, *args, **kwargs)`` run at once (vjp, jvp, linearize).

        The attempt's "transform" is the backend's method itself, called with
        ``func`` first; the attempt is kept per function (in the log), as a
        built transform keeps its own.
        """
        book = self.log
        if book.running.depth:  # inside a native transform: its outer call decides
            return getattr(self.native_backend, transform)(func, *args, **kwargs)
        key = (self._names, transform, _identity(func))
        attempt = book.immediate.get(key)
        if attempt is None:
            native = getattr(self.native_backend, transform)
            # Kept without the function itself (it is passed on each run), so
            # the log keeps nothing of the caller's alive.
            attempt = _Attempt(self, transform, None, native, None, True, key)
            book.keep_immediate(key, attempt)
        return attempt.run((func, *args), kwargs)


def _wrapper(
    native_t: Callable[..., Any], run: Callable[..., Any], running: _Running
) -> Callable[..., Any]:
    """The function a chain hands out for a built transform."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if running.depth:  # inside a native transform: its outer call decides
            return native_t(*args, **kwargs)
        return run(args, kwargs)

    return call


#: The code of every chain wrapper: how _identity knows one without a lookup.
_WRAPPER_CODE = _wrapper(None, None, None).__code__  # type: ignore[arg-type]


#: An attempt's ``snapshot`` besides ``True`` (until a native run) and
#: ``False`` (never): always (the caller asked for randomness).
_ALWAYS = "always"


class _Attempt:
    """One chained transform of one function: native first, the fallback where it must.

    The one path every transform of a chain takes (:meth:`run`):

    1. a function remembered as falling back goes straight to the fallback;
    2. otherwise the random generators are snapshotted (until the function
       has once run natively, or always where the caller asked for
       randomness), and the native transform runs, marked as running so that
       inner chain transforms stay native;
    3. an exception the native backend refuses (its ``cannot_transform``)
       restores the generators, is remembered and warned about once, and the
       call runs on the fallback; any other exception is raised as it is.
    """

    __slots__ = (
        "book",
        "chain",
        "fallback_t",
        "func",
        "key",
        "make",
        "native_t",
        "running",
        "snapshot",
        "transform",
    )

    def __init__(
        self,
        chain: ChainBackend,
        transform: str,
        func: Any,
        native_t: Callable[..., Any],
        make: Optional[Callable[[Backend], Callable[..., Any]]],
        snapshot: Any,
        key: Any = None,
    ) -> None:
        # make(backend) builds the transform on another backend; None means
        # the transform is that backend's method of the same name, called
        # with the function first.
        self.chain = chain
        self.book = chain.log
        self.running = chain.log.running
        self.transform = transform
        self.func = func
        self.key = key if key is not None else (chain._names, transform, _identity(func))
        self.native_t = native_t
        self.make = make
        self.snapshot = snapshot
        self.fallback_t: Optional[Callable[..., Any]] = None

    def run(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        records = self.book.records
        if records:
            record = records.get(self.key)
            if record is not None:
                record.calls += 1
                return self.on_fallback(args, kwargs)
        rng = RngState() if self.snapshot else None
        running = self.running
        running.depth = 1
        try:
            result = self.native_t(*args, **kwargs)
        except Exception as exc:
            chain = self.chain
            refusal = chain.native_backend.cannot_transform(exc)
            if refusal is None:
                raise
            error = exc
        else:
            if self.snapshot is True:
                self.snapshot = False  # it ran natively: no snapshot from now on
            return result
        finally:
            running.depth = 0
        if rng is not None:
            rng.restore()
        self.remember(refusal, args[0] if self.make is None else self.func)
        try:
            return self.on_fallback(args, kwargs)
        except Exception as second:
            _attach(second, error, chain.native_backend.name)
            raise

    def on_fallback(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        fallback_t = self.fallback_t
        if fallback_t is None:
            other = self.chain.fallback_backend
            make = self.make
            fallback_t = getattr(other, self.transform) if make is None else make(other)
            self.fallback_t = fallback_t
        # Inner transforms that fall back in here are remembered, but the user
        # has been told about this function once already.
        running = self.chain.log.running
        running.quiet += 1
        try:
            return fallback_t(*args, **kwargs)
        finally:
            running.quiet -= 1

    def remember(self, refusal: Refusal, func: Any) -> None:
        chain = self.chain
        record_fallback(chain.log, self.key, self.transform, func, chain._names, refusal)


def record_fallback(
    book: FallbackLog,
    key: Any,
    transform: str,
    func: Any,
    names: Tuple[str, str],
    refusal: Refusal,
) -> None:
    """Remember that ``transform`` of ``func`` fell back from ``names[0]`` to ``names[1]``.

    The first time for ``key``: one :class:`FallbackWarning` (unless a
    fallback that has warned already is running) and a line at INFO. A
    probe's own functions are never recorded. Used by the chains' attempts
    and by the compiled tier, whose "native" is the compiled code.
    """
    from .probes import probing

    if probing():  # a probe's own functions are not the user's
        return
    native, fallback = names
    label = _label(_Marked(key, transform, func))
    if not book.remember(key, label, transform, names, refusal):
        return
    text = (
        f"{native} cannot {transform} {_label(func)} "
        f"({refusal.reason.rstrip('.')}). This call and later calls of it run on the "
        f"{fallback} backend instead (adbackends.fallbacks() lists them). To let "
        f"{native} transform it: {refusal.fix}."
    )
    log.info("%s", text)
    if not book.running.quiet:
        warnings.warn(text, FallbackWarning, stacklevel=external_stacklevel())


class _Marked:
    """Stands for a chained transform of ``func`` when labelling it."""

    __slots__ = ("__adbackends_chain__",)

    def __init__(self, key: Tuple[Any, ...], transform: str, func: Any) -> None:
        self.__adbackends_chain__ = (key, transform, func)


def _attach(second: BaseException, first: BaseException, native: str) -> None:
    """Keep the native backend's error with the fallback's, where a reader looks."""
    second.adbackends_native_error = first  # type: ignore[attr-defined]
    if second.__cause__ is None:
        second.__cause__ = first
    note = getattr(second, "add_note", None)
    if note is not None:
        note(f"(the {native} backend could not transform it first: {first})")
