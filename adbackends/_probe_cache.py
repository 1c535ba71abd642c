"""Probe results kept on disk, so that a new process need not probe again.

A probe's answer depends only on the code that runs it: Python, torch, the
backend (and, for a plugin, the distribution that ships it), adbackends and
the probes themselves. All of that goes into the key under which answers are
stored, so an answer is reused only where the same computation would give it
again. Answers of backends registered from code (``adbackends.register``) are
never stored: nothing tells when such code changes.

The file is JSON with answers and reasons only. It holds the answers of a few
environments (interpreters, virtual environments) side by side, so that
several of them sharing one user cache do not overwrite each other's answers.
It is replaced atomically; a file that cannot be read or parsed is ignored and
rewritten, and a file that cannot be written is passed over. None of this can
make a transform fail.

Where the file is:

- ``ADBACKENDS_NO_CACHE`` set to anything but ``""`` or ``"0"`` turns the disk
  cache off;
- otherwise ``ADBACKENDS_CACHE_DIR`` (when not empty) is the directory;
- otherwise the user's cache directory: ``$XDG_CACHE_HOME/adbackends`` when
  ``XDG_CACHE_HOME`` is set, else ``~/.cache/adbackends`` on Linux,
  ``~/Library/Caches/adbackends`` on macOS and ``%LOCALAPPDATA%\\adbackends``
  on Windows.

Nothing here runs at ``import adbackends``: the file is first read when a
probe's answer is first needed.

This module imports no other module of the package at run time, so that
:mod:`adbackends.probes` can use it without an import cycle: the probes pass
in what it needs to know about them, and the registry is consulted only when
it is already imported (a backend it loaded cannot exist before it is).

Examples
--------
>>> import os, tempfile, torch, adbackends
>>> from adbackends._probe_cache import cache_file, clear_probe_cache, probe_origin
>>> saved = {k: os.environ.pop(k, None) for k in ("ADBACKENDS_CACHE_DIR", "ADBACKENDS_NO_CACHE")}
>>> os.environ["ADBACKENDS_CACHE_DIR"] = tempfile.mkdtemp()
>>> os.path.basename(cache_file())
'probes-v1.json'
>>> clear_probe_cache()
>>> loop = adbackends.get("loop")
>>> bool(loop.supports("legacy_function"))
True
>>> probe_origin(loop, "legacy_function")
'run'
>>> os.path.exists(cache_file())
True
>>> clear_probe_cache()
>>> os.environ.update({k: v for k, v in saved.items() if v is not None})
>>> for k in [k for k, v in saved.items() if v is None]:
...     del os.environ[k]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from .backend import Backend
    from .probes import Support

#: A probe's answer as stored: ``(ok, reason)``.
Answer = Tuple[bool, Optional[str]]

__all__ = [
    "CACHE_DIR_ENV",
    "FORMAT_VERSION",
    "NO_CACHE_ENV",
    "cache_dir",
    "cache_file",
    "clear_probe_cache",
    "environment_key",
    "probe_origin",
]

log = logging.getLogger("adbackends")

#: The layout of the file; it is part of the file's name, so that versions of
#: adbackends with different layouts keep separate files.
FORMAT_VERSION = 1
#: Moves the cache to this directory.
CACHE_DIR_ENV = "ADBACKENDS_CACHE_DIR"
#: Turns the disk cache off (any value but ``""`` and ``"0"``).
NO_CACHE_ENV = "ADBACKENDS_NO_CACHE"

_FILE_NAME = f"probes-v{FORMAT_VERSION}.json"
_TMP_PREFIX = f".probes-v{FORMAT_VERSION}-"
_TMP_SUFFIX = ".tmp"
#: How many environments one file keeps answers for (the most recently written).
_MAX_ENVIRONMENTS = 8
#: A plugin's own files are fingerprinted only when there are at most this many.
_MAX_FINGERPRINT_FILES = 500
#: Only these origins name code that cannot change without a version number
#: or a file changing.
_CACHEABLE_ORIGINS = ("built-in", "plugin")

# Per-backend state, in the backend's __dict__ like the probes' own cache.
_MEMORY_ATTR = "_adbackends_probe_cache"  # the probes' own answers (adbackends.probes)
_KEY_ATTR = "_adbackends_probe_disk_key"  # (probes version, keys or None)
_DISK_ATTR = "_adbackends_probe_disk"  # answers read from the file
_ORIGIN_ATTR = "_adbackends_probe_origin"  # capability -> "cache" | "run"

_logged: set = set()
_log_lock = threading.Lock()
# Backends whose answers this module has seen, so that clearing can forget them.
_seen: weakref.WeakSet[Backend] = weakref.WeakSet()


# -- where ----------------------------------------------------------------------


def cache_dir() -> Optional[str]:
    """The directory of the probe cache, or ``None`` when the cache is off.

    Examples
    --------
    >>> import os
    >>> from adbackends._probe_cache import cache_dir
    >>> os.environ["ADBACKENDS_NO_CACHE"] = "1"
    >>> cache_dir() is None
    True
    >>> del os.environ["ADBACKENDS_NO_CACHE"]
    """
    if os.environ.get(NO_CACHE_ENV, "") not in ("", "0"):
        return None
    moved = os.environ.get(CACHE_DIR_ENV, "")
    if moved:
        return os.path.abspath(os.path.expanduser(moved))
    return _user_cache_dir()


def cache_file() -> Optional[str]:
    """The path of the probe cache file, or ``None`` when the cache is off."""
    directory = cache_dir()
    return None if directory is None else os.path.join(directory, _FILE_NAME)


def _user_cache_dir() -> Optional[str]:
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.join("~", "AppData", "Local")
        base = os.path.expanduser(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        if os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
            base = xdg
        elif sys.platform == "darwin":
            base = os.path.expanduser(os.path.join("~", "Library", "Caches"))
        else:
            base = os.path.expanduser(os.path.join("~", ".cache"))
    if base.startswith("~"):
        return None  # no home directory: nowhere sensible to write
    return os.path.join(base, "adbackends")


# -- keys -------------------------------------------------------------------------


def _python() -> Dict[str, str]:
    return {
        "python": ".".join(str(part) for part in sys.version_info[:5]),
        "implementation": sys.implementation.name,
        "platform": sys.platform,
    }


def environment_key(probes_version: int) -> Dict[str, Any]:
    """Everything outside a backend that can change a probe's answer.

    Python (version and implementation), torch's version with its local tag
    (``+cpu``, ``+cu121``), adbackends' version, ``probes_version`` (that is
    ``adbackends.probes.PROBES_VERSION``) and a fingerprint of adbackends' own
    files, which changes when they are edited or reinstalled.

    Examples
    --------
    >>> from adbackends._probe_cache import environment_key
    >>> sorted(environment_key(1))
    ['adbackends', 'adbackends_files', 'implementation', 'platform', 'probes', 'python', 'torch']
    """
    import torch

    from ._version import __version__

    key: Dict[str, Any] = _python()
    key["torch"] = str(torch.__version__)
    key["adbackends"] = str(__version__)
    key["adbackends_files"] = _fingerprint(os.path.dirname(os.path.abspath(__file__)))
    key["probes"] = probes_version
    return key


def _backend_key(backend: Backend) -> Optional[Dict[str, Any]]:
    """What identifies the code of ``backend``, or ``None`` when it must not be cached."""
    origin = backend.origin
    if origin not in _CACHEABLE_ORIGINS:
        return None
    # Looked up, not imported: the registry imports the probes, which import
    # this module. A backend the registry loaded implies it is imported.
    registry = sys.modules.get("adbackends.registry")
    if registry is None:
        return None
    # Only the registry's own object for the name: an instance made some
    # other way (a subclass, a copy under test) is code we cannot identify.
    if registry.REGISTRY.loaded(backend.name) is not backend:
        return None
    cls = type(backend)
    key: Dict[str, Any] = {
        "origin": origin,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "version": str(backend.version),
    }
    if origin == "built-in":
        if backend.name not in registry.BUILTINS or not cls.__module__.startswith("adbackends."):
            return None
        return key
    entry = registry.REGISTRY.entry(backend.name)
    if (
        entry.origin != "plugin"
        or not backend.distribution
        or entry.distribution != backend.distribution
        or not entry.dist_version
    ):
        return None
    key["distribution"] = backend.distribution
    key["dist_version"] = entry.dist_version
    # An editable install keeps its version while its code changes.
    key["files"] = _module_fingerprint(cls.__module__)
    return key


def _fingerprint(directory: str) -> Optional[List[int]]:
    """``[files, total size, newest mtime in ns]`` of the ``.py`` files under ``directory``."""
    count = size = newest = 0
    stack = [directory]
    try:
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name != "__pycache__" and not entry.name.startswith("."):
                            stack.append(entry.path)
                    elif entry.name.endswith(".py"):
                        info = entry.stat()
                        count += 1
                        if count > _MAX_FINGERPRINT_FILES:
                            return None
                        size += info.st_size
                        newest = max(newest, info.st_mtime_ns)
    except OSError:
        return None
    return [count, size, newest]


def _module_fingerprint(module_name: str) -> Optional[List[int]]:
    """The fingerprint of the package that defines ``module_name`` (or of its file)."""
    top = sys.modules.get(module_name.partition(".")[0])
    paths = list(getattr(top, "__path__", None) or [])
    if len(paths) == 1:
        found = _fingerprint(paths[0])
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


def _keys(backend: Backend, probes_version: int) -> Optional[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(environment key, backend key) for ``backend``, worked out once per backend."""
    memo = backend.__dict__.get(_KEY_ATTR)
    if memo is not None and memo[0] == probes_version:
        return memo[1]
    keys: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None
    backend_key = _backend_key(backend)
    if backend_key is not None:
        keys = (environment_key(probes_version), backend_key)
    backend.__dict__[_KEY_ATTR] = (probes_version, keys)
    return keys


# -- the hook used by run_probe -------------------------------------------------------


def recall(backend: Backend, capability: str, probes_version: int) -> Optional[Answer]:
    """The stored answer ``(ok, reason)`` of probe ``capability`` for ``backend``, or ``None``.

    The file is read at most once per backend and process. Never raises.
    """
    try:
        _watch(backend)
        answers = backend.__dict__.get(_DISK_ATTR)
        if answers is None:
            path = cache_file()
            if path is None:
                return None
            answers = {}
            keys = _keys(backend, probes_version)
            if keys is not None:
                document = _read(path)
                if document is not None:
                    answers = _answers(document, keys, backend.name, path)
            backend.__dict__[_DISK_ATTR] = answers
        found = answers.get(capability)
        if found is not None:
            backend.__dict__.setdefault(_ORIGIN_ATTR, {})[capability] = "cache"
            log.debug("probe %s on backend %r: answer from disk", capability, backend.name)
        return found
    except Exception as exc:  # the cache must never break a transform
        log.debug("probe cache not read: %s: %s", type(exc).__name__, exc)
        return None


def remember(backend: Backend, support: Support, probes_version: int) -> None:
    """Note that ``support`` was found by running the probe, and store it. Never raises."""
    try:
        _watch(backend)
        backend.__dict__.setdefault(_ORIGIN_ATTR, {})[support.capability] = "run"
        path = cache_file()
        if path is None:
            return
        keys = _keys(backend, probes_version)
        if keys is not None:
            _store(path, keys, backend.name, support)
    except Exception as exc:
        log.debug("probe cache not written: %s: %s", type(exc).__name__, exc)


def probe_origin(backend: Backend, capability: Optional[str] = None) -> Optional[str]:
    """Where ``backend``'s probe answers in this process came from.

    Parameters
    ----------
    backend : Backend
        The backend.
    capability : str, optional
        One probe; by default all of those answered so far.

    Returns
    -------
    str or None
        ``"cache"`` when every answer was read from the disk cache, ``"run"``
        when at least one probe ran in this process, ``None`` when no answer
        has been asked for yet.

    Examples
    --------
    >>> import adbackends
    >>> from adbackends._probe_cache import probe_origin
    >>> backend = adbackends.Backend()
    >>> probe_origin(backend) is None
    True
    """
    origins: Dict[str, str] = backend.__dict__.get(_ORIGIN_ATTR, {})
    if capability is not None:
        return origins.get(capability)
    if not origins:
        return None
    return "run" if "run" in origins.values() else "cache"


def clear_probe_cache(*, forget_loaded: bool = True) -> None:
    """Delete the probe cache file (and temporary files a crash left behind).

    Parameters
    ----------
    forget_loaded : bool
        Also forget the answers that backends in this process hold, so that
        their probes run again when next needed. With ``False`` they keep
        them (and do not write them back to disk).

    Examples
    --------
    >>> import os, tempfile, adbackends
    >>> from adbackends._probe_cache import cache_file, clear_probe_cache
    >>> os.environ["ADBACKENDS_CACHE_DIR"] = tempfile.mkdtemp()
    >>> _ = adbackends.get("loop").supports("transforms")
    >>> clear_probe_cache()
    >>> os.path.exists(cache_file())
    False
    >>> del os.environ["ADBACKENDS_CACHE_DIR"]
    """
    directory = cache_dir()
    if directory is not None:
        try:
            names = os.listdir(directory)
        except OSError:
            names = []
        for name in names:
            if name == _FILE_NAME or (name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)):
                try:
                    os.remove(os.path.join(directory, name))
                except OSError as exc:
                    log.debug("could not remove %s: %s", name, exc)
    if forget_loaded:
        # Without the probes' lock: a probe finishing meanwhile stores its
        # answer in a dict no longer reachable, and it is probed again.
        for backend in list(_seen):
            for attr in (_MEMORY_ATTR, _DISK_ATTR, _ORIGIN_ATTR, _KEY_ATTR):
                backend.__dict__.pop(attr, None)


def _watch(backend: Backend) -> None:
    try:
        _seen.add(backend)
    except TypeError:  # not weakly referenceable: it cannot be forgotten, only kept
        pass


# -- the file ---------------------------------------------------------------------------


def _log_once(message: str, *args: Any) -> None:
    text = message % args
    with _log_lock:
        if text in _logged:
            return
        _logged.add(text)
    log.info(text)


def _read(path: str) -> Optional[Dict[str, Any]]:
    """The parsed file if it is a probe cache of this format; ``None`` otherwise."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.debug("probe cache %s not readable: %s", path, exc)
        return None
    try:
        document = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        _log_once("probe cache %s is corrupt (%s); it is ignored and rewritten", path, exc)
        return None
    problem = _invalid(document)
    if problem:
        _log_once("probe cache %s is ignored and rewritten: %s", path, problem)
        return None
    return document


def _invalid(document: Any) -> str:
    """Why ``document`` is not a probe cache of this format ("" when it is)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        return f"not a probe cache of format {FORMAT_VERSION} (found {found!r})"
    environments = document.get("environments")
    if not isinstance(environments, list):
        return "no list of environments"
    for environment in environments:
        if not isinstance(environment, dict) or not isinstance(environment.get("key"), dict):
            return "an environment without a key"
        backends = environment.get("backends")
        if not isinstance(backends, dict):
            return "an environment without backends"
        for entry in backends.values():
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), dict):
                return "a backend without a key"
            results = entry.get("results")
            if not isinstance(results, dict):
                return "a backend without results"
            for result in results.values():
                if not _valid_result(result):
                    return f"a malformed result {result!r}"
    return ""


def _valid_result(result: Any) -> bool:
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        return False
    reason = result.get("reason")
    if result["ok"]:
        return reason is None
    return isinstance(reason, str)


def _find(document: Dict[str, Any], environment_key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    for environment in document["environments"]:
        if environment["key"] == environment_key:
            return environment
    return None


def _answers(
    document: Dict[str, Any],
    keys: Tuple[Dict[str, Any], Dict[str, Any]],
    name: str,
    path: str,
) -> Dict[str, Answer]:
    environment = _find(document, keys[0])
    if environment is None:
        log.debug("probe cache %s has no answers for this environment", path)
        return {}
    entry = environment["backends"].get(name)
    if entry is None or entry["key"] != keys[1]:
        log.debug("probe cache %s has no answers for this backend %r", path, name)
        return {}
    return {cap: (result["ok"], result.get("reason")) for cap, result in entry["results"].items()}


def _store(
    path: str,
    keys: Tuple[Dict[str, Any], Dict[str, Any]],
    name: str,
    support: Support,
) -> None:
    # Read again just before writing: another process may have added answers.
    document = _read(path) or {"format": FORMAT_VERSION, "environments": []}
    environments: List[Dict[str, Any]] = document["environments"]
    environment = _find(document, keys[0])
    if environment is None:
        environment = {"key": keys[0], "backends": {}}
    else:
        environments.remove(environment)
    entry = environment["backends"].get(name)
    if entry is None or entry["key"] != keys[1]:
        entry = environment["backends"][name] = {"key": keys[1], "results": {}}
    result = {"ok": bool(support.ok), "reason": None if support.ok else str(support.reason)}
    changed = entry["results"].get(support.capability) != result
    entry["results"][support.capability] = result
    environment["written"] = time.time()
    # Most recently written first; the oldest environments drop out.
    document["environments"] = [environment, *environments][:_MAX_ENVIRONMENTS]
    if changed:
        _write(path, document)


def _write(path: str, document: Dict[str, Any]) -> None:
    """Replace ``path`` by ``document`` atomically; on failure log at DEBUG and go on."""
    directory = os.path.dirname(path)
    # Unique per process and thread; created like any file, so the umask applies.
    tmp = os.path.join(
        directory,
        f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}{_TMP_SUFFIX}",
    )
    created = False
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
            handle.write("\n")
        # Readers see the old file or the new one, never a part of either.
        os.replace(tmp, path)
        created = False
    except OSError as exc:
        log.debug("probe cache %s not written: %s", path, exc)
    finally:
        if created:
            try:
                os.remove(tmp)
            except OSError:
                pass
