"""The transform family (grad, grad_and_value, vjp, jvp, jacfwd, hessian, linearize)
on every built-in backend, against torch.func.

Each case runs on the backend under test and on torch.func and compares
values, shapes, pytree structure, dtype and ``requires_grad``; error cases
compare exception types. Where torch.func does not exist (torch < 2.0) the
differential tests are skipped by the ``reference`` fixture, with its reason.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Callable, Dict

import pytest
import torch

import adbackends
from adbackends.backend import Backend
from adbackends.errors import CapabilityError
from adbackends.registry import REGISTRY

from .conftest import require

F64 = torch.float64
NEW = [
    "grad",
    "grad_and_value",
    "vjp",
    "jvp",
    "jacfwd",
    "hessian",
    "linearize",
]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def same(actual: Any, expected: Any, where: str = "result") -> None:
    """Equal pytree structure, and per tensor: shape, dtype, requires_grad, values."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} vs {expected.shape}"
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} vs {expected.dtype}"
        assert actual.requires_grad == expected.requires_grad, f"{where}: requires_grad"
        torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-9, atol=1e-11)
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} vs {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def _quiet(run: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return run()


# -- signatures ---------------------------------------------------------------------


def _shape_of(fn: Callable[..., Any]) -> Any:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", NEW)
def test_public_signature_is_torch_funcs(name: str) -> None:
    func = pytest.importorskip("torch.func", reason="torch.func arrived in torch 2.0")
    assert _shape_of(getattr(adbackends, name)) == _shape_of(getattr(func, name))
    assert name in adbackends.__all__


@pytest.mark.parametrize("name", NEW)
def test_backend_methods_have_the_signature(name: str) -> None:
    expected = _shape_of(getattr(adbackends, name))
    for cls in (Backend, type(REGISTRY.get("loop"))):
        assert _shape_of(getattr(cls(), name)) == expected


# -- values, structure, dtype, requires_grad -----------------------------------------

W = _randn(3, seed=7).requires_grad_(True)


def _f(a: Any, b: Any) -> Any:
    return (a.sin() * b).sum() + (a**2 * b.cos()).sum()


def _pytree(d: Any) -> Any:
    return (d["x"].exp() * d["y"][0]).sum() + (d["y"][1] ** 3).sum()


def _with_param(a: Any) -> Any:
    return ((W * a).tanh() ** 2).sum()


def _aux(a: Any) -> Any:
    return (a**3).sum(), {"twice": 2 * a, "cos": (a.cos(),)}


def _vec(a: Any, b: Any) -> Any:
    return {"s": a.sin() * b, "p": (a * b.sum(), b.exp())}


CASES: Dict[str, Callable[[Any], Any]] = {
    "grad": lambda b: b.grad(_f)(_randn(3), _randn(3, seed=1)),
    "grad argnums=1": lambda b: b.grad(_f, 1)(_randn(3), _randn(3, seed=1)),
    "grad argnums=-1": lambda b: b.grad(_f, -1)(_randn(3), _randn(3, seed=1)),
    "grad argnums=(0, 1)": lambda b: b.grad(_f, (0, 1))(_randn(3), _randn(3, seed=1)),
    "grad pytree input": lambda b: b.grad(_pytree)(
        {"x": _randn(2), "y": (_randn(2, seed=1), _randn(3, seed=2))}
    ),
    "grad has_aux": lambda b: b.grad(_aux, has_aux=True)(_randn(3)),
    "grad through a parameter": lambda b: b.grad(_with_param)(_randn(3)),
    "grad float32": lambda b: b.grad(lambda t: (t.sin() ** 2).sum())(_randn(4).float()),
    "grad kwargs": lambda b: b.grad(lambda t, scale=1.0: (t * scale).sum())(_randn(3), scale=3.0),
    "grad_and_value": lambda b: b.grad_and_value(_f)(_randn(3), _randn(3, seed=1)),
    "grad_and_value has_aux": lambda b: b.grad_and_value(_aux, has_aux=True)(_randn(3)),
    "grad_and_value through a parameter": lambda b: b.grad_and_value(_with_param)(_randn(3)),
    "vjp": lambda b: (lambda o, fn: (o, fn({"s": _randn(3), "p": (_randn(3), _randn(3))})))(
        *b.vjp(_vec, _randn(3, seed=1), _randn(3, seed=2))
    ),
    "vjp has_aux": lambda b: (lambda o, fn, aux: (o, fn(_randn(3, seed=4)), aux))(
        *b.vjp(lambda t: (t.sin(), t.sum()), _randn(3), has_aux=True)
    ),
    "jvp": lambda b: b.jvp(_vec, (_randn(3), _randn(3, seed=1)), (_randn(3, seed=2), _randn(3))),
    "jvp has_aux": lambda b: b.jvp(
        lambda t: (t.exp(), {"a": t.cos()}), (_randn(3),), (_randn(3, seed=1),), has_aux=True
    ),
    "jvp through a parameter": lambda b: b.jvp(_with_param, (_randn(3),), (_randn(3, seed=1),)),
    "jvp float32": lambda b: b.jvp(torch.sin, (_randn(3).float(),), (_randn(3).float(),)),
    "jacfwd": lambda b: b.jacfwd(_vec)(_randn(3), _randn(3, seed=1)),
    "jacfwd argnums=(0, 1)": lambda b: b.jacfwd(_vec, (0, 1))(_randn(3), _randn(3, seed=1)),
    "jacfwd has_aux": lambda b: b.jacfwd(_aux, has_aux=True)(_randn(3)),
    "jacfwd through a parameter": lambda b: b.jacfwd(lambda t: (W * t).sin())(_randn(3)),
    "hessian": lambda b: b.hessian(lambda t: (t.tanh() ** 2).sum())(_randn(4)),
    "hessian argnums=(0, 1)": lambda b: b.hessian(_f, (0, 1))(_randn(3), _randn(2, seed=1)[:1]),
    "hessian of a vector output": lambda b: b.hessian(lambda t: t.sin() * t.sum())(_randn(3)),
    "hessian through a parameter": lambda b: b.hessian(_with_param)(_randn(3)),
    "hessian float32": lambda b: b.hessian(lambda t: (t**3).sum())(_randn(3).float()),
    "jvp strict=True": lambda b: b.jvp(torch.sin, (X,), (Y,), strict=True),
    "linearize": lambda b: (lambda o, fn: (o, fn(_randn(3, seed=1), _randn(3, seed=2))))(
        *b.linearize(_vec, _randn(3), _randn(3, seed=3))
    ),
    "linearize through a parameter": lambda b: (lambda o, fn: (o, fn(_randn(3, seed=1))))(
        *b.linearize(_with_param, _randn(3))
    ),
    "vmap(grad)": lambda b: b.vmap(b.grad(lambda t: (t.sin() ** 2).sum()))(_randn(4, 3)),
    "grad(grad)": lambda b: b.grad(b.grad(lambda t: t.sin() * t.exp()))(_randn(1)[0]),
    "jacrev(jvp)": lambda b: b.jacrev(lambda t: b.jvp(torch.sin, (t,), (t.cos(),))[1])(_randn(3)),
    "vmap(hessian)": lambda b: b.vmap(b.hessian(lambda t: (t.tanh() ** 2).sum()))(_randn(4, 3)),
    "jacfwd(jacrev)": lambda b: b.jacfwd(b.jacrev(lambda t: (t**3).prod()))(_randn(3)),
    "grad under no_grad": lambda b: _no_grad(lambda: b.grad(_with_param)(_randn(3))),
    "hessian under no_grad": lambda b: _no_grad(lambda: b.hessian(_with_param)(_randn(3))),
}


def _no_grad(run: Callable[[], Any]) -> Any:
    with torch.no_grad():
        return run()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_func(backend: Backend, reference: Backend, case: str) -> None:
    require(backend, "forward_mode", "hessian", "higher_order")
    expected = CASES[case](reference)
    same(_quiet(lambda: CASES[case](backend)), expected, case)


@pytest.mark.parametrize("case", sorted(CASES))
def test_public_transforms_match_torch_func(reference: Backend, case: str) -> None:
    """adbackends.X under auto is the active backend's X; run through the namespace."""
    expected = CASES[case](reference)
    same(CASES[case](adbackends), expected, case)


# -- exception types ---------------------------------------------------------------------

X, Y = _randn(3), _randn(3, seed=1)
ERRORS: Dict[str, Callable[[Any], Any]] = {
    "grad of a vector": lambda b: b.grad(torch.sin)(X),
    "grad of a non-tensor": lambda b: b.grad(lambda t: 2.0)(X),
    "grad has_aux misuse": lambda b: b.grad(lambda t: t.sum(), has_aux=True)(X),
    "grad has_aux with a triple": lambda b: b.grad(lambda t: (t.sum(), t, t), has_aux=True)(X),
    "grad argnums out of range": lambda b: b.grad(lambda t: t.sum(), 1)(X),
    "grad argnums a float": lambda b: b.grad(lambda t: t.sum(), 0.0)(X),
    "grad argnums repeated": lambda b: b.grad(torch.dot, (0, 0))(X, Y),
    "grad argnums empty": lambda b: b.grad(torch.dot, ())(X, Y),
    "grad_and_value of a vector": lambda b: b.grad_and_value(torch.sin)(X),
    "grad of an integer tensor": lambda b: b.grad(lambda t: t.sum())(torch.arange(3)),
    "vjp has_aux misuse": lambda b: b.vjp(torch.sin, X, has_aux=True),
    "vjp non-tensor output": lambda b: b.vjp(lambda t: 2.0, X),
    "vjp_fn wrong shape": lambda b: b.vjp(torch.sin, X)[1](_randn(4)),
    "vjp_fn wrong structure": lambda b: b.vjp(torch.sin, X)[1]((X, X)),
    "jvp strict=True, output independent": lambda b: b.jvp(
        lambda t: torch.ones(3, dtype=F64), (X,), (Y,), strict=True
    ),
    "jvp strict=True, output detached": lambda b: b.jvp(
        lambda t: t.detach() * 2, (X,), (Y,), strict=True
    ),
    "jvp primals not a tuple": lambda b: b.jvp(torch.sin, X, (Y,)),
    "jvp tangents not a tuple": lambda b: b.jvp(torch.sin, (X,), Y),
    "jvp tangent of another shape": lambda b: b.jvp(torch.sin, (X,), (_randn(4),)),
    "jvp tangents of another structure": lambda b: b.jvp(torch.add, (X, Y), (Y,)),
    "jvp integer tangent": lambda b: b.jvp(torch.sin, (X,), (torch.arange(3),)),
    "jvp non-tensor output": lambda b: b.jvp(lambda t: 2.0, (X,), (Y,)),
    "jvp has_aux misuse": lambda b: b.jvp(torch.sin, (X,), (Y,), has_aux=True),
    "jacfwd argnums out of range": lambda b: b.jacfwd(torch.sin, 1)(X),
    "jacfwd has_aux misuse": lambda b: b.jacfwd(torch.sin, has_aux=True)(X),
    "jacfwd non-tensor output": lambda b: b.jacfwd(lambda t: 2.0)(X),
    "jacfwd bad randomness": lambda b: b.jacfwd(torch.sin, randomness="sometimes")(X),
    "hessian argnums out of range": lambda b: b.hessian(lambda t: t.sum(), 2)(X),
    "hessian argnums repeated": lambda b: b.hessian(torch.dot, (1, 1))(X, Y),
    "linearize tangent of another shape": lambda b: b.linearize(torch.sin, X)[1](_randn(4)),
    "linearize tangents of another structure": lambda b: b.linearize(torch.sin, X)[1](X, X),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_raises_torch_funcs_exception_type(backend: Backend, reference: Backend, case: str) -> None:
    require(backend, "forward_mode")
    with pytest.raises(Exception) as expected:
        ERRORS[case](reference)
    with pytest.raises(expected.type):
        _quiet(lambda: ERRORS[case](backend))


# -- custom Functions with backward only ------------------------------------------------


def _backward_only() -> Callable[[Any], Any]:
    """x**3 as a setup_context Function with backward and a vmap rule, but no jvp."""
    if not hasattr(torch.autograd.Function, "setup_context"):
        pytest.skip(f"torch {torch.__version__} has no setup_context-style Functions")

    class Cube(torch.autograd.Function):
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

        @staticmethod
        def vmap(info: Any, in_dims: Any, x: Any) -> Any:
            return Cube.apply(x), in_dims[0]

    return Cube.apply  # type: ignore[no-any-return]


def test_hessian_of_a_backward_only_function_on_every_backend(backend: Backend) -> None:
    cube = _backward_only()
    require(backend, "custom_function")
    x = _randn(4)
    got = _quiet(lambda: backend.hessian(lambda t: cube(t).sum())(x))
    same(got, torch.diag(6 * x))


def test_hessian_of_a_backward_only_function_under_auto() -> None:
    cube = _backward_only()
    adbackends.forget_fallbacks()
    x = _randn(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", adbackends.FallbackWarning)
        got = adbackends.hessian(lambda t: cube(t).sum())(x)  # reverse over reverse: no fallback
    same(got, torch.diag(6 * x))


def test_hessian_forward_strategy_still_handles_a_backward_only_function(
    reference: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    cube = _backward_only()
    monkeypatch.setattr(adbackends.transforms, "hessian_strategy", "forward")
    x = _randn(4)
    with adbackends.using(reference.name):  # the setting is handed down by adbackends.hessian
        got = adbackends.hessian(lambda t: cube(t).sum())(x)
    same(got, torch.diag(6 * x))
    monkeypatch.setattr(adbackends.transforms, "hessian_strategy", None)
    monkeypatch.setenv("TAD_AD_HESSIAN", "forward")  # what the backend's own method follows
    same(reference.hessian(lambda t: cube(t).sum())(x), torch.diag(6 * x))


@pytest.mark.parametrize("transform", ["jacfwd", "jvp"])
def test_forward_mode_of_a_backward_only_function_falls_back_under_auto(transform: str) -> None:
    cube = _backward_only()
    if adbackends.current().name != "torch.func>loop":
        pytest.skip("auto has no fallback chain here")
    adbackends.forget_fallbacks()
    x, v = _randn(4), _randn(4, seed=1)

    def energy(t: Any) -> Any:
        return cube(t) * 2

    with pytest.warns(adbackends.FallbackWarning, match="function_without_jvp|jvp"):
        if transform == "jacfwd":
            got = adbackends.jacfwd(energy)(x)
            same(got, torch.diag(6 * x**2))
        else:
            _, tangent = adbackends.jvp(energy, (x,), (v,))
            same(tangent, 6 * x**2 * v)
    (record,) = [r for r in adbackends.fallbacks() if r.transform == transform]
    assert record.fallback == "loop"
    assert record.kind == "function_without_jvp"
    # Remembered: the next call goes straight to the loop backend, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error", adbackends.FallbackWarning)
        if transform == "jacfwd":
            adbackends.jacfwd(energy)(x)
        else:
            adbackends.jvp(energy, (x,), (v,))


# -- the hessian strategy ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["reverse", "forward"])
def test_hessian_strategies_agree_with_torch_func(
    reference: Backend,
    strategy: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch.func as tf

    monkeypatch.setenv("TAD_AD_HESSIAN", strategy)
    x, y = _randn(3), _randn(2, seed=1)
    with caplog.at_level(logging.DEBUG, logger="adbackends"):
        got = reference.hessian(_f, (0, 1))(x, y[:1].expand(3).contiguous())
    expected = tf.hessian(_f, (0, 1))(x, y[:1].expand(3).contiguous())
    same(got, expected)
    words = "reverse over reverse" if strategy == "reverse" else "forward over reverse"
    assert any(words in r.getMessage() for r in caplog.records)


def test_hessian_strategy_setting_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    native = [n for n in ("torch.func", "functorch") if REGISTRY.failure(n) is None]
    if not native:
        pytest.skip("no native backend here: the loop backend has one strategy")
    monkeypatch.setenv("TAD_AD_HESSIAN", "reverse")
    monkeypatch.setattr(adbackends.transforms, "hessian_strategy", "forward")
    with caplog.at_level(logging.DEBUG, logger="adbackends"), adbackends.using(native[0]):
        _quiet(lambda: adbackends.hessian(lambda t: (t**3).sum())(_randn(3)))
    assert any("forward over reverse" in r.getMessage() for r in caplog.records)
    assert not any("reverse over reverse" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(adbackends.transforms, "hessian_strategy", "sideways")
    with pytest.raises(ValueError, match="hessian_strategy='sideways'"):
        with adbackends.using(native[0]):
            _quiet(lambda: adbackends.hessian(lambda t: (t**3).sum()))


def test_bad_hessian_strategy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAD_AD_HESSIAN", "sideways")
    require_native = REGISTRY.failure("torch.func") or REGISTRY.failure("functorch")
    name = "functorch" if REGISTRY.failure("torch.func") else "torch.func"
    if require_native and REGISTRY.failure(name):
        pytest.skip("no native backend here")
    with pytest.raises(ValueError, match="TAD_AD_HESSIAN='sideways'"):
        _quiet(lambda: adbackends.get(name).hessian(torch.sin))


# -- contract 1 plugins: what is derived, what is missing --------------------------------


class _Contract1(Backend):
    """A plugin written for contract 1: jacrev and vmap only, both the loop backend's."""

    contract = 1

    def jacrev(self, func: Any, argnums: Any = 0, **kwargs: Any) -> Any:
        return REGISTRY.get("loop").jacrev(func, argnums, **kwargs)

    def vmap(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        return REGISTRY.get("loop").vmap(func, *args, **kwargs)


@pytest.fixture
def contract1(caplog: pytest.LogCaptureFixture) -> Any:
    with caplog.at_level(logging.INFO, logger="adbackends"):
        adbackends.register("contract-one", _Contract1)
        backend = adbackends.get("contract-one")
    yield backend
    adbackends.unregister("contract-one")


def test_contract_1_plugin_loads_with_a_note(contract1: Backend, caplog: Any) -> None:
    records = caplog.get_records("setup")
    notes = [r.getMessage() for r in records if "'contract-one'" in r.getMessage()]
    assert len(notes) == 1
    assert "contract 1" in notes[0] and "hessian (from jacrev (jacrev(jacrev)))" in notes[0]
    assert "missing (raise CapabilityError): vjp, jvp, linearize" in notes[0]
    assert contract1.transforms() == {
        "jacrev": "own",
        "vmap": "own",
        "grad": "derived from jacrev",
        "grad_and_value": "derived from jacrev",
        "vjp": "missing",
        "jvp": "missing",
        "jacfwd": "derived from jacrev",
        "hessian": "derived from jacrev (jacrev(jacrev))",
        "linearize": "missing",
    }


def test_contract_1_plugin_derives_exactly(contract1: Backend) -> None:
    loop = REGISTRY.get("loop")
    x, y = _randn(3), _randn(3, seed=1)
    same(contract1.grad(_f, (0, 1))(x, y), loop.grad(_f, (0, 1))(x, y))
    same(contract1.grad(_aux, has_aux=True)(x), loop.grad(_aux, has_aux=True)(x))
    same(contract1.grad_and_value(_f)(x, y), loop.grad_and_value(_f)(x, y))
    same(contract1.hessian(_f, (0, 1))(x, y), loop.hessian(_f, (0, 1))(x, y))
    same(contract1.jacfwd(_vec, (0, 1))(x, y), loop.jacfwd(_vec, (0, 1))(x, y))
    with adbackends.using("contract-one"):
        same(adbackends.hessian(_with_param)(x), loop.hessian(_with_param)(x))


def test_contract_1_plugin_keeps_torch_funcs_errors(contract1: Backend) -> None:
    for case in ("grad of a vector", "grad has_aux misuse", "grad of a non-tensor"):
        with pytest.raises(RuntimeError):
            ERRORS[case](contract1)
    with pytest.raises(RuntimeError, match="Only allowed values for randomness"):
        contract1.jacfwd(torch.sin, randomness="sometimes")


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.vjp(torch.sin, X),
        lambda b: b.jvp(torch.sin, (X,), (Y,)),
        lambda b: b.linearize(torch.sin, X),
        lambda b: b.jacfwd(torch.sin, randomness="different"),
    ],
    ids=["vjp", "jvp", "linearize", "jacfwd-randomness"],
)
def test_contract_1_plugin_reports_what_is_missing(contract1: Backend, call: Any) -> None:
    with pytest.raises(CapabilityError) as info:
        call(contract1)
    assert info.value.backend == "contract-one"
    assert "contract-one" in str(info.value)
    assert "jacrev" in str(info.value)


def test_linearize_is_derived_from_a_plugins_jvp() -> None:
    class WithJvp(_Contract1):
        contract = 2

        def jvp(self, func: Any, primals: Any, tangents: Any, **kwargs: Any) -> Any:
            return REGISTRY.get("loop").jvp(func, primals, tangents, **kwargs)

    adbackends.register("with-jvp", WithJvp)
    try:
        backend = adbackends.get("with-jvp")
        assert backend.transforms()["linearize"] == "derived from jvp"
        out, jvp_fn = backend.linearize(_with_param, X)
        loop_out, loop_fn = REGISTRY.get("loop").linearize(_with_param, X)
        same((out, jvp_fn(Y)), (loop_out, loop_fn(Y)))
    finally:
        adbackends.unregister("with-jvp")


@pytest.mark.parametrize("contract", [0, 3, "2", True])
def test_other_contracts_are_refused_naming_the_ones_implemented(contract: Any) -> None:
    class Other(_Contract1):
        pass

    Other.contract = contract  # type: ignore[assignment]
    adbackends.register("other-contract", Other)
    try:
        with pytest.raises(adbackends.BackendUnavailableError, match="contracts 1 and 2"):
            adbackends.get("other-contract")
    finally:
        adbackends.unregister("other-contract")
