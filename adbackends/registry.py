"""The registry: which backends exist, and loading them by name.

One :class:`Registry` instance (``REGISTRY``) is the single source of truth.
Built-in names resolve without touching package metadata; installed plugins
are read from the ``adbackends.backends`` entry point group the first time a
name is not a built-in, when every name is listed, or after :func:`refresh`.
A backend is instantiated and loaded once and then cached, and so is a
failure, with its reason.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from .backend import CONTRACT_VERSION, Backend
from .errors import BackendUnavailableError, PluginError, UnknownBackendError

__all__ = ["AUTO", "AUTO_ORDER", "ENTRY_POINT_GROUP", "REGISTRY", "Registry"]

log = logging.getLogger("adbackends")

#: The entry point group third-party backends are declared in.
ENTRY_POINT_GROUP = "adbackends.backends"
#: The name that means "choose automatically".
AUTO = "auto"

#: Built-in backends, in automatic-selection priority order.
_BUILTINS: Dict[str, str] = {
    "torch.func": "adbackends.backends.torch_func:TorchFuncBackend",
    "functorch": "adbackends.backends.functorch:FunctorchBackend",
    "loop": "adbackends.backends.loop:LoopBackend",
}
AUTO_ORDER: Tuple[str, ...] = tuple(_BUILTINS)

Factory = Callable[[], Backend]


class Entry(NamedTuple):
    """What the registry knows about one name before loading it."""

    name: str
    origin: str  # "built-in", "plugin" or "registered"
    target: Union[str, Any]  # "module:attr", an EntryPoint, or a factory
    distribution: Optional[str] = None
    dist_version: Optional[str] = None


class Registry:
    """Backend names, their origins, and the loaded backend objects."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._registered: Dict[str, Entry] = {}
        self._plugins: Optional[Dict[str, Entry]] = None
        self._conflicts: Dict[str, List[Entry]] = {}
        self._problems: List[str] = []
        self._loaded: Dict[str, Backend] = {}
        self._failed: Dict[str, BackendUnavailableError] = {}
        self._reported: set = set()

    # -- names ----------------------------------------------------------------

    def names(self) -> List[str]:
        """Every known backend name: built-ins (in auto order), then the rest sorted."""
        with self._lock:
            plugins = self._scan()
            extra = set(self._registered) | set(plugins) | set(self._conflicts)
            return list(_BUILTINS) + sorted(extra - set(_BUILTINS))

    def entry(self, name: str) -> Entry:
        """The :class:`Entry` for ``name``; scans entry points only if needed."""
        if name in _BUILTINS:
            return Entry(name, "built-in", _BUILTINS[name])
        with self._lock:
            if name in self._registered:
                return self._registered[name]
            plugins = self._scan()
            if name in plugins:
                return plugins[name]
            if name in self._conflicts:
                return self._conflicts[name][0]
        raise UnknownBackendError(name, self.names() + [AUTO])

    # -- loading --------------------------------------------------------------

    def get(self, name: str, source: str = "") -> Backend:
        """The loaded backend called ``name``.

        Raises
        ------
        UnknownBackendError
            When no backend has that name.
        BackendUnavailableError
            When it exists but does not load here (the cause is chained).
        """
        if not isinstance(name, str):
            raise TypeError(
                f"a backend name must be a str such as 'torch.func', 'functorch' or "
                f"'loop', got {type(name).__name__}: {name!r}"
            )
        backend = self._loaded.get(name)  # fast path, no lock
        if backend is not None:
            return backend
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if name in self._failed:
                raise self._failed[name]
            try:
                entry = self.entry(name)
            except UnknownBackendError as exc:
                raise UnknownBackendError(name, exc.valid, source) from None
            if name in self._conflicts:
                dists = " and ".join(repr(e.distribution) for e in self._conflicts[name])
                err: BackendUnavailableError = PluginError(
                    name,
                    f"two installed distributions declare a backend of this name: {dists}",
                    self._conflicts[name][0].distribution or "?",
                    "Uninstall one of them",
                )
                self._failed[name] = err
                raise err
            try:
                backend = self._instantiate(entry)
            except BackendUnavailableError as exc:
                self._failed[name] = exc
                self._report(name, str(exc))
                raise
            self._loaded[name] = backend
            log.debug("loaded backend %r (%s)", name, entry.origin)
            return backend

    def failure(self, name: str) -> Optional[BackendUnavailableError]:
        """Why ``name`` did not load, or ``None`` if it loads."""
        try:
            self.get(name)
        except BackendUnavailableError as exc:
            return exc
        return None

    def available(self) -> List[str]:
        """The names of the backends that load here, in automatic-selection order."""
        return [name for name in self.names() if self.failure(name) is None]

    def _instantiate(self, entry: Entry) -> Backend:
        hint = ""
        try:
            obj = self._resolve_target(entry)
            backend = _make_backend(obj, entry)
            hint = getattr(backend, "install_hint", "")
            backend.load()
        except BackendUnavailableError:
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if entry.origin == "plugin":
                raise PluginError(entry.name, reason, entry.distribution or "?", hint) from exc
            raise BackendUnavailableError(entry.name, reason, hint or _hint(entry)) from exc
        return backend

    @staticmethod
    def _resolve_target(entry: Entry) -> Any:
        target = entry.target
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            return getattr(importlib.import_module(module), attr)
        if hasattr(target, "load") and hasattr(target, "group"):  # an EntryPoint
            return target.load()
        return target

    # -- plugins --------------------------------------------------------------

    def register(self, name: str, factory: Any, *, replace: bool = False) -> None:
        """Register a backend from code, for programs that ship no entry points.

        Parameters
        ----------
        name : str
            The name to select it by. Built-in names and ``"auto"`` are refused.
        factory : Backend subclass, Backend instance, or callable
            Called with no arguments to make the backend (an instance is used
            as it is).
        replace : bool
            Allow replacing an earlier registration of the same name.
        """
        if not isinstance(name, str) or not name.strip() or "," in name:
            raise ValueError(f"a backend name must be a non-empty str without commas, got {name!r}")
        if name in _BUILTINS or name == AUTO:
            raise ValueError(f"{name!r} is reserved for a built-in backend; choose another name")
        with self._lock:
            if name in self._registered and not replace:
                raise ValueError(
                    f"a backend named {name!r} is already registered; pass replace=True"
                )
            self._registered[name] = Entry(name, "registered", factory)
            self._loaded.pop(name, None)
            self._failed.pop(name, None)

    def unregister(self, name: str) -> None:
        """Remove a backend added by :meth:`register`."""
        with self._lock:
            if name not in self._registered:
                raise UnknownBackendError(name, sorted(self._registered), "unregister()")
            del self._registered[name]
            self._loaded.pop(name, None)
            self._failed.pop(name, None)

    def problems(self) -> List[str]:
        """Problems found with installed plugins, one line each."""
        with self._lock:
            self._scan()
            return list(self._problems)

    def refresh(self) -> None:
        """Forget the entry point scan and every plugin load, so new installs are seen."""
        with self._lock:
            self._plugins = None
            self._conflicts = {}
            self._problems = []
            for name in list(self._loaded) + list(self._failed):
                if name not in _BUILTINS and name not in self._registered:
                    self._loaded.pop(name, None)
                    self._failed.pop(name, None)

    def _scan(self) -> Dict[str, Entry]:
        if self._plugins is not None:
            return self._plugins
        plugins: Dict[str, Entry] = {}
        conflicts: Dict[str, List[Entry]] = {}
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            entry = Entry(
                ep.name,
                "plugin",
                ep,
                getattr(dist, "name", None),
                getattr(dist, "version", None),
            )
            if ep.name in _BUILTINS or ep.name == AUTO:
                self._problem(
                    f"plugin {ep.name!r} from distribution {entry.distribution!r} claims "
                    f"a built-in name and is ignored"
                )
                continue
            seen = plugins.get(ep.name)
            if seen is None:
                if ep.name in conflicts:
                    conflicts[ep.name].append(entry)
                else:
                    plugins[ep.name] = entry
                continue
            if (seen.distribution, seen.target.value) == (entry.distribution, ep.value):
                continue  # the same distribution seen twice (a lib/lib64 link)
            conflicts[ep.name] = [plugins.pop(ep.name), entry]
            self._problem(
                f"plugin {ep.name!r} is declared by two distributions, "
                f"{seen.distribution!r} and {entry.distribution!r}; neither is used"
            )
        self._plugins = plugins
        self._conflicts = conflicts
        if plugins:
            log.debug("found plugins: %s", ", ".join(sorted(plugins)))
        return plugins

    def _problem(self, text: str) -> None:
        self._problems.append(text)
        self._report(text, text)

    def _report(self, key: str, text: str) -> None:
        """Log a problem once per process."""
        if key in self._reported:
            return
        self._reported.add(key)
        log.warning("%s", text)

    def _clear(self) -> None:
        """Forget everything, for tests."""
        with self._lock:
            self.__init__()  # type: ignore[misc]


def _make_backend(obj: Any, entry: Entry) -> Backend:
    if isinstance(obj, Backend):
        backend = obj
    elif isinstance(obj, type) and issubclass(obj, Backend):
        backend = obj()
    elif callable(obj) and not isinstance(obj, type):
        backend = obj()
        if not isinstance(backend, Backend):
            raise TypeError(
                f"the factory for {entry.name!r} returned {type(backend).__name__}, "
                f"not an adbackends.Backend"
            )
    else:
        raise TypeError(
            f"{entry.name!r} points to {obj!r}, which is neither an adbackends.Backend "
            f"subclass nor a factory returning one"
        )
    contract = getattr(backend, "contract", None)
    if contract != CONTRACT_VERSION:
        raise TypeError(
            f"backend {entry.name!r} was written for backend contract {contract!r}, but "
            f"this adbackends implements contract {CONTRACT_VERSION}; upgrade the plugin "
            f"or adbackends so that they match"
        )
    if not backend.name:
        backend.name = entry.name
    elif backend.name != entry.name:
        raise TypeError(
            f"backend object calls itself {backend.name!r} but is registered as "
            f"{entry.name!r}; the two must agree"
        )
    if entry.origin != "built-in":
        backend.origin = entry.origin
        backend.distribution = entry.distribution
    return backend


def _hint(entry: Entry) -> str:
    if entry.origin == "plugin" and entry.distribution:
        return f"Reinstall or update the distribution {entry.distribution!r}"
    return ""


def _entry_points() -> List[Any]:
    if sys.version_info >= (3, 10):
        from importlib.metadata import entry_points
    else:  # the selectable API arrived in Python 3.10
        from importlib_metadata import entry_points
    return list(entry_points(group=ENTRY_POINT_GROUP))


#: The process-wide registry.
REGISTRY = Registry()
