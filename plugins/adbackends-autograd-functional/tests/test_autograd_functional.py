"""The autograd.functional backend, installed as a distribution, against torch.func."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

import adbackends
from adbackends.plugin import ENTRY_POINT_GROUP, REGISTRY
from adbackends.testing import check_backend

plugin = pytest.importorskip("adbackends_autograd_functional")
torch = pytest.importorskip("torch")

NAME = "autograd.functional"


@pytest.fixture
def backend() -> adbackends.Backend:
    return adbackends.get(NAME)


@pytest.fixture
def reference() -> adbackends.Backend:
    failure = REGISTRY.failure("torch.func")
    return adbackends.get("loop" if failure is not None else "torch.func")


def test_found_through_its_entry_point(backend: adbackends.Backend) -> None:
    eps = importlib.metadata.entry_points()
    group = (
        eps.select(group=ENTRY_POINT_GROUP)
        if hasattr(eps, "select")
        else eps.get(ENTRY_POINT_GROUP, [])  # Python < 3.10
    )
    # Old importlib.metadata lists an editable install twice (dist-info and egg-info).
    (ep,) = {(ep.name, ep.value): ep for ep in group if ep.name == NAME}.values()
    assert ep.value == "adbackends_autograd_functional:AutogradFunctionalBackend"
    assert backend.origin == "plugin"
    assert backend.distribution == "adbackends-autograd-functional"
    assert isinstance(backend, plugin.AutogradFunctionalBackend)


def test_passes_the_conformance_kit(backend: adbackends.Backend) -> None:
    report = check_backend(backend)
    assert report.ok
    assert all(r.status == "pass" for r in report.results), report.summary()


def test_never_chosen_automatically() -> None:
    adbackends.use(None)
    assert adbackends.current().name != NAME


CASES = {
    "matrix in, vector out": (lambda x: (x @ x.T).sin().sum(0), (0,), lambda g: (g(3, 2),)),
    "two args, tuple argnums": (
        lambda x, y: (x * y.sum()).exp(),
        ((0, 1),),
        lambda g: (g(4), g(2, 2)),
    ),
    "dict input, list output": (
        lambda d: [d["a"].cos() * d["b"].sum(), d["b"] ** 3],
        (0,),
        lambda g: ({"a": g(3), "b": g(2)},),
    ),
    "scalar output, second arg": (
        lambda x, y: (x * y).sum().tanh(),
        (1,),
        lambda g: (g(5), g(5)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_matches_the_reference(
    backend: adbackends.Backend, reference: adbackends.Backend, case: str, chunk_size: Any
) -> None:
    func, (argnums,), make = CASES[case]
    gen = torch.Generator().manual_seed(7)

    def g(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    args = make(g)
    got = backend.jacrev(func, argnums, chunk_size=chunk_size)(*args)
    want = reference.jacrev(func, argnums, chunk_size=chunk_size)(*args)
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
    assert got_spec == want_spec
    for a, b in zip(got_leaves, want_leaves):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_backward_that_cannot_be_batched_falls_back_to_rows(backend: adbackends.Backend) -> None:
    class ScalarBackward(torch.autograd.Function):
        """A legacy Function whose backward reads a Python number (not batchable)."""

        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:  # type: ignore[override]
            return x * 2.0

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            return grad * (float(grad.sum().item()) * 0 + 2.0)

    calls = []

    def f(x: Any) -> Any:
        calls.append(1)
        return ScalarBackward.apply(x)

    jac = backend.jacrev(f)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(jac(x), 2.0 * torch.eye(3, dtype=torch.float64))
    first = len(calls)
    assert first == 2  # the vectorised attempt failed (.item() on a batched grad), rows ran
    assert torch.equal(jac(x), 2.0 * torch.eye(3, dtype=torch.float64))
    assert len(calls) == first + 1  # the decision is remembered


def test_error_raised_by_the_function_is_not_retried(backend: adbackends.Backend) -> None:
    calls = []

    def f(x: Any) -> Any:
        calls.append(1)
        raise RuntimeError("user error")

    with pytest.raises(RuntimeError, match="user error"):
        backend.jacrev(f)(torch.ones(2))
    assert len(calls) == 1


def test_differentiable_through_closed_over_parameters(backend: adbackends.Backend) -> None:
    w = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    jac = backend.jacrev(lambda t: (w * t) ** 2)(x)  # diag(2 w^2 x)
    assert jac.requires_grad
    (grad,) = torch.autograd.grad(jac.sum(), w)
    assert torch.allclose(grad, 4 * w.detach() * x)
    assert not backend.jacrev(torch.sin)(x).requires_grad


def test_implements_contract_2(backend: adbackends.Backend) -> None:
    assert backend.contract == 2
    ways = backend.transforms()
    assert {t: ways[t] for t in ("vjp", "jvp", "linearize")} == dict.fromkeys(
        ("vjp", "jvp", "linearize"), "own"
    )
    assert ways["hessian"].startswith("derived from jacrev")
    assert ways["grad"] == ways["grad_and_value"] == ways["jacfwd"] == "derived from jacrev"


@pytest.mark.parametrize("transform", ["grad", "jacfwd", "hessian", "vjp", "jvp", "linearize"])
def test_family_matches_the_reference(
    backend: adbackends.Backend, reference: adbackends.Backend, transform: str
) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, generator=gen, dtype=torch.float64)
    v = torch.randn(3, generator=gen, dtype=torch.float64)

    def f(a: Any) -> Any:
        return (a.sin() ** 2).sum() * a.exp()

    def scalar(a: Any) -> Any:
        return f(a).sum()

    runs = {
        "grad": lambda b: b.grad(scalar)(x),
        "jacfwd": lambda b: b.jacfwd(f)(x),
        "hessian": lambda b: b.hessian(scalar)(x),
        "vjp": lambda b: (lambda out, fn: (out, fn(v)))(*b.vjp(f, x)),
        "jvp": lambda b: b.jvp(f, (x,), (v,)),
        "linearize": lambda b: (lambda out, fn: (out, fn(v)))(*b.linearize(f, x)),
    }
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(runs[transform](backend))
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(runs[transform](reference))
    assert got_spec == want_spec
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert g.requires_grad == w.requires_grad
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)
