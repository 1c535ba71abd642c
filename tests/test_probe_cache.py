"""Probe results on disk: keyed, atomic, tolerant of bad files, never in the way."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from typing import Any, Dict, Iterator, List, Union

import pytest
import torch

import adbackends
from adbackends import _probe_cache, _version, probes, registry
from adbackends._probe_cache import CACHE_DIR_ENV, NO_CACHE_ENV, cache_dir, cache_file
from adbackends.backends.loop import LoopBackend
from adbackends.probes import clear_probe_cache, probe_origin
from adbackends.registry import REGISTRY


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[str]:
    """Each test gets an empty cache directory of its own, never the user's."""
    directory = str(tmp_path / "cache")
    monkeypatch.setenv(CACHE_DIR_ENV, directory)
    monkeypatch.delenv(NO_CACHE_ENV, raising=False)
    yield directory


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The probes that actually run (not answered from memory or disk)."""
    ran: List[str] = []
    real = probes._run_uncached

    def counting(backend: adbackends.Backend, capability: str) -> probes.Support:
        ran.append(f"{backend.name}:{capability}")
        return real(backend, capability)

    monkeypatch.setattr(probes, "_run_uncached", counting)
    return ran


def _fresh(monkeypatch: pytest.MonkeyPatch, name: str) -> adbackends.Backend:
    """The registry's backend ``name`` without answers; its own come back after the test."""
    failure = REGISTRY.failure(name)
    if failure is not None:
        pytest.skip(f"{name} does not load here: {failure.reason}")
    backend = REGISTRY.get(name)
    fresh = probes._Answers()
    fresh.identity = probes.STORE.record(backend).identity  # what the registry said at load
    monkeypatch.setitem(probes.STORE._records, backend, fresh)
    return backend


def _forget(backend: adbackends.Backend) -> None:
    """What a new process knows about ``backend``: nothing but the file."""
    probes.STORE.forget(backend)


def _document() -> Dict[str, Any]:
    with open(str(cache_file()), encoding="utf-8") as handle:
        return json.load(handle)


def _write_raw(content: Union[str, bytes]) -> None:
    path = str(cache_file())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    with open(path, "wb") as handle:
        handle.write(data)


# -- hit and miss -------------------------------------------------------------------


def test_miss_runs_the_probe_and_stores_it(monkeypatch, runs):
    loop = _fresh(monkeypatch, "loop")
    assert probe_origin(loop) is None
    assert not os.path.exists(str(cache_file()))
    assert loop.supports("legacy_function")
    assert runs == ["loop:legacy_function"]
    assert probe_origin(loop) == "run"
    (environment,) = _document()["environments"]
    assert environment["key"] == _probe_cache.environment_key(probes.PROBES_VERSION)
    stored = environment["backends"]["loop"]["results"]
    assert stored == {"legacy_function": {"ok": True, "reason": None}}


def test_hit_answers_without_running(monkeypatch, runs):
    loop = _fresh(monkeypatch, "loop")
    first = loop.capabilities()
    assert len(runs) == len(probes.PROBES)
    _forget(loop)
    runs.clear()
    assert loop.capabilities() == first
    assert runs == []
    assert probe_origin(loop) == "cache"
    assert probe_origin(loop, "transforms") == "cache"


def test_file_is_read_once_per_backend(monkeypatch):
    loop = _fresh(monkeypatch, "loop")
    loop.capabilities()
    _forget(loop)
    reads: List[str] = []
    real = _probe_cache._read
    monkeypatch.setattr(_probe_cache, "_read", lambda path: reads.append(path) or real(path))
    loop.capabilities()
    assert reads == [cache_file()]


def test_a_new_process_reads_the_answers(tmp_path):
    script = textwrap.dedent(
        """
        import torch, adbackends
        from adbackends.probes import probe_origin
        adbackends.vmap(torch.sin)(torch.zeros(2, 3))
        print(probe_origin(adbackends.get("torch.func")))
        """
    )
    if REGISTRY.failure("torch.func") is not None:
        pytest.skip("torch.func does not load here")
    env = dict(os.environ)
    env.pop("TAD_AD_BACKEND", None)
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert first.stdout.split() == ["run"], first.stderr
    assert second.stdout.split() == ["cache"], second.stderr


# -- the key ------------------------------------------------------------------------


def _assert_changes_invalidate(monkeypatch, backend, runs, change) -> None:
    backend.supports("legacy_function")
    _forget(backend)
    assert backend.supports("legacy_function") is not None
    assert probe_origin(backend) == "cache", "the unchanged key must hit"
    _forget(backend)
    change()
    runs.clear()
    backend.supports("legacy_function")
    assert runs == [f"{backend.name}:legacy_function"]
    assert probe_origin(backend) == "run"


_CHANGES = {
    "python version": lambda mp: mp.setattr(
        _probe_cache, "_python", lambda: {**_PYTHON, "python": "3.99.0.final.0"}
    ),
    "python implementation": lambda mp: mp.setattr(
        _probe_cache, "_python", lambda: {**_PYTHON, "implementation": "pypy"}
    ),
    "torch version": lambda mp: mp.setattr(torch, "__version__", "2.99.0+cu999"),
    "adbackends version": lambda mp: mp.setattr(_version, "__version__", "99.0"),
    "probes version": lambda mp: mp.setattr(probes, "PROBES_VERSION", probes.PROBES_VERSION + 1),
    "adbackends files": lambda mp: mp.setattr(
        _probe_cache, "fingerprint", lambda directory: [0, 0, 0]
    ),
    "backend version": lambda mp: mp.setattr(LoopBackend, "version", property(lambda self: "9.9")),
}
_PYTHON = _probe_cache._python()


@pytest.mark.parametrize("what", list(_CHANGES))
def test_each_key_component_invalidates(monkeypatch, runs, what):
    loop = _fresh(monkeypatch, "loop")
    _assert_changes_invalidate(monkeypatch, loop, runs, lambda: _CHANGES[what](monkeypatch))


def test_a_changed_environment_adds_its_answers_beside_the_old_ones(monkeypatch):
    loop = _fresh(monkeypatch, "loop")
    loop.supports("transforms")
    _forget(loop)
    installed = str(torch.__version__)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    loop.supports("transforms")
    torches = [env["key"]["torch"] for env in _document()["environments"]]
    assert torches == ["2.99.0", installed]


def test_only_the_latest_environments_are_kept(monkeypatch):
    loop = _fresh(monkeypatch, "loop")
    for i in range(_probe_cache._MAX_ENVIRONMENTS + 3):
        _forget(loop)
        monkeypatch.setattr(torch, "__version__", f"2.{i}.0")
        loop.supports("transforms")
    torches = [env["key"]["torch"] for env in _document()["environments"]]
    last = _probe_cache._MAX_ENVIRONMENTS + 2
    assert torches == [f"2.{i}.0" for i in range(last, last - _probe_cache._MAX_ENVIRONMENTS, -1)]


def _plugin(monkeypatch, name: str) -> adbackends.Backend:
    entry = REGISTRY._entry_or_none(name)
    if entry is None or entry.origin != "plugin":
        pytest.skip(f"the plugin {name!r} is not installed")
    return _fresh(monkeypatch, name)


def test_plugin_answers_are_cached_with_the_distribution(monkeypatch, runs):
    plugin = _plugin(monkeypatch, "autograd.functional")
    plugin.supports("legacy_function")
    _forget(plugin)
    runs.clear()
    plugin.supports("legacy_function")
    assert runs == [] and probe_origin(plugin) == "cache"
    key = _document()["environments"][0]["backends"]["autograd.functional"]["key"]
    entry = REGISTRY.entry("autograd.functional")
    assert key["origin"] == "plugin"
    assert key["distribution"] == entry.distribution == plugin.distribution
    assert key["dist_version"] == entry.dist_version
    assert key["version"] == plugin.version


@pytest.mark.parametrize("what", ["dist_version", "distribution", "files", "version"])
def test_a_changed_plugin_invalidates(monkeypatch, runs, what):
    plugin = _plugin(monkeypatch, "autograd.functional")
    entry = REGISTRY.entry("autograd.functional")

    def change() -> None:
        if what == "dist_version":
            changed = entry._replace(dist_version=f"{entry.dist_version}.post1")
            monkeypatch.setattr(REGISTRY, "entry", lambda name: changed)
        elif what == "distribution":
            changed = entry._replace(distribution="someone-else")
            monkeypatch.setattr(REGISTRY, "entry", lambda name: changed)
            monkeypatch.setattr(plugin, "distribution", "someone-else")
        elif what == "files":
            monkeypatch.setattr(registry, "_module_fingerprint", lambda module: [1, 2, 3])
        else:
            monkeypatch.setattr(type(plugin), "version", property(lambda self: "0.0.dev0"))

    _assert_changes_invalidate(monkeypatch, plugin, runs, change)


def test_answers_of_another_name_are_not_used(monkeypatch, runs):
    loop = _fresh(monkeypatch, "loop")
    loop.supports("transforms")
    document = _document()
    backends = document["environments"][0]["backends"]
    backends["loop2"] = backends.pop("loop")
    _write_raw(json.dumps(document))
    _forget(loop)
    runs.clear()
    loop.supports("transforms")
    assert runs == ["loop:transforms"]


# -- what is never cached -----------------------------------------------------------------


class _Mine(LoopBackend):
    name = "mine"


def test_a_registered_backend_is_never_cached(monkeypatch, runs):
    adbackends.register("mine", _Mine)
    try:
        mine = adbackends.get("mine")
        assert mine.origin == "registered"
        mine.supports("legacy_function")
        _forget(mine)
        mine.supports("legacy_function")
    finally:
        adbackends.unregister("mine")
    assert runs == ["mine:legacy_function", "mine:legacy_function"]
    assert probe_origin(mine) == "run"
    assert not os.path.exists(str(cache_file()))


def test_a_backend_made_outside_the_registry_is_never_cached(runs):
    # Same name and origin as the built-in, but not the registry's object.
    class Copy(LoopBackend):
        name = "loop"

    copy = Copy()
    copy.supports("legacy_function")
    _forget(copy)
    copy.supports("legacy_function")
    assert runs == ["loop:legacy_function"] * 2
    assert not os.path.exists(str(cache_file()))


# -- failures ---------------------------------------------------------------------------


def test_a_cached_failure_keeps_its_reason(monkeypatch, runs):
    loop = _fresh(monkeypatch, "loop")
    ran = loop.supports("transforms")
    assert not ran and "loops instead of vectorising" in str(ran.reason)
    _forget(loop)
    runs.clear()
    recalled = loop.supports("transforms")
    assert runs == [] and probe_origin(loop) == "cache"
    assert recalled == ran
    assert not recalled and recalled.reason == ran.reason
    stored = _document()["environments"][0]["backends"]["loop"]["results"]["transforms"]
    assert stored == {"ok": False, "reason": ran.reason}


def test_a_failing_plugin_is_cached_with_its_reason(monkeypatch, runs):
    plugin = _plugin(monkeypatch, "finite-difference")
    ran = plugin.capabilities()
    failed = {cap: s.reason for cap, s in ran.items() if not s}
    _forget(plugin)
    runs.clear()
    again = plugin.capabilities()
    assert runs == []
    assert {cap: s.reason for cap, s in again.items() if not s} == failed


def _records(caplog: Any) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "adbackends" and "probe cache" in r.message]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        b"\xff\xfe garbage",
        "",
        "[1, 2, 3]",
        '{"hello": "world"}',
        '{"format": 1, "environments": "none"}',
        '{"format": 1, "environments": [{"key": {}, "backends": {"loop": {"key": {}, '
        '"results": {"transforms": {"ok": "yes"}}}}}]}',
        '{"format": 1, "environments": [{"key": {}, "backends": {"loop": {"key": {}, '
        '"results": {"transforms": {"ok": false, "reason": null}}}}}]}',
        '{"format": 0, "environments": []}',
        '{"format": 2, "environments": []}',
    ],
    ids=[
        "corrupt",
        "not-utf8",
        "empty",
        "foreign-list",
        "foreign-dict",
        "bad-environments",
        "bad-result",
        "failure-without-reason",
        "stale-format",
        "newer-format",
    ],
)
def test_a_bad_file_is_ignored_and_rewritten(monkeypatch, runs, caplog, content):
    _write_raw(content)
    loop = _fresh(monkeypatch, "loop")
    caplog.set_level(logging.DEBUG, logger="adbackends")
    from adbackends._shared import NOTICES

    NOTICES.reset()
    assert not loop.supports("transforms")
    assert runs == ["loop:transforms"]
    document = _document()
    assert document["format"] == _probe_cache.FORMAT_VERSION
    assert document["environments"][0]["backends"]["loop"]["results"]["transforms"]["ok"] is False
    ignored = [r for r in _records(caplog) if "ignored and rewritten" in r.message]
    assert len(ignored) == 1, [r.message for r in _records(caplog)]
    assert ignored[0].levelno == logging.INFO
    assert all(r.levelno < logging.WARNING for r in caplog.records)


def test_answers_of_an_older_adbackends_are_not_used(monkeypatch, runs):
    loop = _fresh(monkeypatch, "loop")
    loop.supports("transforms")
    document = _document()
    # Claim the opposite answer under an older adbackends: it must not be believed.
    document["environments"][0]["key"]["adbackends"] = "0.0.1"
    document["environments"][0]["backends"]["loop"]["results"]["transforms"] = {
        "ok": True,
        "reason": None,
    }
    _write_raw(json.dumps(document))
    _forget(loop)
    runs.clear()
    assert not loop.supports("transforms")
    assert runs == ["loop:transforms"]
    versions = sorted(env["key"]["adbackends"] for env in _document()["environments"])
    assert versions == sorted(["0.0.1", _version.__version__])


def test_an_unwritable_directory_does_not_break_a_transform(monkeypatch, tmp_path, caplog, runs):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker / "cache"))
    caplog.set_level(logging.DEBUG, logger="adbackends")
    loop = _fresh(monkeypatch, "loop")
    x = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(loop.vmap(torch.sin)(x), x.sin())
    assert loop.supports("legacy_function")
    assert runs == ["loop:legacy_function"]
    failed = [r for r in _records(caplog) if "not written" in r.message]
    assert failed and all(r.levelno == logging.DEBUG for r in failed)


def test_a_full_disk_leaves_no_temporary_file(monkeypatch, caplog, runs):
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    caplog.set_level(logging.DEBUG, logger="adbackends")
    loop = _fresh(monkeypatch, "loop")
    monkeypatch.setattr(_probe_cache.os, "replace", full)
    assert loop.supports("legacy_function")
    assert os.listdir(str(cache_dir())) == []
    assert any("No space left" in r.message for r in _records(caplog))


def test_an_unreadable_file_is_passed_over(monkeypatch, runs):
    os.makedirs(str(cache_file()))  # a directory where the file should be
    loop = _fresh(monkeypatch, "loop")
    assert loop.supports("legacy_function")
    assert runs == ["loop:legacy_function"]


def test_an_error_inside_the_cache_never_reaches_the_caller(monkeypatch, runs):
    def broken(*args: Any) -> None:
        raise RuntimeError("unexpected")

    loop = _fresh(monkeypatch, "loop")
    monkeypatch.setattr(_probe_cache, "_keys", broken)
    assert loop.supports("legacy_function")
    assert runs == ["loop:legacy_function"]


# -- where the file is -------------------------------------------------------------------


def test_the_file_name_carries_the_format_version():
    assert os.path.basename(str(cache_file())) == f"probes-v{_probe_cache.FORMAT_VERSION}.json"


def test_the_environment_variable_moves_it(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert cache_dir() == str(tmp_path / "elsewhere")
    loop = _fresh(monkeypatch, "loop")
    loop.supports("legacy_function")
    assert os.listdir(str(tmp_path / "elsewhere")) == ["probes-v1.json"]


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_the_environment_variable_turns_it_off(monkeypatch, runs, value):
    monkeypatch.setenv(NO_CACHE_ENV, value)
    assert cache_dir() is None and cache_file() is None
    loop = _fresh(monkeypatch, "loop")
    loop.supports("legacy_function")
    _forget(loop)
    loop.supports("legacy_function")
    assert runs == ["loop:legacy_function"] * 2
    monkeypatch.delenv(NO_CACHE_ENV)
    assert not os.path.exists(str(cache_dir()))


@pytest.mark.parametrize("value", ["", "0"])
def test_an_empty_or_zero_switch_leaves_it_on(monkeypatch, value):
    monkeypatch.setenv(NO_CACHE_ENV, value)
    assert cache_dir() is not None


def test_xdg_cache_home_is_honoured(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == os.path.join(str(tmp_path / "xdg"), "adbackends")
    monkeypatch.setenv(CACHE_DIR_ENV, "")  # empty: not set
    assert cache_dir() == os.path.join(str(tmp_path / "xdg"), "adbackends")


@pytest.mark.skipif(os.name == "nt", reason="POSIX home directory layout")
def test_the_default_directories(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "platform", "linux")
    assert cache_dir() == os.path.join(str(tmp_path), ".cache", "adbackends")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the spec says
    assert cache_dir() == os.path.join(str(tmp_path), ".cache", "adbackends")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cache_dir() == os.path.join(str(tmp_path), "Library", "Caches", "adbackends")
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert cache_dir() == os.path.join(str(tmp_path / "Local"), "adbackends")


# -- clearing -------------------------------------------------------------------------------


def test_clear_removes_the_file_and_forgets_answers(monkeypatch, runs):
    loop = _fresh(monkeypatch, "loop")
    loop.supports("legacy_function")
    leftover = os.path.join(str(cache_dir()), ".probes-v1-123-4-abcd.tmp")
    open(leftover, "w").close()
    clear_probe_cache()
    assert os.listdir(str(cache_dir())) == []
    assert probes.cached_support(loop, "legacy_function") is None
    assert probe_origin(loop) is None
    loop.supports("legacy_function")
    assert runs == ["loop:legacy_function"] * 2


def test_the_file_holds_only_what_the_registry_identified(monkeypatch, runs):
    made_by_hand = LoopBackend()  # the same class, not loaded by the registry
    assert made_by_hand.supports("legacy_function")
    assert not os.path.exists(str(cache_file()))  # nothing identifies its code
    loop = _fresh(monkeypatch, "loop")
    assert probes.STORE.record(loop).identity()["class"].endswith("LoopBackend")
    assert loop.supports("legacy_function")
    assert os.path.exists(str(cache_file()))


def test_clear_can_keep_the_answers_in_memory(monkeypatch, runs):
    loop = _fresh(monkeypatch, "loop")
    first = loop.supports("legacy_function")
    clear_probe_cache(forget_loaded=False)
    assert not os.path.exists(str(cache_file()))
    assert loop.supports("legacy_function") is first
    assert runs == ["loop:legacy_function"]


def test_clear_without_a_file_or_with_the_cache_off(monkeypatch):
    clear_probe_cache()
    monkeypatch.setenv(NO_CACHE_ENV, "1")
    clear_probe_cache()


# -- processes ------------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    ready, count = sys.argv[1], int(sys.argv[2])
    import torch, adbackends
    from adbackends.registry import REGISTRY
    names = [n for n in ("loop",) if REGISTRY.failure(n) is None]
    # A barrier: probe only when every process has got this far.
    open(os.path.join(ready, str(os.getpid())), "w").close()
    deadline = time.time() + 120
    while len(os.listdir(ready)) < count and time.time() < deadline:
        time.sleep(0.005)
    answers = {
        name: {cap: [s.ok, s.reason] for cap, s in adbackends.get(name).capabilities().items()}
        for name in names
    }
    print(json.dumps(answers))
    """
)


def _worker(ready: str, count: int, env: Dict[str, str]) -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, ready, str(count)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_processes_starting_together_share_the_file(tmp_path):
    env = dict(os.environ)
    env.pop("TAD_AD_BACKEND", None)
    ready = tmp_path / "ready"
    ready.mkdir()
    workers = [_worker(str(ready), 6, env) for _ in range(6)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        outputs.append(json.loads(out))
    assert all(output == outputs[0] for output in outputs)
    document = _document()
    assert document["format"] == _probe_cache.FORMAT_VERSION
    (environment,) = document["environments"]
    for name, answers in outputs[0].items():
        stored = environment["backends"][name]["results"]
        # A write may overwrite another's at the same moment; what is stored is right.
        assert stored, name
        for cap, result in stored.items():
            assert [result["ok"], result["reason"]] == answers[cap]
    assert not [n for n in os.listdir(str(cache_dir())) if n.endswith(".tmp")]
    # A process that starts after them answers from the file, and agrees.
    after = _worker(str(ready), 0, env)
    out, err = after.communicate(timeout=300)
    assert json.loads(out) == outputs[0], err


# -- import --------------------------------------------------------------------------------


def test_import_does_no_cache_io(tmp_path):
    directory = str(tmp_path / "watched")
    script = textwrap.dedent(
        f"""
        import sys
        touched = []
        def hook(event, args):
            if event in ("open", "os.mkdir", "os.listdir", "os.scandir", "os.remove"):
                if args and {directory!r} in str(args[0]):
                    touched.append((event, str(args[0])))
        sys.addaudithook(hook)
        import adbackends
        import adbackends.plugin
        print("loaded" if "adbackends._probe_cache" in sys.modules else "not loaded")
        print(touched)
        """
    )
    env = dict(os.environ, **{CACHE_DIR_ENV: directory})
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["not loaded", "[]"]
    assert not os.path.exists(directory)
