"""The loop backend's vmap: analytic answers, and torch.func's behaviour case by case.

Before torch 2.0 the reference is functorch (tests/reference.py).
"""

from __future__ import annotations

import collections

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
    return torch.randn(shape, dtype=torch.float64).requires_grad_(requires_grad)


# -- analytic answers (run on every torch) -------------------------------------


def test_batched_dot(loop):
    x, y = _x(4, 3), _x(4, 3)
    assert torch.allclose(loop.vmap(torch.dot)(x, y), (x * y).sum(1))


def test_in_dims_none_and_negative(loop):
    x, y = _x(3, 4), _x(3)
    assert torch.allclose(loop.vmap(torch.dot, in_dims=(-1, None))(x, y), y @ x)


def test_nested_pytree_in_dims(loop):
    x, y = _x(2, 5), _x(5)
    out = loop.vmap(lambda d: torch.dot(d["x"], d["y"]), in_dims=({"x": 0, "y": None},))(
        {"x": x, "y": y}
    )
    assert torch.allclose(out, x @ y)


def test_out_dims_and_kwargs(loop):
    x = _x(2, 5)
    assert loop.vmap(lambda t: t**2, out_dims=1)(x).shape == (5, 2)
    out = loop.vmap(lambda t, scale=4.0: t * scale)(x, scale=x)
    assert out.shape == (2, 2, 5)
    assert torch.allclose(out, x[:, None, :] * x[None])


def test_nested_vmap(loop):
    x, y = _x(2, 3, 5), _x(2, 3, 5)
    assert torch.allclose(loop.vmap(loop.vmap(torch.dot))(x, y), (x * y).sum(-1))


def test_vmap_over_autograd_grad_of_closed_over_graph(loop):
    n = 5
    x = _x(n, requires_grad=True)
    y = x**2

    def get_vjp(v):
        return torch.autograd.grad(y, x, v)

    (jac,) = loop.vmap(get_vjp)(torch.eye(n, dtype=x.dtype))
    assert torch.allclose(jac, torch.diag(2 * x.detach()))
    # The last sample freed the graph, as a single torch.autograd.grad would.
    with pytest.raises(RuntimeError):
        torch.autograd.grad(y, x, torch.ones_like(y))
    assert not hasattr(torch.autograd.grad, "__adbackends_original__")


def test_nested_vmap_over_autograd_grad(loop):
    x = _x(3, requires_grad=True)
    y = x.sin()
    seeds = torch.eye(3, dtype=x.dtype).expand(2, 3, 3)
    out = loop.vmap(loop.vmap(lambda v: torch.autograd.grad(y, x, v)[0]))(seeds)
    assert torch.allclose(out, torch.diag(x.detach().cos()).expand(2, 3, 3))


def test_randomness_modes(loop):
    base = torch.zeros(4, dtype=torch.float64)

    def noisy(t):
        return t + torch.rand((), dtype=torch.float64)

    torch.manual_seed(1)
    same = loop.vmap(noisy, randomness="same")(base)
    after_same = torch.rand(())
    torch.manual_seed(1)
    single = torch.rand((), dtype=torch.float64)
    after_single = torch.rand(())
    assert torch.equal(same, single.expand(4))
    assert torch.equal(after_same, after_single)
    different = loop.vmap(noisy, randomness="different")(base)
    assert len(set(different.tolist())) == 4
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="randomness error mode"):
        loop.vmap(noisy)(base)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_nested_randomness(loop):
    x = torch.zeros(2, 3)

    def draw(t):
        return t + torch.rand(())

    outer_same = loop.vmap(loop.vmap(draw, randomness="different"), randomness="same")(x)
    assert torch.equal(outer_same[0], outer_same[1]) and len(set(outer_same[0].tolist())) == 3
    inner_same = loop.vmap(loop.vmap(draw, randomness="same"), randomness="different")(x)
    assert (inner_same == inner_same[:, :1]).all() and inner_same[0, 0] != inner_same[1, 0]
    with pytest.raises(RuntimeError, match="randomness error mode"):
        loop.vmap(loop.vmap(draw, randomness="different"))(x)


def test_chunk_size_gives_same_result(loop):
    x = _x(7, 3)
    for chunk_size in (1, 2, 3, 7, 100):
        assert torch.allclose(loop.vmap(torch.sin, chunk_size=chunk_size)(x), x.sin())


def test_vmap_of_loop_jacrev(loop):
    xs = _x(4, 3)
    out = loop.vmap(loop.jacrev(torch.sin))(xs)
    assert torch.allclose(out, torch.diag_embed(xs.cos()))


def test_vmap_keeps_graph(loop):
    x = _x(3, 2, requires_grad=True)
    out = loop.vmap(lambda t: t.sin().sum())(x)
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(dx, x.detach().cos())


def test_empty_batch(loop):
    out = loop.vmap(lambda t: (t * 2, t.sum()))(torch.ones(0, 3))
    assert out[0].shape == (0, 3) and out[1].shape == (0,)


def test_out_dims_none_for_sample_independent_outputs(loop):
    x = _x(3, 2)
    table = torch.tensor([1.0, float("nan")])
    out, same = loop.vmap(lambda t: (t * 2, table * 1), out_dims=(0, None))(x)
    assert torch.equal(out, 2 * x) and same.shape == (2,)
    with pytest.raises(ValueError, match="can not return a BatchedTensor when out_dim is None"):
        loop.vmap(lambda t: t * 2, out_dims=None)(x)


def test_code_vmap_cannot_batch_runs(loop):
    # Data-dependent control flow and .item(): a loop handles them.
    x = torch.tensor([[1.0, -1.0], [-2.0, 3.0]])
    out = loop.vmap(lambda t: t * 2 if t.sum().item() > 0 else -t)(x)
    assert torch.equal(out, torch.tensor([[-1.0, 1.0], [-4.0, 6.0]]))


# -- differential: the same case on torch.func --------------------------------


def _w():
    return torch.linspace(-1.0, 1.0, 3, dtype=torch.float64).requires_grad_()


_W = _w()

CASES = {
    "int": (lambda a, b: a * b, 0, 0, ((4, 3), (4, 3))),
    "tuple in_dims": (lambda a, b: a @ b, (1, None), 0, ((3, 4), (3,))),
    "negative in_dim": (lambda a, b: a + b, (-1, 0), 0, ((3, 4), (4, 3))),
    "out_dims int": (lambda a, b: torch.outer(a, b), (0, 0), 2, ((4, 3), (4, 3))),
    "out_dims negative": (lambda a, b: torch.outer(a, b), (0, 0), -2, ((4, 3), (4, 3))),
    "out_dims tuple": (lambda a, b: (a.sum(), a * b), 0, (0, 1), ((4, 3), (4, 3))),
    "out_dims 1-tuple": (lambda a, b: a * b, 0, (1,), ((4, 3), (4, 3))),
    "out_dims None unbatched": (lambda a, b: (a * b, b), (0, None), (0, None), ((4, 3), (3,))),
    "out_dims list": (lambda a, b: [a, {"k": b * 2}], 0, [1, {"k": 0}], ((4, 3), (4, 3))),
    "namedtuple out": (lambda a, b: Point(a, b.sum()), 0, Point(0, 0), ((4, 3), (4, 3))),
    "unbatched output": (lambda a, b: (a, b * 2), (0, None), 0, ((4, 3), (3,))),
    "closure": (lambda a, b: a * _W + b, (0, None), 0, ((4, 3), (3,))),
    "scalar samples": (lambda a, b: a * b, (0, None), 0, ((5,), ())),
    "integer output": (lambda a, b: (a > 0).long() + b.long(), 0, 0, ((4, 3), (4, 3))),
    "empty tuple output": (lambda a, b: (), 0, 0, ((4, 3), (4, 3))),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_matches_torch_func(loop, reference, name, requires_grad, chunk_size):
    f, in_dims, out_dims, shapes = CASES[name]
    args = [_x(*shape, requires_grad=requires_grad) for shape in shapes]
    actual = loop.vmap(f, in_dims, out_dims, chunk_size=chunk_size)(*args)
    if name in ("out_dims 1-tuple", "out_dims None unbatched"):
        # torch.func's chunked path fails on these out_dims; the loop gives
        # what its unchunked path gives.
        chunk_size = None
    if name == "out_dims None unbatched" and ref.OLD:
        # functorch before torch 2.0 refuses None in out_dims: the batched
        # output from it with out_dim 0, the unbatched one (b) as is.
        batched = reference.vmap(f, in_dims, 0)(*args)
        assert_same(actual, (batched[0], args[1]))
        return
    expected = reference.vmap(f, in_dims, out_dims, chunk_size=chunk_size)(*args)
    assert_same(actual, expected)


def test_unbatched_output_moved_to_out_dim(loop):
    # torch.func fails to expand an unbatched output to out_dims=1; the loop
    # gives what a user expects: the output repeated along dimension 1.
    a, b = _x(4, 3), _x(3)
    out = loop.vmap(lambda s, t: (s, t * 2), (0, None), 1)(a, b)
    assert out[0].shape == (3, 4) and torch.equal(out[0], a.t())
    assert torch.equal(out[1], (2 * b)[:, None].expand(3, 4))


@pytest.mark.parametrize(
    "args, in_dims",
    [
        (({"x": (4, 3), "y": (3,)},), ({"x": 0, "y": None},)),
        (((4, 3), [(3, 4), (2,)]), (0, [1, None])),
        ((Point((4, 2), (2,)),), (Point(0, None),)),
        (((4, 3), (4,)), 0),
        (((2, 4), {"a": (3, 4)}), (1, {"a": -1})),
    ],
)
def test_pytree_in_dims(loop, reference, args, in_dims):
    from torch.utils._pytree import tree_flatten

    def is_shape(node):
        return (
            isinstance(node, tuple)
            and not isinstance(node, Point)
            and all(isinstance(s, int) for s in node)
        )

    inputs = _materialise(args, is_shape)

    def f(*trees):
        leaves = tree_flatten(trees)[0]
        return sum(leaf.sum() for leaf in leaves) * leaves[0]

    assert_same(loop.vmap(f, in_dims)(*inputs), reference.vmap(f, in_dims)(*inputs))


def _materialise(node, is_shape):
    if is_shape(node):
        return _x(*node)
    if isinstance(node, dict):
        return {k: _materialise(v, is_shape) for k, v in node.items()}
    if isinstance(node, Point):
        return Point(*(_materialise(v, is_shape) for v in node))
    if isinstance(node, (list, tuple)):
        return type(node)(_materialise(v, is_shape) for v in node)
    return node


def test_randomness_same_matches_exactly(loop, reference):
    x = torch.zeros(3, 2)

    def f(t):
        return t + torch.rand(2) + torch.randn_like(t)

    torch.manual_seed(3)
    actual = loop.vmap(f, randomness="same")(x)
    after_loop = torch.rand(3)
    torch.manual_seed(3)
    expected = reference.vmap(f, randomness="same")(x)
    after_reference = torch.rand(3)
    assert_same(actual, expected)
    assert torch.equal(after_loop, after_reference)


def test_vmap_jacrev_and_jacrev_vmap_match(loop, reference):
    xs = _x(4, 3, requires_grad=True)
    w = _w()

    def f(t):
        return (t.exp() * w).cumsum(0)

    for build in (
        lambda b: b.vmap(b.jacrev(f))(xs),
        lambda b: b.jacrev(b.vmap(f))(xs),
        lambda b: b.vmap(b.vmap(f))(xs.reshape(2, 2, 3)),
        lambda b: b.vmap(b.jacrev(f), in_dims=1, out_dims=-1)(xs.t()),
        lambda b: b.vmap(lambda t: b.jacrev(b.jacrev(lambda u: f(u).sum()))(t))(xs),
    ):
        assert_same(build(loop), build(reference))


def test_vmap_over_grad_matches(loop, reference):
    n = 4
    x = _x(n, requires_grad=True)

    def run(backend):
        y = x.tanh() * x.sum()
        return backend.vmap(lambda v: torch.autograd.grad(y, x, v, create_graph=True))(
            torch.eye(n, dtype=x.dtype)
        )

    assert_same(run(loop), run(reference))


# -- one tensor in: the path without pytrees -------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    "f, in_dims, out_dims",
    [
        (lambda t: t.sin().sum(), 0, 0),
        (lambda t: torch.outer(t, t), -1, 1),
        (lambda t: (t.sum(), t * 2), 0, 0),
        (lambda t: {"a": t.cos()}, 1, -1),
        (lambda t: t[0], 0, 0),
    ],
)
def test_single_tensor_matches_torch_func(loop, reference, f, in_dims, out_dims, requires_grad):
    for batch in (1, 2, 5):
        x = _x(batch, 3, requires_grad=requires_grad)
        if in_dims in (1, -1):
            x = _x(3, batch, requires_grad=requires_grad)
        assert_same(loop.vmap(f, in_dims, out_dims)(x), reference.vmap(f, in_dims, out_dims)(x))


def test_single_tensor_randomness_error_restores_generator(loop):
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="randomness error mode"):
        loop.vmap(lambda t: t + torch.rand(()))(torch.zeros(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not hasattr(torch.autograd.grad, "__adbackends_original__")


def test_backward_through_unbound_samples(loop):
    # Samples of an argument that does not require grad feed a function that
    # closes over one that does: gradients reach the closed-over tensor.
    w = _x(3, requires_grad=True)
    x = _x(6, 3)
    out = loop.vmap(lambda t: (t * w).sum())(x)
    (dw,) = torch.autograd.grad(out.sum(), w)
    assert torch.allclose(dw, x.sum(0))
