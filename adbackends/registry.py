"""The registry: which backends exist, and loading them by name.

One :class:`Registry` instance (``REGISTRY``) is the single source of truth.
Built-in names resolve without touching package metadata; installed plugins
are read from the ``adbackends.backends`` entry point group the first time a
name is not a built-in, when every name is listed, or after :func:`refresh`.
A backend is instantiated and loaded once and then cached, and so is a
failure, with its reason and the underlying exception chained.

Reading plugins is a pipeline of small steps, each of which never raises for
a broken plugin:

1. :func:`_read_entry_points` lists every distribution's entry points in the
   group (a distribution whose metadata cannot be read becomes a problem);
2. :func:`_sort_entries` drops names that can never be selected (built-in
   names, ``auto``, names with commas), merges identical duplicates, and sets
   aside names that two distributions claim;
3. loading (:meth:`Registry.get`) checks the object: a Backend, written for
   this contract, implementing the transforms, with honest capabilities.

Problems with plugins are listed by :meth:`Registry.problems`, naming the
distribution and the cause, and logged once per process (logger
``adbackends``): at WARNING when nobody asked for the plugin (a scan, the
report, :func:`adbackends.available`), at DEBUG when the failure is raised to
the caller who asked for it by name. A built-in backend that is simply not
part of this torch (torch.func before torch 2.0) is not a problem: it is
logged at DEBUG only.

Every change to what the registry holds (:meth:`Registry.register`,
:meth:`Registry.unregister`, :meth:`Registry.refresh`) goes through one
method that increments :attr:`Registry.generation`; whoever caches a
decision derived from the registry (:mod:`adbackends.selection`) compares
that number before trusting its cache.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import sys
import threading
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

from ._shared import check_capability_names, native_call_active, summarize_exception
from .backend import CONTRACT_VERSION, CONTRACTS, Backend
from .errors import BackendUnavailableError, PluginError, UnknownBackendError
from .probes import STORE, cached_support

__all__ = ["AUTO", "BUILTINS", "ENTRY_POINT_GROUP", "REGISTRY", "Entry", "Registry"]

log = logging.getLogger("adbackends")

#: The entry point group third-party backends are declared in.
ENTRY_POINT_GROUP = "adbackends.backends"
#: The name that means "choose automatically".
AUTO = "auto"

#: Built-in backends and where each is defined. The order is the order of
#: listings; the automatic-selection order is :mod:`adbackends.selection`'s.
_BUILTINS: Dict[str, str] = {
    "torch.func": "adbackends.backends.torch_func:TorchFuncBackend",
    "functorch": "adbackends.backends.functorch:FunctorchBackend",
    "loop": "adbackends.backends.loop:LoopBackend",
}
#: The built-in backends' names.
BUILTINS: Tuple[str, ...] = tuple(_BUILTINS)

#: Methods a backend outside this package may not override: capabilities are
#: established by running the probes, never by what a backend says.
_PROBED_METHODS = ("supports", "capabilities")


class Entry(NamedTuple):
    """What the registry knows about one name before loading it.

    Attributes
    ----------
    name : str
        The backend's name.
    origin : str
        ``"built-in"``, ``"plugin"`` or ``"registered"``.
    target : str, EntryPoint or object
        ``"module:attr"`` for built-ins, the entry point for plugins, the
        object given to :meth:`Registry.register` otherwise.
    distribution : str or None
        The distribution that declares a plugin.
    dist_version : str or None
        That distribution's version.
    """

    name: str
    origin: str
    target: Union[str, Any]
    distribution: Optional[str] = None
    dist_version: Optional[str] = None

    @property
    def value(self) -> str:
        """The ``module:attr`` an entry point names (``""`` when it is not one)."""
        target = self.target
        if isinstance(target, str):
            return target
        return str(getattr(target, "value", ""))


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
        self._reported: Set[str] = set()
        self._native: Optional[Backend] = None
        #: Incremented by every change to the registry's contents.
        self.generation = 0

    # -- names ----------------------------------------------------------------

    def names(self) -> List[str]:
        """Every known backend name: built-ins first, then the rest sorted."""
        with self._lock:
            plugins = self._scan()
            extra = set(self._registered) | set(plugins) | set(self._conflicts)
            return list(_BUILTINS) + sorted(extra - set(_BUILTINS))

    def entry(self, name: str) -> Entry:
        """The :class:`Entry` for ``name``; scans entry points only if needed.

        A name that two distributions claim gives the first of them; loading
        it fails with an error naming both.

        Raises
        ------
        UnknownBackendError
            When no backend has that name.
        """
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
        raise UnknownBackendError(name, [*self.names(), AUTO])

    # -- loading --------------------------------------------------------------

    def get(self, name: str, source: str = "") -> Backend:
        """The loaded backend called ``name``.

        Parameters
        ----------
        name : str
            The backend's name.
        source : str
            Where the name came from, for error messages (``"use()"``, ...).

        Raises
        ------
        UnknownBackendError
            When no backend has that name.
        BackendUnavailableError
            When it exists but does not load here. For a plugin it is a
            :class:`~adbackends.PluginError` naming the distribution, and the
            exception that made loading fail is its ``__cause__``.
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
            failed = self._failed.get(name)
            if failed is not None:
                # A fresh traceback each time; the chained cause is kept.
                raise failed.with_traceback(None)
            try:
                entry = self.entry(name)
            except UnknownBackendError as exc:
                raise UnknownBackendError(name, exc.valid, source) from None
            if name in self._conflicts:
                err: BackendUnavailableError = _conflict_error(name, self._conflicts[name])
                self._failed[name] = err
                raise err
            try:
                backend = self._instantiate(entry)
            except BackendUnavailableError as exc:
                self._failed[name] = exc
                # Raised to whoever asked: a log line would say it twice.
                log.debug("backend %r does not load: %s", name, exc)
                raise
            # Handed the backends beside it: for fjacrev/fvmap and error hints;
            # and the probes are told what identifies its code on disk.
            backend.peers = self
            STORE.identify(backend, functools.partial(self._probe_identity, backend))
            self._loaded[name] = backend
            log.debug("loaded backend %r (%s)", name, entry.origin)
            return backend

    def loaded(self, name: str) -> Optional[Backend]:
        """The backend called ``name`` if it has been loaded already; loads nothing."""
        return self._loaded.get(name)

    def failure(self, name: str) -> Optional[BackendUnavailableError]:
        """Why ``name`` did not load, or ``None`` if it loads.

        A plugin or registered backend that does not load is logged once at
        WARNING here, since nobody asked for it by name; a built-in that is
        not part of this torch is not a problem and is not logged.
        """
        try:
            self.get(name)
        except BackendUnavailableError as exc:
            entry = self._entry_or_none(name)
            # A conflict was reported by the scan that found it.
            if entry is not None and entry.origin != "built-in" and name not in self._conflicts:
                with self._lock:
                    self._report(f"load:{name}:{entry.distribution}:{exc.reason}", str(exc))
            return exc
        return None

    def _entry_or_none(self, name: str) -> Optional[Entry]:
        try:
            return self.entry(name)
        except UnknownBackendError:
            return None

    def available(self) -> List[str]:
        """The names of the backends that load here, in listing order (see :meth:`names`)."""
        return [name for name in self.names() if self.failure(name) is None]

    def _instantiate(self, entry: Entry) -> Backend:
        hint = ""
        try:
            obj = _resolve_target(entry)
            backend = _make_backend(obj, entry)
            hint = str(getattr(type(backend), "install_hint", "") or "")
            backend.load()
            _check_loaded(backend, entry)
            if entry.origin != "built-in":
                _note_derived(backend)
        except BackendUnavailableError:
            raise
        except (Exception, SystemExit) as exc:  # a plugin may even call sys.exit()
            reason = summarize_exception(exc)
            hint = hint or _missing_dependency_hint(exc, entry)
            if entry.origin == "plugin":
                raise PluginError(
                    entry.name, reason, entry.distribution or "?", hint or _hint(entry)
                ) from exc
            raise BackendUnavailableError(entry.name, reason, hint or _hint(entry)) from exc
        return backend

    def _probe_identity(self, backend: Backend) -> Optional[Dict[str, Any]]:
        """What identifies the code of ``backend``, for probe answers on disk.

        Worked out when the probes first need it: the registry's own object
        for the name only, as the registry holds it then.
        """
        if self._loaded.get(backend.name) is not backend:
            return None
        entry = self._entry_or_none(backend.name)
        return None if entry is None else _probe_identity(backend, entry)

    # -- the backends beside each other -----------------------------------------
    # Every backend the registry loads gets the registry as its ``peers``
    # (see :class:`~adbackends.backend.Peers`): a backend asks these two
    # questions about the others without knowing or importing them.

    def native_for(self, backend: Backend) -> Backend:
        """The backend serving ``backend``'s ``fjacrev``/``fvmap``.

        ``backend`` itself when it passes the ``transforms`` probe, else
        :meth:`native_backend`.
        """
        return backend if backend.supports("transforms") else self.native_backend()

    def native_backend(self) -> Backend:
        """The first built-in backend here with native composable transforms.

        Raises
        ------
        adbackends.BackendUnavailableError
            When neither torch.func nor functorch works here; it says what to install.
        """
        cached = self._native
        if cached is not None:
            return cached
        with self._lock:
            if self._native is not None:
                return self._native
            reasons = []
            for name in _BUILTINS:
                try:
                    backend = self.get(name)
                except BackendUnavailableError as exc:
                    reasons.append(f"{name}: {exc.reason}")
                    continue
                support = backend.supports("transforms")
                if support:
                    self._native = backend
                    return backend
                reasons.append(f"{name}: {support.reason}")
        raise BackendUnavailableError(
            "fjacrev/fvmap",
            "no backend here has native composable transforms (" + "; ".join(reasons) + ")",
            "Install torch >= 2.0 for torch.func, or functorch (bundled with "
            "torch >= 1.13; pip install functorch==0.2.1 for torch 1.12)",
        )

    def alternatives(
        self,
        capability: str,
        exclude: Sequence[str] = (),
        *,
        native: Optional[bool] = None,
        probe: bool = True,
    ) -> List[str]:
        """Built-in backends here that have ``capability``, in listing order, for error hints.

        Parameters
        ----------
        capability : str
            The probe that failed.
        exclude : sequence of str
            Backends to leave out (the one that failed).
        native : bool or None
            Only backends with native transforms, as ``fjacrev``/``fvmap`` need.
            ``None`` decides from the call being served: native-only inside
            ``fjacrev``/``fvmap``.
        probe : bool
            Run probes that have not run yet. ``False`` uses cached answers
            (and what a backend has by construction, such as the loop backend
            running every autograd.Function) only, for hints built inside a
            running transform, where no probe may run.
        """
        if native is None:
            native = native_call_active()
        names = []
        for name in _BUILTINS:
            if name in exclude:
                continue
            if probe:
                if self.failure(name) is not None:
                    continue
                backend = self.get(name)
                if (not native or backend.supports("transforms")) and backend.supports(capability):
                    names.append(name)
            elif self._cached_has(name, capability, native):
                names.append(name)
        return names

    def _cached_has(self, name: str, capability: str, native: bool) -> bool:
        if self.failure(name) is not None:  # loading runs no probe
            return False
        backend = self.get(name)
        if native and not cached_support(backend, "transforms"):
            return False
        if capability in backend.by_construction:
            return True
        return bool(cached_support(backend, capability))

    # -- plugins --------------------------------------------------------------

    def register(self, name: str, factory: Any, *, replace: bool = False) -> None:
        """Register a backend from code, for programs that ship no entry points.

        Parameters
        ----------
        name : str
            The name to select it by. Built-in names and ``"auto"`` are refused.
            A registered name takes precedence over a plugin of the same name.
        factory : Backend subclass, Backend instance, or callable
            Called with no arguments to make the backend (an instance is used
            as it is). It is checked when first loaded, like a plugin.
        replace : bool
            Allow replacing an earlier registration of the same name.

        Raises
        ------
        ValueError
            For a name that cannot be selected, a built-in name, or a name
            already registered (without ``replace=True``).
        """
        why = _bad_name(name)
        if why:
            raise ValueError(f"a backend name must be {why}, got {name!r}")
        if name in _BUILTINS or name == AUTO:
            raise ValueError(f"{name!r} is reserved for a built-in backend; choose another name")
        with self._lock:
            if name in self._registered and not replace:
                raise ValueError(
                    f"a backend named {name!r} is already registered; pass replace=True"
                )
            self._change(register={name: Entry(name, "registered", factory)})

    def unregister(self, name: str) -> None:
        """Remove a backend added by :meth:`register`.

        Raises
        ------
        UnknownBackendError
            When no backend of that name was registered from code (built-ins
            and plugins cannot be unregistered); it lists those that were.
        """
        with self._lock:
            if name not in self._registered:
                raise UnknownBackendError(name, sorted(self._registered), "unregister()")
            self._change(unregister=name)

    def problems(self) -> List[str]:
        """Problems with installed plugins, one line each, naming the distribution.

        They are: distributions whose metadata cannot be read, names that can
        never be selected (a built-in's name, ``auto``), names claimed by two
        distributions, plugins that were tried and did not load, and claimed
        capabilities (``Backend.claims``) that the probes refute for plugins
        already loaded. Nothing is loaded to answer; claimed probes of loaded
        plugins are run (once per process).
        """
        with self._lock:
            self._scan()
            found = list(self._problems)
            for name, err in sorted(self._failed.items()):
                entry = self._plugins.get(name) if self._plugins is not None else None
                if entry is not None and name not in self._registered:
                    found.append(f"plugin {name!r} does not load: {err.reason}")
            loaded = sorted(self._loaded.items())
        for name, backend in loaded:
            if backend.origin == "built-in":
                continue
            for cap in _claims(backend):
                support = backend.supports(cap)
                if not support:
                    text = (
                        f"{_describe_backend(backend)} claims capability {cap!r}, but its "
                        f"probe fails: {support.reason}"
                    )
                    with self._lock:
                        self._report(f"claim:{name}:{backend.distribution}:{cap}", text)
                    found.append(text)
        return found

    def refresh(self) -> None:
        """Forget the entry point scan and every plugin load, so new installs are seen.

        Problems already logged are not logged again.
        """
        self._change(rescan=True)

    def _change(
        self,
        register: Optional[Dict[str, Entry]] = None,
        unregister: Optional[str] = None,
        rescan: bool = False,
    ) -> None:
        """The one path by which the registry's contents change.

        Every cache that depends on the registry notices through
        :attr:`generation`, whichever public method made the change.
        """
        with self._lock:
            for name, entry in (register or {}).items():
                self._registered[name] = entry
                self._loaded.pop(name, None)
                self._failed.pop(name, None)
            if unregister is not None:
                del self._registered[unregister]
                self._loaded.pop(unregister, None)
                self._failed.pop(unregister, None)
            if rescan:
                self._plugins = None
                self._conflicts = {}
                self._problems = []
                for name in list(self._loaded) + list(self._failed):
                    if name not in _BUILTINS and name not in self._registered:
                        self._loaded.pop(name, None)
                        self._failed.pop(name, None)
            self._native = None
            self.generation += 1

    def _scan(self) -> Dict[str, Entry]:
        if self._plugins is not None:
            return self._plugins
        entries, problems = _read_entry_points()
        plugins, conflicts, more = _sort_entries(entries)
        problems.extend(more)
        for name in sorted(set(plugins) & set(self._registered)):
            problems.append(
                f"plugin {name!r} from distribution {plugins[name].distribution!r} is "
                f"shadowed by a backend registered with adbackends.register()"
            )
        self._plugins = plugins
        self._conflicts = conflicts
        self._problems = problems
        for text in problems:
            self._report(text, text)
        if plugins:
            log.debug("found plugins: %s", ", ".join(sorted(plugins)))
        return plugins

    def _report(self, key: str, text: str) -> None:
        """Log a problem once per process."""
        if key in self._reported:
            return
        self._reported.add(key)
        log.warning("%s", text)


# -- reading and sorting entry points ------------------------------------------


def _distributions() -> List[Any]:
    # Only the Python 3.8 API is used (distributions, entry_points, metadata,
    # version), so the standard library suffices on every supported Python.
    from importlib.metadata import distributions

    return list(distributions())


def _normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _read_entry_points() -> Tuple[List[Entry], List[str]]:
    """Every ``adbackends.backends`` entry point installed, and unreadable distributions.

    A distribution found on two ``sys.path`` entries (a lib/lib64 link, a
    second site directory) counts once: the first, as for ``import``.
    """
    entries: List[Entry] = []
    problems: List[str] = []
    seen: Set[str] = set()
    try:
        dists = _distributions()
    except Exception as exc:  # a broken metadata finder must not break the registry
        return [], [f"cannot list installed distributions: {summarize_exception(exc)}"]
    for dist in dists:
        try:
            eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        except Exception as exc:
            problems.append(
                f"distribution {_label(dist)!r} has unreadable entry points and is "
                f"ignored: {summarize_exception(exc)}"
            )
            continue
        if not eps:
            continue
        label = _label(dist)
        key = _normalize(label)
        if key in seen:
            continue
        seen.add(key)
        try:
            version: Optional[str] = str(dist.version)
        except Exception:
            version = None
        for ep in eps:
            entries.append(Entry(ep.name, "plugin", ep, label, version))
    return entries, problems


def _label(dist: Any) -> str:
    """A distribution's name, or where it is when its metadata has none."""
    try:
        name = dist.metadata["Name"]
    except Exception:
        name = None
    if name:
        return str(name)
    path = getattr(dist, "_path", None)
    return f"<distribution without a name at {path}>" if path else "<unnamed distribution>"


def _sort_entries(
    entries: List[Entry],
) -> Tuple[Dict[str, Entry], Dict[str, List[Entry]], List[str]]:
    """Split entries into usable plugins, conflicting names, and problems.

    Entries that agree on distribution and target are one entry. A name from
    two or more distributions is a conflict: none of them is used, and
    selecting the name raises an error naming all of them.
    """
    by_name: Dict[str, List[Entry]] = {}
    problems: List[str] = []
    for entry in entries:
        why = _bad_name(entry.name)
        if why:
            problems.append(
                f"plugin {entry.name!r} from distribution {entry.distribution!r} is "
                f"ignored: its name must be {why}"
            )
            continue
        if entry.name in _BUILTINS or entry.name == AUTO:
            problems.append(
                f"plugin {entry.name!r} from distribution {entry.distribution!r} claims "
                f"the name of a built-in backend and is ignored; the built-in is used"
            )
            continue
        same = by_name.setdefault(entry.name, [])
        if any((e.distribution, e.value) == (entry.distribution, entry.value) for e in same):
            continue  # the same declaration seen twice
        same.append(entry)
    plugins: Dict[str, Entry] = {}
    conflicts: Dict[str, List[Entry]] = {}
    for name, found in by_name.items():
        dists = {e.distribution for e in found}
        if len(found) == 1:
            plugins[name] = found[0]
        elif len(dists) == 1:
            # One distribution declaring one name twice: ambiguous, say so.
            conflicts[name] = found
            problems.append(
                f"plugin {name!r} is declared more than once by distribution "
                f"{found[0].distribution!r} ({', '.join(e.value for e in found)}); "
                f"it is not used"
            )
        else:
            conflicts[name] = found
            problems.append(
                f"plugin {name!r} is declared by {len(found)} distributions, "
                f"{_names(found)}; none of them is used"
            )
    return plugins, conflicts, problems


def _names(entries: List[Entry]) -> str:
    quoted = [repr(e.distribution) for e in entries]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _conflict_error(name: str, entries: List[Entry]) -> PluginError:
    if len({e.distribution for e in entries}) == 1:
        reason = (
            f"distribution {entries[0].distribution!r} declares it more than once "
            f"({', '.join(e.value for e in entries)})"
        )
        hint = "Fix the distribution's entry points"
    else:
        reason = f"{len(entries)} installed distributions declare a backend of this name: " + (
            _names(entries)
        )
        hint = "Uninstall all of them but one"
    return PluginError(name, reason, entries[0].distribution or "?", hint)


def _bad_name(name: Any) -> str:
    """Why ``name`` cannot be a backend name ("" when it can)."""
    if not isinstance(name, str) or not name.strip():
        return "a non-empty str"
    if name != name.strip() or "," in name or ">" in name:
        return (
            "a str without commas, '>' or surrounding spaces (selections split names on "
            "commas and chain them with '>')"
        )
    return ""


# -- making and checking backend objects ---------------------------------------


def _resolve_target(entry: Entry) -> Any:
    target = entry.target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    if hasattr(target, "load") and hasattr(target, "group"):  # an EntryPoint
        return target.load()
    return target


def _make_backend(obj: Any, entry: Entry) -> Backend:
    """The backend an entry point's object stands for, checked against the contract."""
    if isinstance(obj, type) and issubclass(obj, Backend):
        _check_contract(getattr(obj, "contract", None), entry)
        backend = obj()
    elif isinstance(obj, Backend):
        backend = obj
    elif callable(obj) and not isinstance(obj, type):
        backend = obj()
        if not isinstance(backend, Backend):
            raise TypeError(
                f"the factory {_qualname(obj)} for {entry.name!r} returned "
                f"{type(backend).__name__}, not an adbackends.Backend"
            )
    else:
        raise TypeError(
            f"{entry.value or entry.name!r} is {_qualname(obj)}, which is neither an "
            f"adbackends.Backend subclass nor a zero-argument factory returning a Backend"
        )
    _check_contract(getattr(backend, "contract", None), entry)
    if not backend.name:
        backend.name = entry.name
    elif backend.name != entry.name:
        raise TypeError(
            f"backend object calls itself {backend.name!r} but is registered as "
            f"{entry.name!r}; the two must agree (or leave Backend.name empty)"
        )
    if entry.origin != "built-in":
        backend.origin = entry.origin
        backend.distribution = entry.distribution
    return backend


def _check_contract(contract: Any, entry: Entry) -> None:
    if isinstance(contract, int) and not isinstance(contract, bool) and contract in CONTRACTS:
        return
    known = " and ".join(str(c) for c in CONTRACTS)
    raise TypeError(
        f"backend {entry.name!r} was written for backend contract {contract!r}, but "
        f"this adbackends implements contracts {known}; install a version of the plugin "
        f"written for contract {CONTRACT_VERSION}, or an adbackends that implements "
        f"contract {contract!r}"
    )


def _note_derived(backend: Backend) -> None:
    """Say once, at INFO, which transforms a plugin gets from the base class."""
    ways = backend.transforms()
    derived = [
        f"{name} ({how[len('derived ') :]})"
        for name, how in ways.items()
        if how.startswith("derived")
    ]
    missing = [name for name, how in ways.items() if how == "missing"]
    if not (derived or missing):
        return
    log.info(
        "backend %r (contract %s) implements %s; derived: %s; missing (raise CapabilityError): %s",
        backend.name,
        backend.contract,
        ", ".join(name for name, how in ways.items() if how == "own"),
        ", ".join(derived) or "none",
        ", ".join(missing) or "none",
    )


def _check_plugin_class(cls: type, entry: Entry) -> None:
    for method in ("jacrev", "vmap"):
        if getattr(cls, method, None) is getattr(Backend, method):
            raise TypeError(
                f"backend class {_qualname(cls)} does not implement {method}(); a backend "
                f"must provide both jacrev and vmap"
            )
    for method in _PROBED_METHODS:
        if getattr(cls, method, None) is not getattr(Backend, method):
            raise TypeError(
                f"backend class {_qualname(cls)} overrides {method}(), but capabilities "
                f"are established by adbackends' probes, not by the backend; remove the "
                f"override and list what the backend should support in Backend.claims"
            )
    _claims_of(cls)


def _claims_of(obj: Any) -> Tuple[str, ...]:
    """A backend's declared claims, checked to be known capability names."""
    from .probes import PROBES

    return check_capability_names(getattr(obj, "claims", ()), PROBES)


def _claims(backend: Backend) -> Tuple[str, ...]:
    try:
        return _claims_of(backend)
    except TypeError:
        return ()


def _check_loaded(backend: Backend, entry: Entry) -> None:
    """After ``load()``: the transforms exist, capabilities are left to the probes,
    and the version (shown in the report) is a str."""
    if entry.origin != "built-in":
        _check_plugin_class(type(backend), entry)
    version = backend.version
    if not isinstance(version, str):
        raise TypeError(
            f"backend {entry.name!r} gives version {version!r}; Backend.version must be a str"
        )


def _probe_identity(backend: Backend, entry: Entry) -> Optional[Dict[str, Any]]:
    """What identifies the code of a backend loaded here, so that its probe answers
    may be kept on disk; ``None`` when nothing does (a backend registered from
    code: nothing tells when such code changes)."""
    origin = backend.origin
    if origin not in ("built-in", "plugin") or origin != entry.origin:
        return None
    cls = type(backend)
    key: Dict[str, Any] = {
        "origin": origin,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "version": str(backend.version),
    }
    if origin == "built-in":
        return key if cls.__module__.startswith("adbackends.") else None
    if not backend.distribution or entry.distribution != backend.distribution:
        return None
    if not entry.dist_version:
        return None
    key["distribution"] = backend.distribution
    key["dist_version"] = entry.dist_version
    # An editable install keeps its version while its code changes.
    key["files"] = _module_fingerprint(cls.__module__)
    return key


def _module_fingerprint(module_name: str) -> Optional[List[int]]:
    """The fingerprint of the package that defines ``module_name`` (or of its file)."""
    from ._probe_cache import fingerprint  # only once the disk cache is in use

    top = sys.modules.get(module_name.partition(".")[0])
    paths = list(getattr(top, "__path__", None) or [])
    if len(paths) == 1:
        found = fingerprint(paths[0])
        if found is not None:
            return found
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [1, info.st_size, info.st_mtime_ns]


def _describe_backend(backend: Backend) -> str:
    if backend.distribution:
        return f"plugin {backend.name!r} from distribution {backend.distribution!r}"
    return f"backend {backend.name!r} ({backend.origin})"


def _qualname(obj: Any) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    name = getattr(obj, "__qualname__", None)
    if name:
        return f"{getattr(obj, '__module__', '?')}.{name}"
    return f"a {type(obj).__name__} object"


def _missing_dependency_hint(exc: BaseException, entry: Entry) -> str:
    """What to install when a plugin's import stops at a module it needs."""
    missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if not missing or entry.origin == "built-in":
        return ""
    own = entry.value.partition(":")[0]
    if own == missing or own.startswith(missing + "."):
        return ""  # the plugin's own module is missing: the distribution is broken
    top = missing.split(".")[0]
    who = f"the distribution {entry.distribution!r}" if entry.distribution else "it"
    return (
        f"The backend needs the module {missing!r}, which is not installed: install the "
        f"package that provides it (often pip install {top}), or reinstall {who} with its "
        f"dependencies"
    )


def _hint(entry: Entry) -> str:
    if entry.origin == "plugin" and entry.distribution:
        return f"Reinstall or update the distribution {entry.distribution!r}"
    return ""


#: The process-wide registry.
REGISTRY = Registry()
