"""Selection: which backend runs a call, and why. Every such decision lives here.

The precedence, innermost first:

1. ``with adbackends.using(name):`` (per thread and per asyncio task);
2. ``adbackends.use(name)`` (process-wide);
3. the environment variable ``TAD_AD_BACKEND``: a name, ``auto``, or a
   comma-separated preference list, read lazily and never at import;
4. automatic: the first built-in backend in :data:`AUTO_ORDER` that loads and
   passes the required capability probes (:func:`require`; by default
   ``custom_function``).

An explicit single name (from any level) is honoured as it is: the backend
must load, but it is not probed, and it is strict: an error is raised as the
backend raises it. A preference list (any value with a comma, ``loop,``
included) and ``auto`` pick the first candidate that loads and passes the
required probes.

A *chain* ``native>fallback`` (``use("torch.func", fallback="loop")``,
``TAD_AD_BACKEND=torch.func>loop``) runs each call on the native backend and,
when that backend cannot transform the function, on the fallback
(:mod:`adbackends.fallback`). Automatic selection makes one: when the first
qualified backend has native transforms, auto is that backend with the loop
backend as its per-call fallback (torch.func>loop on torch >= 2); where only
the loop qualifies on its own, a native backend ruled out before it by a
default requirement is chained with it when the chain passes the required
probes (functorch>loop on torch 1.12 and 1.13; :func:`_native_with_loop`).

This module also decides which backend serves ``fjacrev``/``fvmap`` (the best
one with native composable transforms, :func:`native_backend`) and which
backends an error message may suggest (:func:`alternatives`).

Choices are cached. Each cache is stamped with the registry's
:attr:`~adbackends.registry.Registry.generation` and the required
capabilities, so any change to the registry (by :func:`adbackends.register`,
:func:`adbackends.unregister`, :func:`adbackends.refresh` or the registry's
own methods) or to :func:`require` is seen by the next call.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import warnings
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from . import _memory
from ._shared import external_stacklevel
from .backend import Backend
from .errors import BackendError, BackendUnavailableError, UnknownBackendError
from .registry import AUTO, REGISTRY

__all__ = [
    "AUTO_ORDER",
    "DEFAULT_REQUIRED",
    "ENV_VAR",
    "Choice",
    "alternatives",
    "current",
    "explain",
    "get",
    "native_backend",
    "require",
    "use",
    "using",
]

log = logging.getLogger("adbackends")

#: The environment variable read at the third level of precedence.
ENV_VAR = "TAD_AD_BACKEND"
#: Built-in backends in automatic-selection priority order.
AUTO_ORDER: Tuple[str, ...] = ("torch.func", "functorch", "loop")
#: What automatic selection requires unless :func:`require` says otherwise.
DEFAULT_REQUIRED: Tuple[str, ...] = ("custom_function",)


class Choice(NamedTuple):
    """The active backend and where the choice came from.

    Attributes
    ----------
    backend : Backend
        The backend the transforms use.
    source : str
        ``"using"``, ``"use"``, ``"env"`` or ``"auto"``.
    reason : str
        One sentence a person can read.
    rejected : tuple of (str, str)
        Candidates that were ruled out, with the reason for each.
    max_memory : int or None
        The memory limit in force now, in bytes (see :doc:`memory`).
    chunks : list of ChunkChoice
        The chunks chosen so far under automatic chunking.
    """

    backend: Backend
    source: str
    reason: str
    rejected: Tuple[Tuple[str, str], ...] = ()

    @property
    def max_memory(self) -> Optional[int]:
        return _memory.max_memory()

    @property
    def chunks(self) -> List[Any]:
        return _memory.chunk_choices()


class _State:
    """Everything selection remembers; guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.process: Optional[str] = None  # the name given to use(), or None
        self.required: Tuple[str, ...] = DEFAULT_REQUIRED
        self.stamp: Tuple[int, Tuple[str, ...]] = (-1, ())
        self.auto: Optional[Choice] = None
        self.env: Dict[str, Choice] = {}
        self.explicit: Dict[Tuple[str, str], Choice] = {}
        self.chains: Dict[Tuple[str, ...], Backend] = {}

    def forget(self) -> None:
        self.auto = None
        self.env = {}
        self.explicit = {}
        self.chains = {}
        self.stamp = (REGISTRY.generation, self.required)


_state = _State()
_context: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "adbackends_using", default=None
)

_SOURCES = {"using": "with adbackends.using(...)", "use": "adbackends.use(...)"}


def _fresh() -> _State:
    """The state, with its caches dropped if the registry or requirements changed."""
    state = _state
    if state.stamp[0] != REGISTRY.generation or state.stamp[1] is not state.required:
        with state.lock:
            state.forget()
    return state


# -- the public verbs -------------------------------------------------------------


def get(name: str) -> Backend:
    """The backend called ``name``, loaded; ``"auto"`` gives the automatic choice.

    Raises
    ------
    adbackends.UnknownBackendError
        When no backend has that name; the message lists the valid names and
        the nearest match.
    adbackends.BackendUnavailableError
        When the backend exists but does not load here.

    Examples
    --------
    >>> import adbackends
    >>> adbackends.get("loop").name
    'loop'
    >>> adbackends.get("lop")
    Traceback (most recent call last):
    ...
    adbackends.errors.UnknownBackendError: unknown autodiff backend 'lop' (from get()). ...
    """
    name = _check_name(name, "get()")
    if name == AUTO:
        return _auto().backend
    return _resolve(name, "get()")


def use(
    name: Optional[str],
    *,
    fallback: Optional[str] = None,
    max_memory: Any = ...,
    compile: bool = False,
) -> Optional[Backend]:
    """Choose the backend for the whole process; validated at once.

    Parameters
    ----------
    name : str or None
        A backend name, ``"auto"`` for automatic selection (which then
        overrides ``TAD_AD_BACKEND``), a chain ``"native>fallback"``, or
        ``None`` to forget the choice so that the environment variable and
        automatic selection apply again.
    fallback : str or None
        Run each call that ``name`` cannot transform on this backend instead
        (``use("torch.func", fallback="loop")`` is ``use("torch.func>loop")``).
        Without it, a single name is strict: errors are raised as they are.
    max_memory : int, str or None
        Also set the memory limit, as :func:`adbackends.set_max_memory`
        does (``"2GiB"``; ``None`` forgets it). Left out, the limit is
        unchanged.
    compile : bool
        Put the compiled tier in front: ``use("torch.func", fallback="loop",
        compile=True)`` is ``use("torch.compile>torch.func>loop")`` (see
        :doc:`compiled`).

    Returns
    -------
    Backend or None
        The backend now chosen (``None`` after ``use(None)``).

    Examples
    --------
    >>> import adbackends
    >>> adbackends.use("loop").name
    'loop'
    >>> adbackends.current().name
    'loop'
    >>> adbackends.use(None)
    """
    if max_memory is not ...:
        _memory.parse_size(max_memory)  # validates before anything changes
    if name is None:
        with _state.lock:
            _state.process = None
        log.debug("use(None): process-wide choice cleared")
        if max_memory is not ...:
            _memory.set_max_memory(max_memory)
        return None
    name = _with_fallback(_check_name(name, "use()"), fallback, "use()")
    if compile:
        name = _with_compile(name, "use()")
    backend = _backend_for(name, "use")  # validates before anything changes
    if max_memory is not ...:
        _memory.set_max_memory(max_memory)
    with _state.lock:
        _state.process = name
    log.debug("use(%r)", name)
    return backend


@contextlib.contextmanager
def using(
    name: str,
    *,
    fallback: Optional[str] = None,
    max_memory: Any = ...,
    compile: bool = False,
) -> Iterator[Backend]:
    """Use a backend inside a ``with`` block, for this thread or asyncio task only.

    Blocks nest, and leaving one restores exactly what was active before it;
    the process-wide choice made by :func:`use` is never touched. ``name`` and
    ``fallback`` are as for :func:`use`; ``max_memory`` sets the memory limit
    inside the block, as :func:`adbackends.memory_limit` does (``None``: no
    limit there).

    Examples
    --------
    >>> import adbackends
    >>> with adbackends.using("loop") as backend:
    ...     backend.name, adbackends.current().name
    ('loop', 'loop')
    """
    name = _with_fallback(_check_name(name, "using()"), fallback, "using()")
    if compile:
        name = _with_compile(name, "using()")
    if max_memory is not ...:
        _memory.parse_size(max_memory)  # validates before anything changes
    backend = _backend_for(name, "using")
    limit = _memory.memory_limit(max_memory) if max_memory is not ... else None
    token = _context.set(name)
    try:
        if limit is None:
            yield backend
        else:
            with limit:
                yield backend
    finally:
        _context.reset(token)


def current(explain: bool = False) -> Any:
    """The active backend.

    ``current(explain=True)`` is deprecated: use :func:`explain`, which
    returns the :class:`Choice` with where it came from and why.

    Examples
    --------
    >>> import adbackends
    >>> with adbackends.using("loop"):
    ...     adbackends.current().name
    'loop'
    """
    if explain:
        warnings.warn(
            "adbackends.current(explain=True) is deprecated; use adbackends.explain(), "
            "which returns the same Choice",
            DeprecationWarning,
            stacklevel=external_stacklevel(),
        )
        return _choose()
    return _choose().backend


def explain() -> Choice:
    """The active backend and why: a :class:`Choice` with its source and reason.

    Examples
    --------
    >>> import adbackends
    >>> with adbackends.using("loop"):
    ...     choice = adbackends.explain()
    >>> choice.backend.name, choice.source
    ('loop', 'using')
    """
    choice = _choose()
    said = getattr(choice.backend, "explain_compiled", None)  # the compiled tier's own words
    if said is not None:
        choice = choice._replace(reason=f"{choice.reason}; {said()}")
    return choice


def require(*capabilities: str, replace: bool = False) -> Tuple[str, ...]:
    """Add capabilities that automatic selection and preference lists demand.

    Code with ctx-style autograd Functions (``forward(ctx, x)``) says so with
    ``adbackends.require("legacy_function")``: auto then skips backends whose
    probe for it fails. Explicitly named backends are never probed.

    Parameters
    ----------
    *capabilities : str
        Probe names (see :func:`adbackends.plugin.describe`). With none,
        nothing changes and the current requirements are returned.
    replace : bool
        Set exactly these instead of adding them;
        ``require(*adbackends.selection.DEFAULT_REQUIRED, replace=True)``
        restores the default.

    Returns
    -------
    tuple of str
        The requirements now in force.

    Raises
    ------
    ValueError
        For a name that is not a capability; nothing changes.

    Examples
    --------
    >>> import adbackends
    >>> adbackends.require()
    ('custom_function',)
    >>> adbackends.require("legacy_function")
    ('custom_function', 'legacy_function')
    >>> adbackends.require("custom_function", replace=True)
    ('custom_function',)
    """
    from .probes import PROBES

    for cap in capabilities:
        if not isinstance(cap, str) or cap not in PROBES:
            valid = ", ".join(repr(c) for c in PROBES)
            raise ValueError(f"require(): unknown capability {cap!r}; valid capabilities: {valid}")
    with _state.lock:
        if replace:
            wanted = tuple(dict.fromkeys(capabilities))
        else:
            wanted = tuple(dict.fromkeys(_state.required + tuple(capabilities)))
        if wanted != _state.required:
            _state.required = wanted
            log.debug("required capabilities: %s", ", ".join(wanted) or "none")
        return _state.required


# -- choosing ----------------------------------------------------------------------


def _choose() -> Choice:
    """The choice for the call being made now (the hot path of every transform)."""
    state = _fresh()
    name = _context.get()
    if name is not None:
        return _explicit(state, name, "using")
    name = state.process
    if name is not None:
        return _explicit(state, name, "use")
    raw = _env_value()
    if raw and not raw.isspace():
        cached = state.env.get(raw)
        return cached if cached is not None else _from_env(raw)
    auto = state.auto
    return auto if auto is not None else _auto()


def _explicit(state: _State, name: str, source: str) -> Choice:
    cached = state.explicit.get((name, source))
    if cached is not None:
        return cached
    how = _SOURCES[source]
    if name == AUTO:
        auto = _auto()
        choice = auto._replace(source=source, reason=f"{how} asked for auto: {auto.reason}")
    else:
        # A name unregistered since use()/using() raises here, naming the source.
        choice = Choice(_resolve(name, f"{source}()"), source, f"chosen by {how}")
    with state.lock:
        if state.stamp[0] == REGISTRY.generation:
            state.explicit[(name, source)] = choice
    return choice


def _backend_for(name: str, source: str) -> Backend:
    if name == AUTO:
        return _auto().backend
    return _resolve(name, f"{source}()")


def _with_fallback(name: str, fallback: Optional[str], source: str) -> str:
    if fallback is None:
        return name
    fallback = _check_name(fallback, source)
    if name == AUTO or fallback == AUTO:
        raise ValueError(f"{source}: 'auto' cannot be part of a chain; name two backends")
    return f"{name}>{fallback}"


def _with_compile(name: str, source: str) -> str:
    if name == AUTO:
        raise ValueError(
            f"{source}: compile=True needs the backend to compile named, such as "
            "use('torch.func', fallback='loop', compile=True), not 'auto'"
        )
    return name if name.startswith("torch.compile>") else f"torch.compile>{name}"


def _resolve(spec: str, source: str) -> Backend:
    """The backend a name or a chain ``a>b>c`` stands for."""
    if ">" not in spec:
        if spec == "torch.compile":
            from .compiled import head_only

            raise head_only(spec, source)
        return REGISTRY.get(spec, source)
    names = tuple(part.strip() for part in spec.split(">"))
    if len(names) < 2 or not all(names) or AUTO in names or len(set(names)) != len(names):
        raise ValueError(
            f"{source}: {spec!r} is not a fallback chain; write two or more different "
            f"backend names joined by '>', such as 'torch.func>loop'"
        )
    return _chain(names, source)


def _chain(names: Tuple[str, ...], source: str = "") -> Backend:
    state = _fresh()
    cached = state.chains.get(names)
    if cached is not None:
        return cached
    from .fallback import ChainBackend

    if "torch.compile" in names:
        from .compiled import compiled_chain

        chain = compiled_chain(names, source, _chain, REGISTRY.get)
        with state.lock:
            if state.stamp[0] == REGISTRY.generation:
                state.chains[names] = chain
        return chain
    backends = [REGISTRY.get(name, source) for name in names]
    chain = backends[-1]
    for native in reversed(backends[:-1]):
        chain = ChainBackend(native, chain)
    with state.lock:
        if state.stamp[0] == REGISTRY.generation:
            state.chains[names] = chain
    return chain


# os.environ.get() of an unset variable raises and catches a KeyError inside
# (0.5 us, measured: 1.5 % of a 35 us vmap, on every transform). CPython's
# os.environ keeps its values in a dict, updated by every assignment through
# os.environ; read it directly where it exists (15 ns), the public way elsewhere.
_ENV_DATA: Optional[Dict[Any, Any]] = getattr(os.environ, "_data", None)
_ENV_KEY: Any = None
if _ENV_DATA is not None:
    try:
        _ENV_KEY = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
    except AttributeError:  # not CPython's os.environ
        _ENV_DATA = None


def _env_value() -> str:
    """The raw value of TAD_AD_BACKEND, or ``""`` when it is unset."""
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return "" if raw is None else os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    return os.environ.get(ENV_VAR, "")


def _check_name(name: Any, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(
            f"{source}: a backend name must be a str such as 'torch.func', 'functorch', "
            f"'loop' or 'auto', got {type(name).__name__}: {name!r}"
        )
    stripped = name.strip()
    if not stripped:
        raise UnknownBackendError(name, [*REGISTRY.names(), AUTO], source)
    return stripped


def parse_env(raw: str) -> Tuple[str, List[str]]:
    """How a ``TAD_AD_BACKEND`` value reads: ``(kind, names)``.

    ``kind`` is ``"unset"`` (empty, blank, or only commas and blanks),
    ``"name"`` (one name or ``auto``, no comma) or ``"list"`` (a preference
    list: any value with a comma, so ``"loop,"`` is a list of one).

    Examples
    --------
    >>> from adbackends.selection import parse_env
    >>> parse_env("loop"), parse_env(" loop, "), parse_env("functorch,loop")
    (('name', ['loop']), ('list', ['loop']), ('list', ['functorch', 'loop']))
    >>> parse_env(" , ")
    ('unset', [])
    """
    names = [part.strip() for part in raw.split(",") if part.strip()]
    if not names:
        return "unset", []
    return ("list" if "," in raw else "name"), names


def _from_env(raw: str) -> Choice:
    state = _fresh()
    with state.lock:
        kind, names = parse_env(raw)
        source = f"{ENV_VAR}={raw.strip()!r}"
        if kind == "unset":
            return _auto()
        if kind == "name" and names[0] == AUTO:
            auto = _auto()
            choice = auto._replace(source="env", reason=f"{source} asks for auto: {auto.reason}")
        elif kind == "name":
            choice = Choice(_resolve(names[0], ENV_VAR), "env", f"chosen by {source}")
        else:
            for name in names:  # every name is checked before any is tried
                for part in name.split(">"):
                    if part.strip() not in (AUTO, "torch.compile"):
                        _known(part.strip(), ENV_VAR)
            choice = _first_qualified(names, "env", f"first usable backend in {source}")
        if state.stamp[0] == REGISTRY.generation:
            state.env[raw] = choice
        log.debug("%s -> %r (%s)", source, choice.backend.name, choice.reason)
        return choice


def _known(name: str, source: str) -> None:
    try:
        REGISTRY.entry(name)
    except UnknownBackendError as exc:
        raise UnknownBackendError(name, exc.valid, source) from None


def _first_qualified(names: Sequence[str], source: str, what: str) -> Choice:
    """The first of ``names`` that loads and passes every required probe."""
    rejected: List[Tuple[str, str]] = []
    required = _state.required
    for name in names:
        if name == AUTO:
            auto = _auto()
            return auto._replace(
                source=source,
                reason=f"{what}: none before 'auto' qualified; {auto.reason}",
                rejected=tuple(rejected) + auto.rejected,
            )
        why = _disqualified(name, required)
        if why is None:
            passes = f" that passes {', '.join(required)}" if required else ""
            return Choice(_resolve(name, ENV_VAR), source, f"{what}{passes}", tuple(rejected))
        rejected.append((name, why))
    detail = "; ".join(f"{n}: {why}" for n, why in rejected)
    raise BackendError(f"no usable autodiff backend ({what}): {detail}")


def _disqualified(name: str, required: Sequence[str]) -> Optional[str]:
    try:
        backend = _resolve(name, ENV_VAR)
    except BackendUnavailableError as exc:
        return f"does not load ({exc.reason})"
    for cap in required:
        support = backend.supports(cap)
        if not support:
            return f"fails probe {cap} ({support.reason})"
    return None


def _auto() -> Choice:
    state = _fresh()
    cached = state.auto
    if cached is not None:
        return cached
    with state.lock:
        if state.auto is None:
            order = ", ".join(AUTO_ORDER)
            choice = _first_qualified(AUTO_ORDER, "auto", f"first in priority order ({order})")
            choice = _with_loop_fallback(choice)
            log.debug(
                "auto -> %r; ruled out: %s",
                choice.backend.name,
                "; ".join(f"{n}: {r}" for n, r in choice.rejected) or "none",
            )
            state.auto = choice
        return state.auto


def _with_loop_fallback(choice: Choice) -> Choice:
    """Auto's choice, given the loop backend as per-call fallback where that helps.

    A backend with native transforms cannot transform every function; the
    loop backend can. Where the loop backend itself was chosen, a native
    backend ruled out before it is chained with it where that chain passes
    the required probes (:func:`_native_with_loop`: functorch>loop on torch
    1.12 and 1.13, whose functorch refuses autograd Functions on its own).
    """
    native = choice.backend
    if native.name == "loop":
        return _native_with_loop(choice)
    if not native.supports("transforms"):
        return choice
    if REGISTRY.failure("loop") is not None:
        return choice
    chain = _chain((native.name, "loop"))
    reason = f"{choice.reason}, with loop as per-call fallback"
    return choice._replace(backend=chain, reason=reason)


def _native_with_loop(choice: Choice) -> Choice:
    """Where the loop was chosen: a ruled-out native backend chained with it, if that qualifies.

    Automatic selection's second rule. The first (:func:`_first_qualified`)
    picks the first backend of :data:`AUTO_ORDER` that passes the required
    probes on its own; on torch 1.12 and 1.13 that is the loop backend,
    because functorch refuses every ``autograd.Function`` and so fails the
    default requirement ``custom_function``. Where the loop was picked that
    way, the backends ruled out before it are looked at again: the first one
    that loads, has native composable transforms (the ``transforms`` probe),
    fails only default requirements (:data:`DEFAULT_REQUIRED`) and whose
    chain ``name>loop`` passes every required probe becomes the choice, as
    that chain. Probes decide, never a version number: on torch 1.12 and
    1.13 this gives ``functorch>loop``. A requirement added by code
    (``require("legacy_function")``: ctx-style Functions throughout, where a
    chain would fall back on every call) keeps the loop, on every torch.
    """
    required = _state.required
    for position, (name, why) in enumerate(choice.rejected):
        if REGISTRY.failure(name) is not None:
            continue
        backend = REGISTRY.get(name)
        if not backend.supports("transforms"):
            continue
        if any(cap not in DEFAULT_REQUIRED and not backend.supports(cap) for cap in required):
            continue
        candidate = _chain((name, "loop"))
        if not all(candidate.supports(cap) for cap in required):
            continue
        passes = f"; {name}>loop passes {', '.join(required)}" if required else ""
        order = ", ".join(AUTO_ORDER)
        reason = (
            f"first in priority order ({order}) that qualifies: {name} has native transforms "
            f"but {why}{passes}, so {name} runs each call it can and the loop backend the rest"
        )
        return choice._replace(
            backend=candidate, reason=reason, rejected=tuple(choice.rejected[:position])
        )
    return choice


# -- native transforms and hints -----------------------------------------------------


def native_backend() -> Backend:
    """The best backend here with native composable transforms (for fjacrev/fvmap).

    The registry answers (:meth:`~adbackends.registry.Registry.native_backend`).

    Raises
    ------
    adbackends.BackendUnavailableError
        When neither torch.func nor functorch works here; it says what to install.
    """
    return REGISTRY.native_backend()


def alternatives(
    capability: str,
    exclude: Sequence[str] = (),
    *,
    native: Optional[bool] = None,
    probe: bool = True,
) -> List[str]:
    """Built-in backends here that have ``capability``, best first, for error hints.

    The registry answers (:meth:`~adbackends.registry.Registry.alternatives`,
    whose parameters these are).
    """
    return REGISTRY.alternatives(capability, exclude, native=native, probe=probe)


# -- for tests --------------------------------------------------------------------------


def _reset() -> None:
    """Forget every choice, requirement and cache (tests start clean with it)."""
    with _state.lock:
        _state.process = None
        _state.required = DEFAULT_REQUIRED
        _state.forget()
