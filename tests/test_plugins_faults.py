"""Broken plugins never break the registry.

Every case installs real distributions: a ``*.dist-info`` directory with
METADATA and entry_points.txt, plus the plugin's module, in a fresh directory
put on ``sys.path``. The registry finds them through importlib.metadata,
exactly as it finds a plugin installed with pip.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import adbackends
from adbackends import cli, selection
from adbackends.registry import REGISTRY
from adbackends.selection import AUTO_ORDER

from .conftest import env_without_backend

_counter = itertools.count()

GOOD_BACKEND = """
from adbackends import Backend
from adbackends.backends import loop


class GoodBackend(Backend):
    claims = ("custom_function",)

    def jacrev(self, func, argnums=0, *, has_aux=False, chunk_size=None,
               _preallocate_and_copy=False):
        return loop.jacrev(func, argnums, has_aux=has_aux, chunk_size=chunk_size)

    def vmap(self, func, in_dims=0, out_dims=0, randomness="error", *, chunk_size=None):
        return loop.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)
"""


def write_distribution(
    site: Path,
    dist: str,
    entry_points: Dict[str, str],
    modules: Optional[Dict[str, str]] = None,
    version: str = "1.0",
) -> None:
    """Install a distribution into ``site`` the way pip lays it out."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = ["[adbackends.backends]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")


class Site:
    """A directory on sys.path that plugins are installed into."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.tag = f"p{os.getpid()}_{next(_counter)}"
        self.modules: List[str] = []

    def module(self, stem: str) -> str:
        """A module name unique to this test, so sys.modules never mixes tests."""
        name = f"adb_{stem}_{self.tag}"
        self.modules.append(name)
        return name

    def install(self, dist: str, entry_points: Dict[str, str], **modules: str) -> None:
        write_distribution(self.root, dist, entry_points, modules)

    def activate(self, *extra: Path) -> None:
        """Put the site (and any links to it) on sys.path, then rescan."""
        for path in (self.root, *extra):
            self.monkeypatch.syspath_prepend(str(path))
        adbackends.refresh()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    root = tmp_path / "site-packages"
    root.mkdir()
    made = Site(root, monkeypatch)
    yield made
    monkeypatch.undo()
    for name in made.modules:
        sys.modules.pop(name, None)
    adbackends.refresh()


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> List[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "adbackends" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def assert_registry_still_works(broken: str) -> None:
    """The built-ins, available() and the report all survive a broken plugin."""
    names = adbackends.available()
    assert "loop" in names and broken not in names
    assert [n for n in names if n in AUTO_ORDER] == [
        n for n in AUTO_ORDER if REGISTRY.failure(n) is None
    ]
    assert adbackends.get("loop").name == "loop"
    data = cli.report()
    assert data["active"]["error"] is None
    assert data["active"]["name"].split(">")[0] in AUTO_ORDER  # a plugin never becomes auto
    by_name = {item["name"]: item for item in data["backends"]}
    assert by_name["loop"]["status"] == "ok"
    json.dumps(data)  # the report stays plain data


# -- loading faults: import error, missing attribute, not a backend, contract ----

LOAD_FAULTS = {
    "import-raises": (
        "{mod}:Backend",
        "raise RuntimeError('plugin import exploded')\n",
        RuntimeError,
        "plugin import exploded",
    ),
    "missing-attribute": (
        "{mod}:NoSuchBackend",
        "VALUE = 1\n",
        AttributeError,
        "NoSuchBackend",
    ),
    "not-a-backend": (
        "{mod}:NOT_A_BACKEND",
        "NOT_A_BACKEND = 42\n",
        TypeError,
        "neither an adbackends.Backend subclass nor a zero-argument factory",
    ),
    "factory-returns-junk": (
        "{mod}:make",
        "def make():\n    return 'not a backend'\n",
        TypeError,
        "returned str, not an adbackends.Backend",
    ),
    "other-contract": (
        "{mod}:Future",
        GOOD_BACKEND + "\nclass Future(GoodBackend):\n    contract = 99\n",
        TypeError,
        "written for backend contract 99",
    ),
    "overrides-supports": (
        "{mod}:Liar",
        GOOD_BACKEND
        + "\nclass Liar(GoodBackend):\n    def supports(self, capability):\n"
        + "        raise RuntimeError('probe exploded')\n",
        TypeError,
        "overrides supports()",
    ),
    "unknown-claim": (
        "{mod}:Boastful",
        GOOD_BACKEND + "\nclass Boastful(GoodBackend):\n    claims = ('telepathy',)\n",
        TypeError,
        "unknown capabilities ['telepathy']",
    ),
    "load-raises": (
        "{mod}:NeedsGpu",
        GOOD_BACKEND
        + "\nclass NeedsGpu(GoodBackend):\n    install_hint = 'pip install gpu-thing'\n"
        + "    def load(self):\n        raise ImportError('no gpu-thing here')\n",
        ImportError,
        "no gpu-thing here",
    ),
}


@pytest.mark.parametrize("fault", sorted(LOAD_FAULTS))
def test_plugin_that_does_not_load_is_isolated_reported_once_and_chained(
    site: Site, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    target, source, cause, detail = LOAD_FAULTS[fault]
    mod = site.module(fault.replace("-", "_"))
    dist = f"adbackends-{fault}"
    name = f"broken-{fault}"
    site.install(dist, {name: target.format(mod=mod)}, **{mod: source})
    caplog.set_level(logging.WARNING, logger="adbackends")
    site.activate()

    assert name in REGISTRY.names()  # listed, so the report can say what is wrong
    assert_registry_still_works(name)
    assert_registry_still_works(name)

    for select in (adbackends.get, adbackends.use):
        with pytest.raises(adbackends.PluginError) as info:
            select(name)
        err = info.value
        assert isinstance(err, adbackends.BackendUnavailableError)
        assert err.distribution == dist
        assert dist in str(err) and detail in str(err)
        assert isinstance(err.__cause__, cause)
    assert adbackends.current().name.split(">")[0] in AUTO_ORDER  # the failed use() changed nothing
    monkeypatch.setenv(selection.ENV_VAR, name)
    with pytest.raises(adbackends.PluginError) as info:
        adbackends.current()
    assert isinstance(info.value.__cause__, cause)
    monkeypatch.setenv(selection.ENV_VAR, f"{name},loop")
    assert adbackends.current().name == "loop"
    monkeypatch.delenv(selection.ENV_VAR)

    reported = warnings_about(caplog, dist)
    assert len(reported) == 1, reported
    assert detail in reported[0]
    problems = REGISTRY.problems()
    assert any(dist in p and detail in p for p in problems), problems

    # A rescan finds the same broken plugin, but it is not reported again.
    adbackends.refresh()
    assert_registry_still_works(name)
    assert len(warnings_about(caplog, dist)) == 1


def test_missing_module_is_reported_with_the_module_name(site: Site) -> None:
    site.install("adbackends-ghost", {"ghost": "adb_module_that_is_not_there:Backend"})
    site.activate()
    with pytest.raises(adbackends.PluginError) as info:
        adbackends.get("ghost")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert "adb_module_that_is_not_there" in info.value.reason
    assert "adbackends-ghost" in info.value.reason
    assert "Reinstall or update the distribution 'adbackends-ghost'" in str(info.value)


# -- probe faults ------------------------------------------------------------------


def test_plugin_whose_transforms_raise_in_probes_loads_and_is_refuted(
    site: Site, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = site.module("exploding")
    source = GOOD_BACKEND + textwrap.dedent(
        """
        class Exploding(GoodBackend):
            def jacrev(self, *args, **kwargs):
                raise RuntimeError("jacrev exploded")
        """
    )
    site.install("adbackends-exploding", {"exploding": f"{mod}:Exploding"}, **{mod: source})
    caplog.set_level(logging.WARNING, logger="adbackends")
    site.activate()

    backend = adbackends.get("exploding")  # it loads: a probe failure is a result
    assert backend.origin == "plugin" and backend.distribution == "adbackends-exploding"
    support = backend.supports("custom_function")
    assert not support and "jacrev exploded" in support.reason
    assert "exploding" in adbackends.available()
    assert_registry_still_works("no such name")

    data = cli.report()
    item = next(i for i in data["backends"] if i["name"] == "exploding")
    assert item["status"] == "ok"
    assert item["capabilities"]["custom_function"]["ok"] is False
    claim = [p for p in data["problems"] if "claims capability 'custom_function'" in p]
    assert claim and "adbackends-exploding" in claim[0] and "jacrev exploded" in claim[0]
    cli.report()
    assert len(warnings_about(caplog, "claims capability 'custom_function'")) == 1

    # Chosen by name it is used as it is; a preference list passes over it.
    with adbackends.using("exploding"):
        with pytest.raises(RuntimeError, match="jacrev exploded"):
            adbackends.jacrev(lambda t: t)
    monkeypatch.setenv(selection.ENV_VAR, "exploding,loop")
    choice = adbackends.explain()
    assert choice.backend.name == "loop"
    assert choice.rejected[0][0] == "exploding" and "jacrev exploded" in choice.rejected[0][1]


# -- duplicates and name clashes ------------------------------------------------------


def test_identical_duplicate_through_a_linked_directory_is_merged_silently(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mod = site.module("twice")
    site.install("adbackends-twice", {"twice": f"{mod}:GoodBackend"}, **{mod: GOOD_BACKEND})
    link = tmp_path / "lib64"
    link.symlink_to(site.root, target_is_directory=True)
    caplog.set_level(logging.WARNING, logger="adbackends")
    site.activate(link)

    assert REGISTRY.names().count("twice") == 1
    assert adbackends.get("twice").distribution == "adbackends-twice"
    assert "twice" in adbackends.available()
    assert not [p for p in REGISTRY.problems() if "twice" in p]
    assert not warnings_about(caplog, "twice")


def test_same_declaration_read_twice_is_one_entry() -> None:
    from adbackends.registry import Entry, _sort_entries

    class EntryPoint:  # the two attributes the registry compares
        value = "pkg.mod:Backend"
        group = "adbackends.backends"

    one = Entry("dup", "plugin", EntryPoint(), "adbackends-dup", "1.0")
    plugins, conflicts, problems = _sort_entries([one, one._replace()])
    assert plugins == {"dup": one} and not conflicts and not problems


def test_two_distributions_claiming_one_name_is_an_error_naming_both(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = site.module("first"), site.module("second")
    site.install("adbackends-first", {"clash": f"{first}:GoodBackend"}, **{first: GOOD_BACKEND})
    site.install("adbackends-second", {"clash": f"{second}:GoodBackend"}, **{second: GOOD_BACKEND})
    caplog.set_level(logging.WARNING, logger="adbackends")
    site.activate()

    assert "clash" in REGISTRY.names()
    assert_registry_still_works("clash")
    for _ in range(2):
        with pytest.raises(adbackends.PluginError) as info:
            adbackends.use("clash")
        assert "'adbackends-first'" in str(info.value)
        assert "'adbackends-second'" in str(info.value)
    # Neither module was imported: an ambiguous name is never guessed.
    assert first not in sys.modules and second not in sys.modules
    reported = warnings_about(caplog, "clash")
    assert len(reported) == 1
    assert "adbackends-first" in reported[0] and "adbackends-second" in reported[0]


def test_plugin_claiming_a_built_in_name_is_ignored_and_reported(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    mod = site.module("impostor")
    source = GOOD_BACKEND + "\nIMPORTED = True\n"
    site.install(
        "adbackends-impostor",
        {"loop": f"{mod}:GoodBackend", "auto": f"{mod}:GoodBackend"},
        **{mod: source},
    )
    caplog.set_level(logging.WARNING, logger="adbackends")
    site.activate()

    loop = adbackends.get("loop")
    assert loop.origin == "built-in" and type(loop).__module__ == "adbackends.backends.loop"
    assert mod not in sys.modules
    assert_registry_still_works("impostor")
    problems = [p for p in REGISTRY.problems() if "adbackends-impostor" in p]
    assert len(problems) == 2
    assert all("built-in" in p for p in problems)
    assert len(warnings_about(caplog, "adbackends-impostor")) == 2  # one per name


def test_plugin_name_that_cannot_be_selected_is_reported(site: Site) -> None:
    mod = site.module("commas")
    site.install("adbackends-commas", {"a,b": f"{mod}:GoodBackend"}, **{mod: GOOD_BACKEND})
    site.activate()
    assert "a,b" not in REGISTRY.names()
    assert any("adbackends-commas" in p and "commas" in p for p in REGISTRY.problems())


# -- the good case, for contrast ----------------------------------------------------


def test_good_plugin_is_found_selected_by_name_and_never_by_auto(site: Site) -> None:
    mod = site.module("good")
    site.install("adbackends-good", {"good": f"{mod}:GoodBackend"}, **{mod: GOOD_BACKEND})
    auto_before = adbackends.current().name
    site.activate()

    assert "good" in adbackends.available()
    assert adbackends.current().name == auto_before
    with adbackends.using("good") as backend:
        assert backend.origin == "plugin" and backend.distribution == "adbackends-good"
        assert adbackends.current() is backend
    assert not REGISTRY.problems()
    item = next(i for i in cli.report()["backends"] if i["name"] == "good")
    assert item["distribution"] == "adbackends-good" and item["distribution_version"] == "1.0"


def test_refresh_sees_a_plugin_installed_while_running(site: Site) -> None:
    site.activate()
    assert "late" not in REGISTRY.names()
    mod = site.module("late")
    site.install("adbackends-late", {"late": f"{mod}:GoodBackend"}, **{mod: GOOD_BACKEND})
    adbackends.refresh()
    assert adbackends.get("late").name == "late"


# -- a fresh process with every fault installed at once ---------------------------------


def test_fresh_process_with_every_fault_installed(site: Site) -> None:
    for fault, (target, source, _, _) in LOAD_FAULTS.items():
        mod = f"adb_proc_{fault.replace('-', '_')}"
        site.install(
            f"adbackends-{fault}", {f"broken-{fault}": target.format(mod=mod)}, **{mod: source}
        )
    site.install(
        "adbackends-first", {"clash": "adb_proc_first:GoodBackend"}, adb_proc_first=GOOD_BACKEND
    )
    site.install(
        "adbackends-second", {"clash": "adb_proc_second:GoodBackend"}, adb_proc_second=GOOD_BACKEND
    )
    site.install(
        "adbackends-impostor",
        {"torch.func": "adb_proc_impostor:GoodBackend"},
        adb_proc_impostor=GOOD_BACKEND,
    )
    env = env_without_backend()
    env["PYTHONPATH"] = os.pathsep.join([str(site.root), env.get("PYTHONPATH", "")])

    script = textwrap.dedent(
        """
        import sys
        import adbackends
        from adbackends.registry import REGISTRY
        # importing scanned nothing and imported no plugin
        assert REGISTRY._plugins is None, "entry points scanned at import"
        assert not [m for m in sys.modules if m.startswith("adb_proc_")]
        print(",".join(adbackends.available()))
        try:
            adbackends.use("broken-import-raises")
        except adbackends.PluginError as exc:
            print("CAUSE", type(exc.__cause__).__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "loop" in lines[0].split(",") and "broken" not in lines[0]
    assert lines[1] == "CAUSE RuntimeError"
    # Each problem was logged once, naming its distribution.
    for fault in LOAD_FAULTS:
        lines_naming = [ln for ln in out.stderr.splitlines() if f"'adbackends-{fault}'" in ln]
        assert len(lines_naming) == 1, (fault, out.stderr)

    report = subprocess.run(
        [sys.executable, "-m", "adbackends"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    assert "Plugin problems:" in report.stdout
    for dist in (
        "adbackends-first",
        "adbackends-second",
        "adbackends-impostor",
        "adbackends-import-raises",
        "adbackends-other-contract",
    ):
        assert dist in report.stdout, dist
