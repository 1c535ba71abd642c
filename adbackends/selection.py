"""Selection: which backend the transforms use, and why.

The precedence, innermost first:

1. ``with adbackends.using(name):`` (per thread and per asyncio task);
2. ``adbackends.use(name)`` (process-wide);
3. the environment variable ``TAD_AD_BACKEND``: a name, ``auto``, or a
   comma-separated preference list, read lazily and never at import;
4. automatic: the first built-in backend, in priority order, that loads and
   passes the required capability probes (``custom_function`` by default).

An explicit single name (from any level) is honoured as it is: the backend
must load, but it is not probed. A preference list and ``auto`` pick the first
candidate that loads and passes the required probes.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from .backend import Backend
from .errors import BackendError, BackendUnavailableError, UnknownBackendError
from .registry import AUTO, AUTO_ORDER, REGISTRY

__all__ = [
    "ENV_VAR",
    "REQUIRED",
    "Choice",
    "current",
    "get",
    "native_backend",
    "use",
    "using",
]

log = logging.getLogger("adbackends")

#: The environment variable read at the third level of precedence.
ENV_VAR = "TAD_AD_BACKEND"
#: Capabilities a backend must have to be picked automatically.
REQUIRED: Tuple[str, ...] = ("custom_function",)


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
    """

    backend: Backend
    source: str
    reason: str
    rejected: Tuple[Tuple[str, str], ...] = ()


class _Auto:
    """Marker for an explicit request for automatic selection."""

    def __repr__(self) -> str:
        return "'auto'"


_AUTO_MARK = _Auto()
_Selected = Union[Backend, _Auto]

_context: contextvars.ContextVar[Optional[_Selected]] = contextvars.ContextVar(
    "adbackends_using", default=None
)
_process: Optional[_Selected] = None
_lock = threading.RLock()
_auto_cache: Optional[Choice] = None
_native_cache: Optional[Backend] = None
_env_cache: Dict[str, Choice] = {}


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
    return REGISTRY.get(name, "get()")


def use(name: Optional[str]) -> Optional[Backend]:
    """Choose the backend for the whole process; validated at once.

    Parameters
    ----------
    name : str or None
        A backend name, ``"auto"`` for automatic selection (which then
        overrides ``TAD_AD_BACKEND``), or ``None`` to forget the choice so
        that the environment variable and automatic selection apply again.

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
    global _process
    if name is None:
        with _lock:
            _process = None
        log.debug("use(None): process-wide choice cleared")
        return None
    selected = _resolve_name(_check_name(name, "use()"), "use()")
    with _lock:
        _process = selected
    log.debug("use(%r)", name)
    return _auto().backend if selected is _AUTO_MARK else selected  # type: ignore[return-value]


@contextlib.contextmanager
def using(name: str) -> Iterator[Backend]:
    """Use a backend inside a ``with`` block, for this thread or asyncio task only.

    Blocks nest, and leaving one restores exactly what was active before it;
    the process-wide choice made by :func:`use` is never touched.

    Examples
    --------
    >>> import adbackends
    >>> with adbackends.using("loop") as backend:
    ...     backend.name, adbackends.current().name
    ('loop', 'loop')
    """
    selected = _resolve_name(_check_name(name, "using()"), "using()")
    token = _context.set(selected)
    try:
        yield _auto().backend if selected is _AUTO_MARK else selected  # type: ignore[misc]
    finally:
        _context.reset(token)


def current(explain: bool = False) -> Any:
    """The active backend, or with ``explain=True`` a :class:`Choice` saying why.

    Examples
    --------
    >>> import adbackends
    >>> with adbackends.using("loop"):
    ...     choice = adbackends.current(explain=True)
    >>> choice.backend.name, choice.source
    ('loop', 'using')
    """
    choice = _choose()
    return choice if explain else choice.backend


def _choose() -> Choice:
    selected = _context.get()
    if selected is not None:
        return _explicit(selected, "using", "with adbackends.using(...)")
    selected = _process
    if selected is not None:
        return _explicit(selected, "use", "adbackends.use(...)")
    raw = _env_value()
    if raw.strip():
        return _from_env(raw)
    return _auto()


# os.environ.get() of an unset variable raises and catches a KeyError inside,
# which is most of the dispatch cost of a transform; read the mapping behind
# os.environ directly where CPython has one (it is kept in sync by putenv).
_ENV_DATA: Optional[Dict[Any, Any]] = getattr(os.environ, "_data", None)
try:
    _ENV_KEY: Any = os.environ.encodekey(ENV_VAR)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - not CPython's os.environ
    _ENV_DATA = None


def _env_value() -> str:
    """The raw value of TAD_AD_BACKEND, or ``""`` when it is unset."""
    if _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        return "" if raw is None else os.environ.decodevalue(raw)  # type: ignore[attr-defined]
    return os.environ.get(ENV_VAR, "")


def _explicit(selected: _Selected, source: str, how: str) -> Choice:
    if selected is _AUTO_MARK:
        auto = _auto()
        return auto._replace(source=source, reason=f"{how} asked for auto: {auto.reason}")
    assert isinstance(selected, Backend)
    return Choice(selected, source, f"chosen by {how}")


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


def _resolve_name(name: str, source: str) -> _Selected:
    if name == AUTO:
        return _AUTO_MARK
    return REGISTRY.get(name, source)


def _from_env(raw: str) -> Choice:
    cached = _env_cache.get(raw)
    if cached is not None:
        return cached
    with _lock:
        names = [part.strip() for part in raw.split(",") if part.strip()]
        source = f"{ENV_VAR}={raw.strip()!r}"
        if not names:  # only commas and blanks: as good as unset
            return _auto()
        if len(names) == 1:
            if names[0] == AUTO:
                auto = _auto()
                choice = auto._replace(
                    source="env", reason=f"{source} asks for auto: {auto.reason}"
                )
            else:
                choice = Choice(REGISTRY.get(names[0], ENV_VAR), "env", f"chosen by {source}")
        else:
            for name in names:  # every name is checked before any is tried
                if name != AUTO:
                    _known(name, ENV_VAR)
            choice = _first_qualified(names, "env", f"first usable backend in {source}")
        _env_cache[raw] = choice
        log.debug("%s -> %r (%s)", source, choice.backend.name, choice.reason)
        return choice


def _known(name: str, source: str) -> None:
    try:
        REGISTRY.entry(name)
    except UnknownBackendError as exc:
        raise UnknownBackendError(name, exc.valid, source) from None


def _first_qualified(names: Sequence[str], source: str, what: str) -> Choice:
    """The first of ``names`` that loads and passes every REQUIRED probe."""
    rejected: List[Tuple[str, str]] = []
    for name in names:
        if name == AUTO:
            auto = _auto()
            return auto._replace(
                source=source,
                reason=f"{what}: none before 'auto' qualified; {auto.reason}",
                rejected=tuple(rejected) + auto.rejected,
            )
        why = _disqualified(name)
        if why is None:
            required = ", ".join(REQUIRED)
            return Choice(
                REGISTRY.get(name), source, f"{what} that passes {required}", tuple(rejected)
            )
        rejected.append((name, why))
    detail = "; ".join(f"{n}: {why}" for n, why in rejected)
    raise BackendError(f"no usable autodiff backend ({what}): {detail}")


def _disqualified(name: str) -> Optional[str]:
    try:
        backend = REGISTRY.get(name)
    except BackendUnavailableError as exc:
        return f"does not load ({exc.reason})"
    for cap in REQUIRED:
        support = backend.supports(cap)
        if not support:
            return f"fails probe {cap} ({support.reason})"
    return None


def _auto() -> Choice:
    global _auto_cache
    cached = _auto_cache
    if cached is not None:
        return cached
    with _lock:
        if _auto_cache is None:
            order = ", ".join(AUTO_ORDER)
            choice = _first_qualified(AUTO_ORDER, "auto", f"first in priority order ({order})")
            log.debug(
                "auto -> %r; ruled out: %s",
                choice.backend.name,
                "; ".join(f"{n}: {r}" for n, r in choice.rejected) or "none",
            )
            _auto_cache = choice
        return _auto_cache


def native_backend() -> Backend:
    """The best backend with native composable transforms (for fjacrev/fvmap).

    Raises
    ------
    adbackends.BackendUnavailableError
        When neither torch.func nor functorch works here; it says what to install.
    """
    global _native_cache
    if _native_cache is not None:
        return _native_cache
    with _lock:
        if _native_cache is None:
            reasons = []
            for name in AUTO_ORDER:
                try:
                    backend = REGISTRY.get(name)
                except BackendUnavailableError as exc:
                    reasons.append(f"{name}: {exc.reason}")
                    continue
                support = backend.supports("transforms")
                if support:
                    _native_cache = backend
                    break
                reasons.append(f"{name}: {support.reason}")
            else:
                raise BackendUnavailableError(
                    "fjacrev/fvmap",
                    "no backend here has native composable transforms (" + "; ".join(reasons) + ")",
                    "Install torch >= 2.0 for torch.func, or functorch (bundled with "
                    "torch >= 1.13; pip install functorch==0.2.1 for torch 1.12)",
                )
        return _native_cache


def alternatives_for(capability: str) -> List[str]:
    """Built-in backends that load here and pass ``capability``."""
    names = []
    for name in AUTO_ORDER:
        try:
            backend = REGISTRY.get(name)
        except BackendUnavailableError:
            continue
        if backend.supports(capability):
            names.append(name)
    return names


def _reset() -> None:
    """Forget every choice and cache, for tests and :func:`adbackends.refresh`."""
    global _process, _auto_cache, _native_cache
    with _lock:
        _process = None
        _auto_cache = None
        _native_cache = None
        _env_cache.clear()


def _forget_caches() -> None:
    global _auto_cache, _native_cache
    with _lock:
        _auto_cache = None
        _native_cache = None
        _env_cache.clear()
