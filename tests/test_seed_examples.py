"""Every example of the seed document, on every backend that loads here.

The seed document is the documentation of the ``if torch < 2`` switch that
adbackends replaces; its examples are the behaviour every backend must
reproduce. Each test takes the ``backend`` fixture, so it runs once per
backend (torch.func, functorch, loop) and is skipped, with the reason, only
where that backend does not load or lacks a capability the example needs.
"""

from __future__ import annotations

import pytest
import torch

from .conftest import require


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


# -- jacrev -------------------------------------------------------------------


def test_jacrev_pointwise_unary_gives_diagonal(backend):
    x = torch.randn(5)
    jacobian = backend.jacrev(torch.sin)(x)
    expected = torch.diag(torch.cos(x))
    assert torch.allclose(jacobian, expected)


def test_jacrev_has_aux_returns_output(backend):
    x = torch.randn(5)

    def f(x):
        return x.sin()

    def g(x):
        result = f(x)
        return result, result

    jacobian_f, f_x = backend.jacrev(g, has_aux=True)(x)
    assert torch.allclose(f_x, f(x))
    assert torch.allclose(jacobian_f, torch.diag(x.cos()))


def test_vmap_of_jacrev_gives_batched_jacobians(backend):
    x = torch.randn(64, 5)
    jacobian = backend.vmap(backend.jacrev(torch.sin))(x)
    assert jacobian.shape == (64, 5, 5)
    assert torch.allclose(jacobian, torch.diag_embed(x.cos()))


def test_jacrev_of_jacrev_gives_hessian(backend):
    require(backend, "higher_order")

    def f(x):
        return x.sin().sum()

    x = torch.randn(5)
    hessian = backend.jacrev(backend.jacrev(f))(x)
    assert torch.allclose(hessian, torch.diag(-x.sin()))


def test_jacrev_argnums_int(backend):
    def f(x, y):
        return x + y**2

    x, y = torch.randn(5), torch.randn(5)
    jacobian = backend.jacrev(f, argnums=1)(x, y)
    expected = torch.diag(2 * y)
    assert torch.allclose(jacobian, expected)


def test_jacrev_argnums_tuple(backend):
    def f(x, y):
        return x + y**2

    x, y = torch.randn(5), torch.randn(5)
    jacobian = backend.jacrev(f, argnums=(0, 1))(x, y)
    assert isinstance(jacobian, tuple) and len(jacobian) == 2
    expected_x = torch.diag(torch.ones_like(x))
    expected_y = torch.diag(2 * y)
    assert torch.allclose(jacobian[0], expected_x)
    assert torch.allclose(jacobian[1], expected_y)


def _f_with_inner_no_grad(x):
    with torch.no_grad():
        c = x**2
    return x - c


def test_jacrev_respects_inner_no_grad(backend):
    x = torch.randn(5)
    jacobian = backend.jacrev(_f_with_inner_no_grad)(x)
    # c is a constant to autodiff, so d(x - c)/dx is the identity.
    assert torch.allclose(jacobian, torch.eye(5))


def test_jacrev_ignores_outer_no_grad(backend):
    x = torch.randn(5)
    with torch.no_grad():
        jacobian = backend.jacrev(_f_with_inner_no_grad)(x)
    assert torch.allclose(jacobian, torch.eye(5))


# -- vmap ---------------------------------------------------------------------


def test_vmap_batched_dot(backend):
    batched_dot = backend.vmap(torch.dot)
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    result = batched_dot(x, y)
    assert result.shape == (2,)
    assert torch.allclose(result, (x * y).sum(-1))


def test_vmap_hides_batch_dimension_of_a_model(backend):
    batch_size, feature_size = 3, 5
    weights = torch.randn(feature_size, requires_grad=True)

    def model(feature_vec):
        return feature_vec.dot(weights).relu()

    examples = torch.randn(batch_size, feature_size)
    result = backend.vmap(model)(examples)
    assert torch.allclose(result, (examples @ weights).relu())
    # The closed-over parameter requires grad, so the result is differentiable.
    assert result.requires_grad
    (grad,) = torch.autograd.grad(result.sum(), weights)
    expected = (examples * ((examples @ weights) > 0).unsqueeze(-1)).sum(0)
    assert torch.allclose(grad, expected)


def test_vmap_vectorises_vjps_into_a_jacobian(backend):
    n = 5
    x = torch.randn(n, requires_grad=True)
    y = x**2
    identity = torch.eye(n)

    rows = [torch.autograd.grad(y, x, v, retain_graph=True)[0] for v in identity.unbind()]
    sequential = torch.stack(rows)

    def get_vjp(v):
        return torch.autograd.grad(y, x, v)

    (vectorised,) = backend.vmap(get_vjp)(identity)
    assert torch.allclose(vectorised, sequential)
    assert torch.allclose(vectorised, torch.diag(2 * x.detach()))


def test_nested_vmap(backend):
    batched_dot = backend.vmap(backend.vmap(torch.dot))
    x, y = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    result = batched_dot(x, y)
    assert result.shape == (2, 3)
    assert torch.allclose(result, (x * y).sum(-1))


def test_vmap_in_dims_int(backend):
    batched_dot = backend.vmap(torch.dot, in_dims=1)
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    result = batched_dot(x, y)
    assert result.shape == (5,)
    assert torch.allclose(result, (x * y).sum(0))


def test_vmap_in_dims_tuple_with_none(backend):
    batched_dot = backend.vmap(torch.dot, in_dims=(0, None))
    x, y = torch.randn(2, 5), torch.randn(5)
    result = batched_dot(x, y)
    assert result.shape == (2,)
    assert torch.allclose(result, x @ y)


def test_vmap_in_dims_dict_struct(backend):
    def f(d):
        return torch.dot(d["x"], d["y"])

    x, y = torch.randn(2, 5), torch.randn(5)
    batched_dot = backend.vmap(f, in_dims=({"x": 0, "y": None},))
    result = batched_dot({"x": x, "y": y})
    assert result.shape == (2,)
    assert torch.allclose(result, x @ y)


def test_vmap_out_dims(backend):
    x = torch.randn(2, 5)
    batched_pow = backend.vmap(lambda x: x**2, out_dims=1)
    result = batched_pow(x)
    assert result.shape == (5, 2)
    assert torch.allclose(result, (x**2).T)


def test_vmap_passes_kwargs_unbatched(backend):
    x = torch.randn([2, 5])

    def fn(x, scale=4.0):
        return x * scale

    batched_pow = backend.vmap(fn)
    assert torch.allclose(batched_pow(x), x * 4)
    result = batched_pow(x, scale=x)
    assert result.shape == (2, 2, 5)
    assert torch.allclose(result, x.unsqueeze(1) * x)
