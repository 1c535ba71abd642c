"""Each piece of process state has one owner, is bounded, and resets in one call.

The build cache finds an equivalent build for every kind of callable users
pass (a builtin, a lambda written in the call, ``functools.partial``, a bound
method, an ``nn.Module``, a ``functional_call`` closure), and never confuses
two callables that behave differently.
"""

from __future__ import annotations

import functools
import gc
import warnings
import weakref
from typing import Any

import pytest
import torch

import adbackends
from adbackends import fallback, probes
from adbackends._shared import NOTICES
from adbackends.registry import REGISTRY
from adbackends.testing import reset_state

pytestmark = pytest.mark.skipif(
    REGISTRY.failure("torch.func") is not None, reason="torch.func is not part of this torch"
)


@pytest.fixture(autouse=True)
def _clean() -> Any:
    fallback.LOG.reset()
    yield
    fallback.LOG.reset()


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, t: Any) -> Any:
        return self.lin(t).tanh()

    def scaled(self, t: Any) -> Any:
        return self.lin(t) * 2


def _x() -> Any:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_every_kind_of_callable_is_built_once_and_gives_torch_funcs_result() -> None:
    import torch.func as tf

    model = _Model()
    params = dict(model.named_parameters())
    kinds = {
        "builtin": lambda: torch.sin,
        "lambda": lambda: lambda v: v.sin() * v.sum(),
        "partial": lambda: functools.partial(torch.mul, 2.0),
        "method": lambda: model.scaled,
        "module": lambda: model,
        "functional_call": lambda: lambda v: tf.functional_call(model, params, (v,)),
    }
    x = _x()
    for kind, make in kinds.items():
        first = adbackends.vmap(make())
        again = adbackends.vmap(make())  # a new object of the same behaviour
        assert again is first, kind
        assert torch.allclose(again(x), tf.vmap(make())(x)), kind
        assert adbackends.vmap(make(), out_dims=1) is not first, kind


def test_callables_that_differ_are_never_confused() -> None:
    x = _x()
    fs = [lambda v, k=k: v * k for k in (torch.tensor(2.0), torch.tensor(3.0))]
    assert adbackends.vmap(fs[0]) is not adbackends.vmap(fs[1])  # other defaults
    assert torch.equal(adbackends.vmap(fs[1])(x), x * 3)

    def scaled_by(w: Any) -> Any:
        return lambda v: v * w

    made = [scaled_by(torch.tensor(w)) for w in (2.0, 5.0)]
    assert torch.equal(adbackends.vmap(made[1])(x), x * 5)  # other closure cells
    assert torch.equal(adbackends.vmap(functools.partial(torch.mul, 5.0))(x), x * 5)
    assert torch.equal(adbackends.vmap(functools.partial(torch.mul, 7.0))(x), x * 7)
    a, b = _Model(), _Model()
    assert adbackends.vmap(a.scaled) is not adbackends.vmap(b.scaled)  # other self
    # Arguments that compare equal but differ in type stay apart (True == 1).
    with pytest.raises(RuntimeError):
        adbackends.jacrev(torch.sin, argnums=True)(x[0])


def test_a_def_is_kept_only_by_itself() -> None:
    def f(v: Any) -> Any:
        return v.sin()

    built = adbackends.vmap(f)
    assert adbackends.vmap(f) is built
    assert len(fallback.LOG.builds) == 0  # nothing global holds f
    ref = weakref.ref(f)
    del f, built
    gc.collect()
    assert ref() is None


def test_the_build_cache_is_bounded() -> None:
    limit = fallback.LOG.builds.limit
    xs = [torch.tensor(float(i)) for i in range(limit + 10)]
    for w in xs:
        adbackends.vmap(functools.partial(torch.mul, w))
    assert len(fallback.LOG.builds) == limit


def test_the_fallback_log_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fallback.LOG, "limit", 3)
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adbackends.FallbackWarning)
        for i in range(5):
            # five functions of their own code, each falling back
            code = compile(f"lambda v: v * v.sum().item() + {i}", f"<f{i}>", "eval")
            adbackends.vmap(eval(code))(x)
    names = [r.function for r in adbackends.fallbacks()]
    assert len(names) == 3  # the oldest two were dropped


def test_reset_state_resets_every_owner() -> None:
    adbackends.use("loop")
    adbackends.require("legacy_function")
    loop = adbackends.get("loop")
    assert loop.supports("legacy_function")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adbackends.FallbackWarning)
        with adbackends.using("torch.func>loop"):
            adbackends.vmap(lambda v: v * v.sum().item())(_x())
    NOTICES.first("a notice")
    assert adbackends.fallbacks() and probes.cached_support(loop, "legacy_function")
    reset_state()
    assert adbackends.explain().source == "auto"
    assert adbackends.require() == ("custom_function",)
    assert adbackends.fallbacks() == []
    assert probes.cached_support(loop, "legacy_function") is None
    assert NOTICES.first("a notice")


def test_builds_from_many_threads_at_once_are_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(fallback.BuildCache, "limit", 4)  # evictions while others look up
    x = _x()
    weights = [torch.tensor(float(i)) for i in range(12)]
    errors: list = []
    start = threading.Barrier(4)

    def work(offset: int) -> None:
        try:
            start.wait()
            for i in range(60):
                w = weights[(i + offset) % len(weights)]
                got = adbackends.vmap(functools.partial(torch.mul, w))(x)
                lam = adbackends.vmap(lambda v: v.sin())(x)
                if not (torch.equal(got, x * w) and torch.equal(lam, x.sin())):
                    errors.append(f"wrong result in thread {offset}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(fallback.LOG.builds) <= 4
