"""Per-call fallback: native where it can, loop where it must.

Each function below is one class of failure that torch.func refuses and the
loop backend computes. Under ``auto`` (torch.func>loop on torch >= 2) every
case must give exactly the loop backend's result, warn once, and on the
second call go straight to the loop (counted through the calls of ``f``).
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from typing import Any, Callable, Dict, List

import pytest
import torch

import adbackends
from adbackends import selection
from adbackends.backend import Refusal
from adbackends.backends.loop import LoopBackend
from adbackends.registry import REGISTRY

pytestmark = pytest.mark.skipif(
    REGISTRY.failure("torch.func") is not None, reason="torch.func is not part of this torch"
)


@pytest.fixture(autouse=True)
def _forget() -> Any:
    adbackends.forget_fallbacks()
    yield
    adbackends.forget_fallbacks()


class Legacy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


if hasattr(torch.autograd.Function, "setup_context"):

    class NoVmapRule(torch.autograd.Function):
        @staticmethod
        def forward(x: Any) -> Any:  # type: ignore[override]
            return x**3

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2


def _checkpointed(v: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(torch.sin, v, use_reentrant=False) * v


BODIES: Dict[str, Callable[[Any], Any]] = {
    "item": lambda v: v * v.sum().item(),
    "control_flow": lambda v: v * 2 if bool((v > 0).all()) else v * 3,
    "dynamic_shape": lambda v: v[v > 0].sum() + (v**2).sum(),
    "checkpoint": _checkpointed,
    "ctx_function": lambda v: Legacy.apply(v),
    "no_vmap_rule": lambda v: NoVmapRule.apply(v),
}

NESTINGS: Dict[str, Callable[[Any, Any], Any]] = {
    "vmap": lambda ad, f: ad.vmap(f),
    "jacrev": lambda ad, f: ad.jacrev(f),
    "vmap(jacrev)": lambda ad, f: ad.vmap(ad.jacrev(f)),
    "jacrev(jacrev)": lambda ad, f: ad.jacrev(ad.jacrev(f)),
}

#: Where each class fails under torch.func (measured on torch 2.13).
FAILS = {
    "item": ("vmap", "vmap(jacrev)"),
    "control_flow": ("vmap", "vmap(jacrev)"),
    "dynamic_shape": ("vmap", "vmap(jacrev)"),
    "checkpoint": ("jacrev", "vmap(jacrev)", "jacrev(jacrev)"),
    "ctx_function": ("vmap", "jacrev", "vmap(jacrev)", "jacrev(jacrev)"),
    "no_vmap_rule": ("vmap", "vmap(jacrev)"),
}

CASES = [(body, nest) for body, nests in FAILS.items() for nest in nests]


def _input(nest: str) -> Any:
    gen = torch.Generator().manual_seed(7)
    if nest.startswith("vmap"):
        return torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.1
    return torch.rand(3, generator=gen, dtype=torch.float64) + 0.1


class Counted:
    """The body, counting its calls."""

    def __init__(self, body: Callable[[Any], Any]) -> None:
        self.body = body
        self.calls = 0

    def __call__(self, v: Any) -> Any:
        self.calls += 1
        return self.body(v)


def _same(actual: Any, expected: Any) -> None:
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape
        assert actual.dtype == expected.dtype
        assert actual.requires_grad == expected.requires_grad
        assert (actual.grad_fn is None) == (expected.grad_fn is None)
        assert torch.equal(actual.detach(), expected.detach())
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _same(a, e)


def _fallback_warnings(record: List[warnings.WarningMessage]) -> List[str]:
    return [str(w.message) for w in record if issubclass(w.category, adbackends.FallbackWarning)]


@pytest.mark.parametrize("body, nest", CASES)
def test_auto_falls_back_once_and_remembers(body: str, nest: str) -> None:
    x = _input(nest)
    loop_f = Counted(BODIES[body])
    with adbackends.using("loop"):
        expected = NESTINGS[nest](adbackends, loop_f)(x)
    loop_calls = loop_f.calls

    f = Counted(BODIES[body])
    assert adbackends.current().name == "torch.func>loop"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = NESTINGS[nest](adbackends, f)(x)
        first_calls = f.calls
        second = NESTINGS[nest](adbackends, f)(x)  # wrappers built afresh
    _same(first, expected)
    _same(second, expected)
    found = _fallback_warnings(record)
    assert len(found) == 1, found
    assert "torch.func cannot" in found[0] and "loop backend" in found[0]
    assert record[0].filename == __file__
    assert first_calls > loop_calls  # the native attempt ran first
    assert f.calls - first_calls == loop_calls  # the second call: only the loop
    prefix = nest.replace(")", "") + "("  # the outermost record, not inner ones
    (listed,) = [r for r in adbackends.fallbacks() if r.function.startswith(prefix)]
    assert listed.native == "torch.func" and listed.fallback == "loop"
    assert listed.fix and listed.reason and listed.calls == 2


@pytest.mark.parametrize("body, nest", CASES)
def test_an_explicit_single_name_stays_strict(body: str, nest: str) -> None:
    x = _input(nest)
    with pytest.raises(Exception) as direct:
        NESTINGS[nest](torch.func, BODIES[body])(x)
    with adbackends.using("torch.func"):
        with pytest.raises(type(direct.value)) as chosen:
            NESTINGS[nest](adbackends, BODIES[body])(x)
    assert str(chosen.value) == str(direct.value)
    assert adbackends.fallbacks() == []


@pytest.mark.parametrize(
    "error, body",
    [
        (RuntimeError, lambda v: v + torch.ones(5, dtype=v.dtype)),  # shape mismatch
        (NameError, lambda v: v * undefined_name),  # type: ignore[name-defined]  # noqa: F821
        (ValueError, lambda v: (_ for _ in ()).throw(ValueError("bad input"))),
    ],
)
def test_a_genuine_error_is_raised_once_not_retried(error: type, body: Any) -> None:
    f = Counted(body)
    with pytest.raises(error):
        adbackends.vmap(f)(_input("vmap"))
    assert f.calls == 1
    f.calls = 0
    with pytest.raises(error):
        adbackends.jacrev(f)(_input("jacrev"))
    assert f.calls == 1
    assert adbackends.fallbacks() == []


def test_bad_in_dims_is_not_retried() -> None:
    f = Counted(BODIES["item"])
    with pytest.raises(ValueError, match="in_dims"):
        adbackends.vmap(f, in_dims=(0, 0))(_input("vmap"))
    assert f.calls == 0 and adbackends.fallbacks() == []


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_randomness_after_a_fallback_equals_the_loop(randomness: str) -> None:
    def noisy(v: Any) -> Any:
        return v * v.sum().item() + torch.rand(3, dtype=v.dtype)

    x = _input("vmap")
    torch.manual_seed(11)
    with adbackends.using("loop"):
        expected = adbackends.vmap(noisy, randomness=randomness)(x)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adbackends.FallbackWarning)
        got = adbackends.vmap(noisy, randomness=randomness)(x)
    assert torch.equal(got, expected)
    assert adbackends.fallbacks()[0].kind == "item"


def test_jacrev_randomness_after_a_fallback_equals_the_loop() -> None:
    def noisy(v: Any) -> Any:
        return Legacy.apply(v) * torch.rand((), dtype=v.dtype)

    x = _input("jacrev")
    torch.manual_seed(5)
    with adbackends.using("loop"):
        expected = adbackends.jacrev(noisy)(x)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adbackends.FallbackWarning)
        got = adbackends.jacrev(noisy)(x)
    assert torch.equal(got, expected)


def test_inner_transforms_stay_native_inside_a_loop_fallback() -> None:
    inner_backends: List[str] = []
    loop = adbackends.get("loop")

    def f(v: Any) -> Any:
        # Batched tensors exist only inside a native vmap.
        inner_backends.append(type(v).__name__)
        return v * v.sum().item()

    x = _input("vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", adbackends.FallbackWarning)
        got = adbackends.vmap(adbackends.jacrev(f))(x)
    assert torch.equal(got, loop.vmap(loop.jacrev(f))(x))
    (record,) = adbackends.fallbacks()
    assert record.function.startswith("vmap(jacrev(")  # the outer call fell back as a whole


def test_a_failing_fallback_raises_its_own_error_with_the_native_one_attached() -> None:
    def f(v: Any) -> Any:
        if v.sum().item() > 0:
            raise ZeroDivisionError("the function's own failure")
        return v

    with pytest.warns(adbackends.FallbackWarning):
        with pytest.raises(ZeroDivisionError) as info:
            adbackends.vmap(f)(_input("vmap"))
    native = info.value.adbackends_native_error  # type: ignore[attr-defined]
    assert isinstance(native, RuntimeError) and ".item()" in str(native)
    assert info.value.__cause__ is native


def test_threads_are_correct_and_warned_once() -> None:
    f = Counted(BODIES["item"])
    x = _input("vmap")
    with adbackends.using("loop"):
        expected = adbackends.vmap(f)(x)
    results: List[Any] = []
    errors: List[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(adbackends.vmap(adbackends.jacrev(f))(x))
        except BaseException as exc:
            errors.append(exc)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    loop = adbackends.get("loop")
    reference = loop.vmap(loop.jacrev(BODIES["item"]))(x)
    assert len(results) == 20 and all(torch.equal(r, reference) for r in results)
    assert len(_fallback_warnings(record)) == 1
    assert expected.shape == x.shape


def test_asyncio_tasks_are_correct_and_warned_once() -> None:
    x = _input("vmap")
    body = BODIES["control_flow"]

    async def one() -> Any:
        await asyncio.sleep(0)
        return adbackends.vmap(body)(x)

    async def main() -> List[Any]:
        return list(await asyncio.gather(*(one() for _ in range(6))))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = asyncio.run(main())
    expected = adbackends.get("loop").vmap(body)(x)
    assert all(torch.equal(r, expected) for r in results)
    assert len(_fallback_warnings(record)) == 1


def test_forget_fallbacks_tries_native_again() -> None:
    f = Counted(BODIES["item"])
    x = _input("vmap")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        adbackends.vmap(f)(x)
        adbackends.forget_fallbacks()
        assert adbackends.fallbacks() == []
        adbackends.vmap(f)(x)
    assert len(_fallback_warnings(record)) == 2
    assert f.calls == 2 * (1 + x.shape[0])


def test_a_function_that_vectorises_never_falls_back() -> None:
    f = Counted(lambda v: torch.tanh(v).sum())
    x = _input("vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", adbackends.FallbackWarning)
        got = adbackends.vmap(adbackends.jacrev(f))(x)
    assert f.calls == 1  # one batched call: torch.func vectorised it
    assert torch.allclose(got, 1 - torch.tanh(x) ** 2)
    assert adbackends.fallbacks() == []


def test_fjacrev_and_fvmap_stay_native_under_a_chain() -> None:
    x = _input("vmap")
    with pytest.raises(RuntimeError, match=r"\.item\(\)"):
        adbackends.fvmap(BODIES["item"])(x)
    assert adbackends.fallbacks() == []


# -- how a chain is selected -----------------------------------------------------------------


def test_chain_syntax_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    assert adbackends.use("torch.func", fallback="loop").name == "torch.func>loop"
    assert adbackends.explain().source == "use"
    assert adbackends.use("torch.func>loop") is adbackends.current()
    adbackends.use(None)
    with adbackends.using("torch.func", fallback="loop") as chain:
        assert chain.name == "torch.func>loop"
        assert adbackends.explain().backend is chain
    monkeypatch.setenv(selection.ENV_VAR, "torch.func>loop")
    assert adbackends.current().name == "torch.func>loop"
    monkeypatch.setenv(selection.ENV_VAR, " torch.func > loop , loop")
    choice = adbackends.explain()
    assert choice.backend.name == "torch.func>loop" and "first usable" in choice.reason
    assert adbackends.get("torch.func>loop").name == "torch.func>loop"


@pytest.mark.parametrize("bad", ["torch.func>", ">loop", "loop>loop", "auto>loop", "a>b"])
def test_bad_chains_are_clear_errors(bad: str) -> None:
    with pytest.raises((ValueError, adbackends.UnknownBackendError)) as info:
        adbackends.use(bad)
    text = str(info.value)
    assert "chain" in text or "unknown autodiff backend" in text
    assert adbackends.current().name == "torch.func>loop"  # nothing changed


def test_auto_is_torch_func_with_loop_and_explains_it() -> None:
    choice = adbackends.explain()
    assert choice.source == "auto"
    assert choice.backend.name == "torch.func>loop"
    assert "per-call fallback" in choice.reason
    assert adbackends.current().fjacrev(torch.sin)(torch.zeros(2)).shape == (2, 2)


def test_report_shows_the_chain() -> None:
    from adbackends.cli import _format, report

    data = report()
    assert data["active"]["name"] == "torch.func>loop"
    assert "Active backend: torch.func>loop" in _format(data)


# -- plugins take part ----------------------------------------------------------------------


class _Picky(LoopBackend):
    """A backend that refuses functions marked as unsupported, and says so."""

    name = "picky"

    def vmap(self, func: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        def call(*a: Any, **k: Any) -> Any:
            if getattr(func, "unsupported", False):
                raise LookupError("picky cannot map this")
            return LoopBackend.vmap(self, func, *args, **kwargs)(*a, **k)

        return call

    def cannot_transform(self, exc: BaseException) -> Any:
        if isinstance(exc, LookupError):
            return Refusal("picky", str(exc), "mark the function as supported")
        return None


@pytest.fixture
def picky() -> Any:
    adbackends.register("picky", _Picky)
    yield adbackends.get("picky")
    adbackends.unregister("picky")


@pytest.mark.usefixtures("picky")
def test_a_plugin_can_be_the_native_side() -> None:
    def f(v: Any) -> Any:
        return v * 2

    f.unsupported = True  # type: ignore[attr-defined]
    with adbackends.using("picky", fallback="torch.func"):
        with pytest.warns(adbackends.FallbackWarning, match="mark the function as supported"):
            got = adbackends.vmap(f)(_input("vmap"))
    assert torch.equal(got, 2 * _input("vmap"))
    assert adbackends.fallbacks()[0].native == "picky"


@pytest.mark.usefixtures("picky")
def test_a_plugin_can_be_the_fallback() -> None:
    with adbackends.using("torch.func>picky"):
        with pytest.warns(adbackends.FallbackWarning):
            got = adbackends.vmap(BODIES["item"])(_input("vmap"))
    assert torch.equal(got, adbackends.get("loop").vmap(BODIES["item"])(_input("vmap")))


def test_pytest_option_accepts_a_chain(tmp_path: Any) -> None:
    from .test_plugins_pytest import SUITE, run_pytest

    out = run_pytest(
        tmp_path, SUITE.format(name="torch.func>loop"), "--ad-backend", "torch.func>loop"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "adbackends: backend 'torch.func>loop' (chain" in out.stdout
    assert "2 passed" in out.stdout


def test_conformance_kit_accepts_a_chain() -> None:
    from adbackends.testing import check_backend

    report = check_backend("torch.func>loop", raise_on_failure=False)
    assert report.ok, report.summary()
    assert report.backend == "torch.func>loop"


def test_a_transform_built_again_for_the_same_function_is_reused() -> None:
    import gc
    import weakref

    def f(v: Any) -> Any:
        return torch.sin(v)

    first = adbackends.vmap(f)
    assert adbackends.vmap(f) is first  # the loop `adbackends.vmap(f)(x)` builds once
    assert adbackends.vmap(f, in_dims=0, out_dims=0) is first
    assert adbackends.vmap(f, out_dims=1) is not first
    assert adbackends.jacrev(f) is not first
    with adbackends.using("torch.func", fallback="loop"):
        assert adbackends.vmap(f) is first  # the same chain
    assert adbackends.vmap(f, in_dims=[0]) is not adbackends.vmap(f, in_dims=[0])  # unhashable
    x = _input("vmap")
    assert torch.equal(first(x), torch.sin(x))

    ref = weakref.ref(f)
    del f, first
    gc.collect()
    assert ref() is None  # kept on the function: it lives exactly as long


def test_a_reused_transform_still_falls_back_and_remembers() -> None:
    f = Counted(BODIES["item"])

    def body(v: Any) -> Any:
        return f(v)

    x = _input("vmap")
    with pytest.warns(adbackends.FallbackWarning):
        adbackends.vmap(body)(x)
    before = f.calls
    adbackends.vmap(body)(x)
    assert f.calls - before == x.shape[0]  # straight to the loop
    adbackends.forget_fallbacks()
    with pytest.warns(adbackends.FallbackWarning):
        adbackends.vmap(body)(x)
