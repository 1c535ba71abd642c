"""``functorch>loop``: what auto is on torch 1.12 and 1.13, chosen here by name.

These run wherever functorch loads, so on torch 1.12 and 1.13 too, where
functorch refuses every autograd.Function and the same vmap limits as
torch.func apply.
"""

from __future__ import annotations

import warnings
from typing import Any, List

import pytest
import torch

import adbackends
from adbackends.registry import REGISTRY

pytestmark = [
    pytest.mark.skipif(
        REGISTRY.failure("functorch") is not None, reason="functorch does not load here"
    ),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # functorch's own deprecation
]


@pytest.fixture(autouse=True)
def _forget() -> Any:
    adbackends.forget_fallbacks()
    yield
    adbackends.forget_fallbacks()


def dispersion_energy(positions: Any) -> Any:
    """A pairwise C6/r^6 energy with the input check real dispersion code has."""
    n = positions.shape[0]
    distances2 = (positions[:, None, :] - positions[None, :, :]).pow(2).sum(-1)
    distances2 = distances2 + torch.eye(n, dtype=positions.dtype)
    if float(distances2.max().item()) > 1e6:  # .item() and a branch on its value
        raise ValueError("geometry too large")
    return -(1.0 / (distances2.pow(3) + 1.0)).triu(1).sum()


def test_batched_forces_equal_the_loop_backend() -> None:
    positions = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(3)).double()
    loop = adbackends.get("loop")
    expected = loop.vmap(loop.jacrev(dispersion_energy))(positions)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with adbackends.using("functorch", fallback="loop"):
            forces = adbackends.vmap(adbackends.jacrev(dispersion_energy))(positions)
            again = adbackends.vmap(adbackends.jacrev(dispersion_energy))(positions)
    assert torch.equal(forces, expected) and torch.equal(again, expected)
    fell = [w for w in record if issubclass(w.category, adbackends.FallbackWarning)]
    assert len(fell) == 1
    (listed,) = adbackends.fallbacks()
    assert listed.native == "functorch" and listed.calls == 2


def test_a_plain_function_is_vectorised_natively() -> None:
    weights = torch.randn(16, 16, dtype=torch.float64)
    calls: List[int] = []

    def g(v: Any) -> Any:
        calls.append(1)
        return torch.tanh(weights @ v).sum()

    batch = torch.randn(64, 16, dtype=torch.float64)
    with adbackends.using("functorch>loop"):
        got = adbackends.vmap(g)(batch)
    assert len(calls) == 1  # one batched call: no loop
    assert torch.allclose(got, torch.tanh(batch @ weights.T).sum(-1))
    assert adbackends.fallbacks() == []


def test_a_ctx_style_function_falls_back() -> None:
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:  # type: ignore[override]
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    xs = torch.tensor([[0.5, -1.0], [2.0, 1.5]], dtype=torch.float64)
    with pytest.warns(adbackends.FallbackWarning, match="functorch cannot"):
        with adbackends.using("functorch>loop"):
            jac = adbackends.vmap(adbackends.jacrev(Cube.apply))(xs)
    assert torch.allclose(jac, torch.diag_embed(3 * xs**2))
