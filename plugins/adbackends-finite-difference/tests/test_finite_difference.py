"""The finite-difference backend, installed as a distribution, against torch.func."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

import adbackends
from adbackends.plugin import ENTRY_POINT_GROUP, REGISTRY
from adbackends.testing import check_backend

plugin = pytest.importorskip("adbackends_finite_difference")
torch = pytest.importorskip("torch")

NAME = "finite-difference"


@pytest.fixture
def backend() -> adbackends.Backend:
    return adbackends.get(NAME)


@pytest.fixture
def exact() -> adbackends.Backend:
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
    assert ep.value == "adbackends_finite_difference:FiniteDifferenceBackend"
    assert (backend.origin, backend.distribution) == ("plugin", "adbackends-finite-difference")
    assert backend.version == plugin.__version__


def test_passes_the_kit_within_its_stated_tolerance(backend: adbackends.Backend) -> None:
    report = check_backend(backend)
    assert (report.rtol, report.atol) == plugin.FiniteDifferenceBackend.tolerance
    waived = {r.name: r.detail for r in report.results if r.status == "waived"}
    assert list(waived) == ["jacrev_inner_no_grad"]
    assert "no_grad" in waived["jacrev_inner_no_grad"]


def test_probes_use_its_stated_tolerance(backend: adbackends.Backend) -> None:
    # Probes, kit and report compare an approximate backend within its tolerance:
    # what it can do, it does to that precision.
    from adbackends.probes import tolerance_of

    assert tolerance_of(backend) == plugin.FiniteDifferenceBackend.tolerance
    for capability in ("higher_order", "custom_function", "hessian"):
        assert backend.supports(capability), backend.supports(capability).reason
    assert not getattr(backend, "claims", ())
    # It is used only when chosen by name.
    assert adbackends.current().name != NAME


def test_written_for_contract_1(backend: adbackends.Backend) -> None:
    assert backend.contract == 1
    ways = backend.transforms()
    assert ways["grad"] == ways["jacfwd"] == "derived from jacrev"
    assert ways["hessian"].startswith("derived from jacrev")
    assert [t for t, how in ways.items() if how == "missing"] == ["vjp", "jvp", "linearize"]
    # No forward-mode products: the probe says so, with what is missing.
    support = backend.supports("forward_mode")
    assert not support and "jvp" in str(support.reason)
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(adbackends.CapabilityError, match="finite-difference"):
        backend.jvp(torch.sin, (x,), (x,))
    with pytest.raises(adbackends.CapabilityError):
        backend.vjp(torch.sin, x)


def test_derived_transforms_agree_with_autograd(
    backend: adbackends.Backend, exact: adbackends.Backend
) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, generator=gen, dtype=torch.float64)
    y = torch.randn(3, generator=gen, dtype=torch.float64)

    def f(a: Any, b: Any) -> Any:
        return (a.sin() * b.exp()).sum()

    rtol, atol = plugin.FiniteDifferenceBackend.tolerance
    pairs = [
        (backend.grad(f, (0, 1))(x, y), exact.grad(f, (0, 1))(x, y)),
        (backend.grad_and_value(f)(x, y), exact.grad_and_value(f)(x, y)),
        (backend.jacfwd(torch.tanh)(x), exact.jacfwd(torch.tanh)(x)),
        (backend.hessian(f, (0, 1))(x, y), exact.hessian(f, (0, 1))(x, y)),
    ]
    for got, want in pairs:
        got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
        want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
        assert got_spec == want_spec
        for g, w in zip(got_leaves, want_leaves):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_first_derivatives_agree_with_autograd(
    backend: adbackends.Backend, exact: adbackends.Backend, dtype: Any
) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(2, 4, generator=gen, dtype=torch.float64).to(dtype)

    def f(a: Any, b: Any) -> Any:
        return {"p": (b @ a).exp(), "q": (a * b.sum(0)).tanh()}

    got = backend.jacrev(f, argnums=(0, 1))(x, y)
    want = exact.jacrev(f, argnums=(0, 1))(x, y)
    rtol, atol = (1e-8, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
    for key in ("p", "q"):
        for got_block, want_block in zip(got[key], want[key]):
            assert got_block.dtype == want_block.dtype == dtype
            assert got_block.shape == want_block.shape
            assert torch.allclose(got_block, want_block, rtol=rtol, atol=atol)


def test_checks_a_hand_written_backward(backend: adbackends.Backend) -> None:
    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:  # type: ignore[override]
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return grad * x.cos() * 1.01  # a 1% bug

    x = torch.tensor([0.3, 1.2], dtype=torch.float64)
    numeric = backend.jacrev(WrongBackward.apply)(x)
    analytic = adbackends.get("loop").jacrev(WrongBackward.apply)(x)
    assert torch.allclose(numeric, torch.diag(x.cos()), rtol=1e-8)
    assert not torch.allclose(numeric, analytic, rtol=1e-3)


def test_refuses_complex_inputs(backend: adbackends.Backend) -> None:
    with pytest.raises(RuntimeError, match="real"):
        backend.jacrev(torch.sin)(torch.ones(2, dtype=torch.complex128))
