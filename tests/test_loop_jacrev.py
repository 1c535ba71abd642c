"""The loop backend's jacrev: analytic answers, and torch.func's behaviour case by case.

Tests taking ``reference`` compare with torch.func, or functorch before torch
2.0 (values, shapes, pytree structure, dtype and ``requires_grad``; see
tests/reference.py); the analytic tests run on every torch.
"""

from __future__ import annotations

import collections
import gc
import weakref

import pytest
import torch

import adbackends

from . import reference as ref
from .test_loop_support import assert_same

Point = collections.namedtuple("Point", "x y")


@pytest.fixture
def reference():
    """torch.func, or functorch before torch 2.0 (tests/reference.py).

    Overrides the torch.func-only fixture of conftest.py for this module.
    """
    return ref.backend()


@pytest.fixture
def loop():
    return adbackends.get("loop")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _x(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_(requires_grad)


# -- analytic answers (run on every torch) -------------------------------------


def test_diagonal_jacobian(loop):
    x = _x(5)
    assert torch.allclose(loop.jacrev(torch.sin)(x), torch.diag(x.cos()))


def test_shape_is_output_shape_plus_input_shape(loop):
    x = _x(2, 3)
    jac = loop.jacrev(lambda t: t.sum(0) * t[0, 0])(x)
    assert jac.shape == (3, 2, 3)
    expected = torch.zeros(3, 2, 3, dtype=x.dtype)
    for i in range(3):
        expected[i, :, i] = x[0, 0]
        expected[i, 0, 0] += x[:, i].sum()
    assert torch.allclose(jac, expected)


def test_scalar_input_and_output(loop):
    x = torch.tensor(0.5, dtype=torch.float64)
    jac = loop.jacrev(lambda t: t**3)(x)
    assert jac.shape == () and torch.allclose(jac, 3 * x**2)


@pytest.mark.parametrize("argnums, index", [(1, 1), (-1, 1), (-2, 0), (0, 0)])
def test_int_argnums(loop, argnums, index):
    x, y = _x(3), _x(3)
    jac = loop.jacrev(lambda a, b: a * b**2, argnums=argnums)(x, y)
    expected = torch.diag(y**2) if index == 0 else torch.diag(2 * x * y)
    assert torch.allclose(jac, expected)


def test_tuple_argnums_give_tuple(loop):
    x, y = _x(3), _x(3)
    jac = loop.jacrev(lambda a, b: a + b**2, argnums=(0, 1))(x, y)
    assert isinstance(jac, tuple) and len(jac) == 2
    assert torch.allclose(jac[0], torch.eye(3, dtype=x.dtype))
    assert torch.allclose(jac[1], torch.diag(2 * y))
    single = loop.jacrev(lambda a, b: a + b**2, argnums=(1,))(x, y)
    assert isinstance(single, tuple) and len(single) == 1


def test_independent_output_gives_zeros(loop):
    x, y = _x(3), _x(2)
    jac = loop.jacrev(lambda a, b: (a * 2, b.sum(), torch.ones(4)), argnums=0)(x, y)
    assert torch.allclose(jac[0], 2 * torch.eye(3, dtype=x.dtype))
    assert torch.equal(jac[1], torch.zeros(3, dtype=x.dtype))
    assert torch.equal(jac[2], torch.zeros(4, 3, dtype=x.dtype))


def test_hessian_and_third_derivative(loop):
    x = _x(4)
    hess = loop.jacrev(loop.jacrev(lambda t: t.sin().sum()))(x)
    assert torch.allclose(hess, torch.diag(-x.sin()))
    third = loop.jacrev(loop.jacrev(loop.jacrev(lambda t: t.sin().sum())))(x)
    expected = torch.zeros(4, 4, 4, dtype=x.dtype)
    for i in range(4):
        expected[i, i, i] = -x[i].cos()
    assert torch.allclose(third, expected)


def test_no_perturbation_confusion(loop):
    x = _x(3)
    # d/du [ d/dv (u * v).sum() at v = u ] = d/du u = I, not 2 I.
    nested = loop.jacrev(lambda u: loop.jacrev(lambda v: (u * v).sum())(u))(x)
    assert torch.allclose(nested, torch.eye(3, dtype=x.dtype))


def test_outer_no_grad_still_differentiates(loop):
    x = _x(3)
    with torch.no_grad():
        jac = loop.jacrev(lambda t: t**2)(x)
        hess = loop.jacrev(loop.jacrev(lambda t: (t**3).sum()))(x)
    assert torch.allclose(jac, torch.diag(2 * x))
    assert torch.allclose(hess, torch.diag(6 * x))
    assert not jac.requires_grad and not hess.requires_grad


def test_inner_no_grad_is_respected(loop):
    x = _x(3)

    def f(t):
        with torch.no_grad():
            c = t**2
        return t - c

    assert torch.allclose(loop.jacrev(f)(x), torch.eye(3, dtype=x.dtype))


def test_result_is_differentiable_through_closure(loop):
    x = _x(3)
    w = _x(3, requires_grad=True)
    jac = loop.jacrev(lambda t: t.sin() * w)(x)
    assert jac.requires_grad
    (dw,) = torch.autograd.grad(jac.sum(), w)
    assert torch.allclose(dw, x.cos())


def test_result_is_differentiable_wrt_input(loop):
    x = _x(3, requires_grad=True)
    jac = loop.jacrev(lambda t: t**3)(x)
    assert jac.requires_grad
    (dx,) = torch.autograd.grad(jac.sum(), x)
    assert torch.allclose(dx, 6 * x.detach())


def test_no_graph_kept_when_nothing_requires_grad(loop, monkeypatch):
    calls = []
    original = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    jac = loop.jacrev(lambda t: t.sin() * 3)(_x(4))
    assert calls == [False] * 4
    assert not jac.requires_grad


def test_rows_in_flight_bounded_by_chunk_size(loop, monkeypatch):
    """With chunk_size=c, no more than c rows are alive beside the result."""
    x = _x(6)
    alive = []
    peak = [0]
    original = torch.autograd.grad

    def spy(*args, **kwargs):
        grads = original(*args, **kwargs)
        for g in grads:
            alive.append(weakref.ref(g))
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return grads

    monkeypatch.setattr(torch.autograd, "grad", spy)
    jac = loop.jacrev(lambda t: torch.outer(t, t), chunk_size=2)(x)
    assert peak[0] <= 2
    expected = torch.einsum("ik,j->ijk", torch.eye(6, dtype=x.dtype), x)
    expected = expected + torch.einsum("jk,i->ijk", torch.eye(6, dtype=x.dtype), x)
    assert torch.allclose(jac, expected)


def test_no_identity_matrix_is_built(loop, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.eye called")

    monkeypatch.setattr(torch, "eye", forbidden)
    x = _x(50)
    assert torch.allclose(loop.jacrev(torch.sin)(x), torch.diag_embed(x.cos()))


def test_kwargs_are_rejected_as_by_torch_func(loop):
    with pytest.raises(TypeError, match="unexpected keyword argument 'scale'"):
        loop.jacrev(lambda t, scale=1.0: t * scale)(_x(2), scale=2.0)


def test_wraps_the_function(loop):
    def energy(t):
        """Docstring."""
        return t

    wrapped = loop.jacrev(energy)
    assert wrapped.__name__ == "energy" and wrapped.__doc__ == "Docstring."


# -- differential: the same case on torch.func --------------------------------


def _w():
    return torch.linspace(-1.0, 1.0, 3, dtype=torch.float64).requires_grad_()


CASES = {
    "sin": (lambda x, y: x.sin(), 0),
    "matmul": (lambda x, y: torch.outer(x, y).tanh() @ x, 0),
    "two args": (lambda x, y: x * y.exp(), (0, 1)),
    "negative argnum": (lambda x, y: (x * y).cumsum(0), -1),
    "reversed tuple": (lambda x, y: x / (1 + y**2), (1, 0)),
    "tuple output": (lambda x, y: (x.sin(), (x * y).sum()), (0, 1)),
    "list output": (lambda x, y: [x.exp(), y], 0),
    "dict output": (lambda x, y: {"b": x.sum(), "a": torch.outer(x, y)}, 1),
    "namedtuple output": (lambda x, y: Point(x * 2, y * x), (0,)),
    "nested output": (lambda x, y: ({"p": [x, x * y]}, (y.norm(),)), 0),
    "constant output": (lambda x, y: (x * 1, torch.ones(2, dtype=torch.float64)), 0),
    "detached output": (lambda x, y: x.detach() * y, 0),
    "float32 output": (lambda x, y: (x * y).float(), (0, 1)),
    "identity": (lambda x, y: x, 0),
    "same tensor twice": (lambda x, y: (x, x * 1, x), 0),
    "pass-through twice": (lambda x, y: (x + x, x, x.sum(), (x * 1).reshape(3, 1)), (0, 1)),
    "empty output": (lambda x, y: x[:0], 0),
    "scalar output": (lambda x, y: (x * y).sum(), 1),
    "closure": (lambda x, y: x.sin() * _W, 0),
    "closure only": (lambda x, y: _W * 2, 0),
}
_W = _w()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("input_requires_grad", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_matches_torch_func(loop, reference, name, input_requires_grad, chunk_size):
    f, argnums = CASES[name]
    x = _x(3, requires_grad=input_requires_grad)
    y = _x(3)
    actual = loop.jacrev(f, argnums, chunk_size=chunk_size)(x, y)
    if name == "empty output" and chunk_size == 1:
        # torch.func trips over its own assertion here; the loop gives zeros.
        assert actual.shape == (0, 3) and not actual.requires_grad
        return
    expected = reference.jacrev(f, argnums, chunk_size=chunk_size)(x, y)
    assert_same(actual, expected)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_func_under_no_grad(loop, reference, name):
    f, argnums = CASES[name]
    x = _x(3, requires_grad=True)
    y = _x(3)
    with torch.no_grad():
        actual = loop.jacrev(f, argnums)(x, y)
        expected = reference.jacrev(f, argnums)(x, y)
    assert_same(actual, expected)


@pytest.mark.parametrize(
    "arg",
    [
        (torch.ones(2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)),
        [torch.ones(2, dtype=torch.float64)],
        {"b": torch.ones(2, dtype=torch.float64), "a": torch.ones((), dtype=torch.float64)},
        Point(torch.ones(2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)),
    ],
    ids=["tuple", "list", "dict", "namedtuple"],
)
def test_pytree_inputs(loop, reference, arg):
    from torch.utils._pytree import tree_flatten

    def f(tree, scale):
        leaves = tree_flatten(tree)[0]
        return {"s": sum(leaf.sin().sum() for leaf in leaves) * scale, "first": leaves[0] ** 2}

    scale = _x(())
    assert_same(loop.jacrev(f)(arg, scale), reference.jacrev(f)(arg, scale))
    assert_same(
        loop.jacrev(f, argnums=(1, 0))(arg, scale), reference.jacrev(f, argnums=(1, 0))(arg, scale)
    )


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("outer_no_grad", [False, True])
def test_has_aux_matches(loop, reference, x_requires_grad, outer_no_grad):
    w = _w()

    def f(x, y):
        out = x.sin() * y
        aux = {"out": out, "w": x * w, "y": y, "x": x, "plain": (y * 2, torch.ones(1))}
        return out, aux

    x = _x(3, requires_grad=x_requires_grad)
    y = _x(3)
    with torch.set_grad_enabled(not outer_no_grad):
        actual = loop.jacrev(f, has_aux=True)(x, y)
        expected = reference.jacrev(f, has_aux=True)(x, y)
    assert_same(actual, expected)


def test_aux_stays_differentiable_wrt_closure(loop):
    w = _w()
    x = _x(3)
    _, aux = loop.jacrev(lambda t: (t.sin(), t * w), has_aux=True)(x)
    assert aux.requires_grad
    (dw,) = torch.autograd.grad(aux.sum(), w)
    assert torch.allclose(dw, x)


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_compositions_match(loop, reference, input_requires_grad):
    w = _w()
    x = _x(3, requires_grad=input_requires_grad)
    xs = _x(4, 3, requires_grad=input_requires_grad)

    def f(t):
        return (t.sin() * t.sum() * w).cumsum(0)

    for build in (
        lambda b: b.jacrev(b.jacrev(f))(x),
        lambda b: b.jacrev(b.jacrev(lambda t: f(t).sum()))(x),
        lambda b: b.vmap(b.jacrev(f))(xs),
        lambda b: b.jacrev(b.vmap(f))(xs),
        lambda b: b.vmap(b.jacrev(b.jacrev(lambda t: f(t).sum())))(xs),
        lambda b: b.jacrev(lambda u: b.jacrev(lambda v: (u * v.cos()).sum())(u))(x),
        lambda b: b.jacrev(lambda u: b.vmap(lambda r: r * u)(xs), chunk_size=2)(x),
    ):
        assert_same(build(loop), build(reference))


def test_gradient_of_result_matches(loop, reference):
    x = _x(3, requires_grad=True)
    w = _w()

    def f(t):
        return t.sin() * w * t.sum()

    for backend_jac in (loop.jacrev(f)(x), reference.jacrev(f)(x)):
        assert backend_jac.requires_grad
    dl = torch.autograd.grad(loop.jacrev(f)(x).pow(2).sum(), (x, w))
    dr = torch.autograd.grad(reference.jacrev(f)(x).pow(2).sum(), (x, w))
    assert_same(dl, dr)


def test_preallocate_and_copy_is_accepted(loop, reference):
    x = _x(5)

    def f(t):
        return torch.outer(t, t.exp())

    for chunk_size in (None, 1, 3):
        actual = loop.jacrev(f, chunk_size=chunk_size, _preallocate_and_copy=True)(x)
        if ref.OLD:
            # functorch before torch 2.0 has no _preallocate_and_copy (the
            # functorch backend refuses it); it changes how torch.func fills
            # the result, not the result.
            expected = reference.jacrev(f, chunk_size=chunk_size)(x)
        else:
            expected = reference.jacrev(f, chunk_size=chunk_size, _preallocate_and_copy=True)(x)
        assert_same(actual, expected)


def test_empty_input(loop, reference):
    x = torch.ones(0, dtype=torch.float64)

    def f(t):
        return t.sum() * torch.ones(2, dtype=torch.float64)

    assert_same(loop.jacrev(f)(x), reference.jacrev(f)(x))


def test_differentiates_inside_inference_mode(loop):
    with torch.inference_mode():
        x = _x(3)
        jac = loop.jacrev(lambda t: t.sin() * 2)(x)
        hess = loop.jacrev(loop.jacrev(lambda t: (t**3).sum()))(x)
    assert torch.allclose(jac, torch.diag(2 * x.cos()))
    assert torch.allclose(hess, torch.diag(6 * x))


def test_inference_mode_matches(loop, reference):
    """Inside inference_mode as torch.func outside it under no_grad.

    (Some torch.func releases return zeros inside inference_mode; the loop
    gives the Jacobian, as newer torch.func does.)
    """
    w = _w()
    x = _x(3)
    with torch.inference_mode():
        x_inference = x.clone()
    for build in (
        lambda b, t: b.jacrev(lambda u: u.sin() * w)(t),
        lambda b, t: b.jacrev(lambda u: (u.exp(), u * 2), has_aux=True)(t),
        lambda b, t: b.vmap(b.jacrev(torch.tanh))(t.reshape(3, 1)),
    ):
        with torch.inference_mode():
            actual = build(loop, x_inference)
        with torch.no_grad():
            expected = build(reference, x)
        assert_same(actual, expected)
