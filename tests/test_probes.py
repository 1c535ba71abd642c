"""Capability probes: real checks, run once, thread-safe, leaving no trace."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import adbackends
from adbackends import probes, selection
from adbackends.backends.loop import LoopBackend
from adbackends.plugin import PROBES


class CountingLoop(LoopBackend):
    """The loop backend, counting how often its transforms are built."""

    name = "loop"

    def __init__(self) -> None:
        self.builds = 0

    def jacrev(self, *args, **kwargs):
        self.builds += 1
        return super().jacrev(*args, **kwargs)


class WrongLoop(LoopBackend):
    """A backend that claims everything but returns wrong Jacobians."""

    name = "wrong"

    def jacrev(self, func, *args, **kwargs):
        inner = super().jacrev(func, *args, **kwargs)
        return lambda *a, **k: inner(*a, **k) * 2


class RaisingBackend(adbackends.Backend):
    name = "raising"

    def jacrev(self, *args, **kwargs):
        raise KeyError("boom")

    def vmap(self, *args, **kwargs):
        raise KeyError("boom")


def test_probe_runs_once_and_is_cached():
    backend = CountingLoop()
    first = backend.supports("higher_order")
    builds = backend.builds
    assert first and builds > 0
    for _ in range(3):
        assert backend.supports("higher_order") is first
    assert backend.builds == builds


def test_probe_is_thread_safe_and_runs_once():
    backend = CountingLoop()
    results = []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        results.append(backend.supports("custom_function"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    single = CountingLoop()
    single.supports("custom_function")
    assert backend.builds == single.builds


def test_probe_checks_values_not_just_that_it_runs():
    support = WrongLoop().supports("custom_function")
    assert not support
    assert support.reason == "AssertionError: jacrev: wrong values"


def test_failure_keeps_its_reason():
    support = RaisingBackend().supports("higher_order")
    assert not support and not support.ok
    assert support.reason == "KeyError: 'boom'"
    assert support.capability == "higher_order"
    assert "no" in repr(support)


def test_support_is_truthy_only_on_success():
    assert adbackends.get("loop").supports("legacy_function")
    assert bool(adbackends.get("loop").supports("transforms")) is False


def test_loop_probe_results():
    caps = adbackends.get("loop").capabilities()
    assert list(caps) == list(PROBES)
    passed = {name for name, s in caps.items() if s}
    assert passed == set(PROBES) - {"transforms"}
    assert "loops instead of vectorising" in caps["transforms"].reason


def _state():
    return {
        "rng": torch.random.get_rng_state().clone(),
        "grad": torch.is_grad_enabled(),
        "dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled()
        if hasattr(torch, "is_deterministic_algorithms_warn_only_enabled")
        else None,
        "filters": list(warnings.filters),
    }


@pytest.mark.parametrize("name", list(selection.AUTO_ORDER))
def test_probes_leave_global_state_as_they_found_it(name):
    failure = adbackends.registry.REGISTRY.failure(name)
    if failure is not None:
        pytest.skip(f"{name} does not load here")
    fresh = type(adbackends.get(name))()
    fresh.load()
    torch.manual_seed(1234)
    previous_dtype = torch.get_default_dtype()
    previous_det = torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="a filter of the caller's")
            with torch.no_grad():
                before = _state()
                with warnings.catch_warnings(record=True) as shown:
                    warnings.simplefilter("always")
                    caps = fresh.capabilities()
                after = _state()
    finally:
        torch.set_default_dtype(previous_dtype)
        torch.use_deterministic_algorithms(previous_det)
    assert len(caps) == len(PROBES)
    assert torch.equal(before.pop("rng"), after.pop("rng"))
    assert before == after
    # Warnings raised inside probes (functorch's deprecation notice, the
    # randomness probe's checks) are not shown to the user.
    assert [str(w.message) for w in shown] == []


def test_probe_result_does_not_depend_on_callers_grad_mode():
    with torch.no_grad():
        under_no_grad = LoopBackend().supports("higher_order")
    with torch.inference_mode():
        under_inference = LoopBackend().supports("custom_function")
    assert under_no_grad and under_inference


def test_every_probe_has_a_description():
    for name in PROBES:
        assert len(probes.describe(name)) > 20
