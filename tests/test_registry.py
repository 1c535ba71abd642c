"""The registry on its own: lazy scanning, the sorting pipeline, loading rules.

These tests use fresh :class:`Registry` instances, so the process-wide
registry (and the probe results of its backends) is never disturbed. Real
distributions on ``sys.path`` are exercised in test_plugins_faults.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest

import adbackends
from adbackends import registry
from adbackends.backends import loop
from adbackends.registry import Entry, Registry, _sort_entries


class Good(adbackends.Backend):
    def jacrev(
        self,
        func,
        argnums=0,
        *,
        has_aux=False,
        chunk_size=None,  # type: ignore[override]
        _preallocate_and_copy=False,
    ):
        return loop.jacrev(func, argnums, has_aux=has_aux, chunk_size=chunk_size)

    def vmap(self, func, in_dims=0, out_dims=0, randomness="error", *, chunk_size=None):
        return loop.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)


class FakeEntryPoint:
    group = registry.ENTRY_POINT_GROUP

    def __init__(self, name: str, value: str, obj: Any = Good) -> None:
        self.name, self.value, self._obj = name, value, obj

    def load(self) -> Any:
        return self._obj


class FakeDistribution:
    def __init__(self, name: str, *eps: FakeEntryPoint, broken: bool = False) -> None:
        self.metadata = {"Name": name}
        self.version = "1.0"
        self._eps = list(eps)
        self._broken = broken

    @property
    def entry_points(self) -> List[FakeEntryPoint]:
        if self._broken:
            raise ValueError("malformed entry_points.txt")
        return self._eps


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> List[FakeDistribution]:
    """What the registry under test sees as installed distributions."""
    dists: List[FakeDistribution] = []
    monkeypatch.setattr(registry, "_distributions", lambda: list(dists))
    return dists


def test_built_in_names_resolve_without_reading_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden() -> list:
        raise AssertionError("package metadata was read")

    monkeypatch.setattr(registry, "_distributions", forbidden)
    reg = Registry()
    assert reg.entry("torch.func").origin == "built-in"
    assert reg.get("loop").name == "loop"
    assert reg._plugins is None


def test_metadata_that_cannot_be_listed_leaves_the_built_ins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> list:
        raise OSError("unreadable site-packages")

    monkeypatch.setattr(registry, "_distributions", broken)
    reg = Registry()
    assert reg.names()[:3] == list(registry.BUILTINS)
    assert "loop" in reg.available()
    assert any("unreadable site-packages" in p for p in reg.problems())


def test_unreadable_distribution_is_reported_and_the_rest_found(installed: list) -> None:
    installed.append(FakeDistribution("adbackends-broken", broken=True))
    installed.append(FakeDistribution("adbackends-fine", FakeEntryPoint("fine", "m:Good")))
    reg = Registry()
    assert reg.get("fine").distribution == "adbackends-fine"
    (problem,) = reg.problems()
    assert "adbackends-broken" in problem and "malformed entry_points.txt" in problem


def test_first_copy_of_a_distribution_on_the_path_wins(installed: list) -> None:
    installed.append(FakeDistribution("adbackends-twice", FakeEntryPoint("x", "new:Good")))
    installed.append(FakeDistribution("Adbackends_Twice", FakeEntryPoint("x", "old:Good")))
    reg = Registry()
    assert reg.entry("x").value == "new:Good"
    assert not reg.problems()


def test_three_distributions_on_one_name_are_all_named(installed: list) -> None:
    for dist in ("dist-a", "dist-b", "dist-c"):
        installed.append(FakeDistribution(dist, FakeEntryPoint("same", f"{dist}:Good")))
    reg = Registry()
    with pytest.raises(adbackends.PluginError) as info:
        reg.get("same")
    assert "'dist-a', 'dist-b' and 'dist-c'" in str(info.value)
    assert "Uninstall all of them but one" in str(info.value)
    assert reg.names().count("same") == 1


def test_one_distribution_declaring_a_name_twice_is_reported(installed: list) -> None:
    ep1, ep2 = FakeEntryPoint("dup", "a:Good"), FakeEntryPoint("dup", "b:Good")
    installed.append(FakeDistribution("adbackends-dup", ep1, ep2))
    reg = Registry()
    with pytest.raises(adbackends.PluginError, match="declares it more than once"):
        reg.get("dup")


def test_registered_name_shadows_a_plugin_and_says_so(installed: list) -> None:
    installed.append(FakeDistribution("adbackends-shadowed", FakeEntryPoint("mine", "m:Good")))
    reg = Registry()
    reg.register("mine", Good)
    assert reg.get("mine").origin == "registered"
    assert any("shadowed" in p and "adbackends-shadowed" in p for p in reg.problems())


@pytest.mark.parametrize("contract", [True, "1", 0, None])
def test_contract_must_be_exactly_this_one(contract: Any) -> None:
    reg = Registry()
    reg.register("other", type("Other", (Good,), {"contract": contract}))
    with pytest.raises(adbackends.BackendUnavailableError, match="backend contract") as info:
        reg.get("other")
    assert isinstance(info.value.__cause__, TypeError)


def test_objects_are_checked_when_loaded() -> None:
    reg = Registry()
    reg.register("misnamed", type("Misnamed", (Good,), {"name": "other"}))
    reg.register("versionless", type("V", (Good,), {"version": property(lambda self: 3)}))
    reg.register("lazy", type("Lazy", (adbackends.Backend,), {}))
    reg.register("instance", Good())
    with pytest.raises(adbackends.BackendUnavailableError, match="must agree"):
        reg.get("misnamed")
    with pytest.raises(adbackends.BackendUnavailableError, match="version must be a str"):
        reg.get("versionless")
    with pytest.raises(adbackends.BackendUnavailableError, match="does not implement jacrev"):
        reg.get("lazy")
    assert reg.get("instance").name == "instance"


def test_failure_is_cached_with_its_cause_and_a_fresh_traceback() -> None:
    calls = []

    def factory() -> adbackends.Backend:
        calls.append(1)
        raise OSError("disk on fire")

    reg = Registry()
    reg.register("flaky", factory)
    errors = []
    for _ in range(3):
        with pytest.raises(adbackends.BackendUnavailableError) as info:
            reg.get("flaky")
        errors.append(info.value)
    assert len(calls) == 1
    assert all(isinstance(e.__cause__, OSError) for e in errors)
    depth = [len(list(_frames(e.__traceback__))) for e in errors]
    assert depth[1] == depth[2]  # re-raising does not pile up frames


def _frames(tb: Any):  # type: ignore[no-untyped-def]
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_concurrent_first_use_loads_once() -> None:
    made = []

    def slow() -> adbackends.Backend:
        made.append(1)
        time.sleep(0.05)
        return Good()

    reg = Registry()
    reg.register("slow", slow)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(reg.get("slow"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len({id(b) for b in got}) == 1


def test_refresh_keeps_built_ins_and_registrations(installed: list) -> None:
    installed.append(FakeDistribution("adbackends-p", FakeEntryPoint("p", "m:Good")))
    reg = Registry()
    reg.register("r", Good)
    before = reg.get("loop"), reg.get("r"), reg.get("p")
    reg.refresh()
    after = reg.get("loop"), reg.get("r"), reg.get("p")
    assert after[0] is before[0] and after[1] is before[1]
    assert after[2] is not before[2]  # the plugin is loaded again


def test_register_replace_and_unregister() -> None:
    reg = Registry()
    reg.register("r", Good)
    first = reg.get("r")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("r", Good)
    reg.register("r", Good, replace=True)
    assert reg.get("r") is not first
    reg.unregister("r")
    with pytest.raises(adbackends.UnknownBackendError):
        reg.get("r")
    with pytest.raises(ValueError, match="surrounding spaces"):
        reg.register(" r", Good)


def test_sorting_drops_unselectable_names() -> None:
    entries = [
        Entry(name, "plugin", FakeEntryPoint(name, "m:Good"), "adbackends-x", "1")
        for name in ("functorch", "auto", "", "a,b", "fine")
    ]
    plugins, conflicts, problems = _sort_entries(entries)
    assert list(plugins) == ["fine"] and not conflicts
    assert len(problems) == 4 and all("adbackends-x" in p for p in problems)
