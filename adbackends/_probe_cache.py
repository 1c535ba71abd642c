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

This module imports no other module of the package but ``_shared``, so that
:mod:`adbackends.probes` can use it without an import cycle. It knows no
backend: the probes' store hands it a backend's name and the key that
identifies its code (which the registry worked out when it loaded the
backend), and keeps what is read in that backend's record.

Examples
--------
>>> import os, tempfile, torch, adbackends
>>> from adbackends._probe_cache import cache_file
>>> from adbackends.probes import clear_probe_cache, probe_origin
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
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ._shared import NOTICES

if TYPE_CHECKING:
    from .probes import Support, _Answers

#: A probe's answer as stored: ``(ok, reason)``.
Answer = Tuple[bool, Optional[str]]

__all__ = [
    "CACHE_DIR_ENV",
    "FORMAT_VERSION",
    "NO_CACHE_ENV",
    "cache_dir",
    "cache_file",
    "delete_files",
    "environment_key",
    "fingerprint",
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
    key["adbackends_files"] = fingerprint(os.path.dirname(os.path.abspath(__file__)))
    key["probes"] = probes_version
    return key


def fingerprint(directory: str) -> Optional[List[int]]:
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


def _keys(record: _Answers, probes_version: int) -> Optional[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(environment key, backend key) for a backend's record, worked out once per record."""
    memo = record.keys
    if memo is not None and memo[0] == probes_version:
        return memo[1]
    keys: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None
    identity = None if record.identity is None else record.identity()
    if identity is not None:
        keys = (environment_key(probes_version), identity)
    record.keys = (probes_version, keys)
    return keys


# -- the hooks used by the probes' store ------------------------------------------------


def recall(record: _Answers, name: str, capability: str, probes_version: int) -> Optional[Answer]:
    """The stored answer ``(ok, reason)`` of probe ``capability``, or ``None``.

    ``record`` is the backend's record in the probes' store (its identity,
    and the answers read for it). The file is read at most once per record.
    Never raises.
    """
    try:
        answers = record.disk
        if answers is None:
            path = cache_file()
            if path is None:
                return None
            answers = {}
            keys = _keys(record, probes_version)
            if keys is not None:
                document = _read(path)
                if document is not None:
                    answers = _answers(document, keys, name, path)
            record.disk = answers
        found = answers.get(capability)
        if found is not None:
            record.origin[capability] = "cache"
            log.debug("probe %s on backend %r: answer from disk", capability, name)
        return found
    except Exception as exc:  # the cache must never break a transform
        log.debug("probe cache not read: %s: %s", type(exc).__name__, exc)
        return None


def remember(record: _Answers, name: str, support: Support, probes_version: int) -> None:
    """Note that ``support`` was found by running the probe, and store it. Never raises."""
    try:
        record.origin[support.capability] = "run"
        path = cache_file()
        if path is None:
            return
        keys = _keys(record, probes_version)
        if keys is not None:
            _store(path, keys, name, support)
    except Exception as exc:
        log.debug("probe cache not written: %s: %s", type(exc).__name__, exc)


def delete_files() -> None:
    """Delete the probe cache file and temporary files a crash left behind."""
    directory = cache_dir()
    if directory is None:
        return
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


# -- the file ---------------------------------------------------------------------------


def _log_once(message: str, *args: Any) -> None:
    text = message % args
    if NOTICES.first(("probe cache", text)):
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
