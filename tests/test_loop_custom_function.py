"""Custom autograd Functions of both styles under the loop backend's transforms.

The ctx style (``forward(ctx, ...)``) is the one functorch could not handle
before torch 2.0 and the reason the loop backend exists; it must work under
jacrev, vmap, their compositions and, with a differentiable backward, under
jacrev of jacrev. The setup_context style is checked with and without a vmap
rule, and against torch.func where torch.func can run it.
"""

from __future__ import annotations

import pytest
import torch

import adbackends

from . import reference as ref
from .test_loop_support import assert_same

HAS_SETUP_CONTEXT = hasattr(torch.autograd.Function, "setup_context")
needs_setup_context = pytest.mark.skipif(
    not HAS_SETUP_CONTEXT, reason="setup_context-style Functions arrived in torch 2.0"
)


@pytest.fixture
def reference():
    """torch.func, or functorch before torch 2.0 (tests/reference.py).

    Overrides the torch.func-only fixture of conftest.py for this module.
    """
    return ref.backend()


@pytest.fixture
def loop():
    return adbackends.get("loop")


class LegacyCube(torch.autograd.Function):
    """x**3 in the ctx style; its backward is differentiable."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


class LegacyScaledSinCos(torch.autograd.Function):
    """(scale * sin x, cos x * y) in the ctx style, with a non-tensor argument."""

    @staticmethod
    def forward(ctx, x, y, scale):
        ctx.save_for_backward(x, y)
        ctx.scale = scale
        return scale * x.sin(), x.cos() * y

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        x, y = ctx.saved_tensors
        grad_x = grad_a * ctx.scale * x.cos() - grad_b * x.sin() * y
        grad_y = grad_b * x.cos()
        return grad_x, grad_y, None


def _modern_functions():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

        @staticmethod
        def vmap(info, in_dims, x):
            return Cube.apply(x), in_dims[0]

    class CubeNoVmapRule(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    class CubeGenerated(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    return {"vmap rule": Cube, "no vmap rule": CubeNoVmapRule, "generated": CubeGenerated}


CUBES = ["legacy"] + (["vmap rule", "no vmap rule", "generated"] if HAS_SETUP_CONTEXT else [])


def _cube(kind):
    if kind == "legacy":
        return LegacyCube.apply
    return _modern_functions()[kind].apply


def _x(*shape):
    return torch.linspace(
        -1.5, 2.0, max(1, int(torch.tensor(shape).prod())), dtype=torch.float64
    ).reshape(shape)


@pytest.mark.parametrize("kind", CUBES)
def test_cube_under_every_transform(loop, kind):
    cube = _cube(kind)
    x, xs = _x(3), _x(2, 3)
    assert torch.allclose(loop.jacrev(cube)(x), torch.diag(3 * x**2))
    assert torch.allclose(loop.vmap(cube)(xs), xs**3)
    assert torch.allclose(loop.vmap(loop.jacrev(cube))(xs), torch.diag_embed(3 * xs**2))
    jac = loop.jacrev(loop.vmap(cube))(xs)
    expected = torch.zeros(2, 3, 2, 3, dtype=x.dtype)
    for i in range(2):
        expected[i, :, i, :] = torch.diag(3 * xs[i] ** 2)
    assert torch.allclose(jac, expected)
    # Hessian through the differentiable backward: d2/dx2 sum(x**3) = diag(6 x).
    hess = loop.jacrev(loop.jacrev(lambda t: cube(t).sum()))(x)
    assert torch.allclose(hess, torch.diag(6 * x))
    batched_hess = loop.vmap(loop.jacrev(loop.jacrev(lambda t: cube(t).sum())))(xs)
    assert torch.allclose(batched_hess, torch.diag_embed(6 * xs))


@pytest.mark.parametrize("kind", CUBES)
def test_cube_under_outer_no_grad_and_closure(loop, kind):
    cube = _cube(kind)
    x = _x(3)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        assert torch.allclose(loop.jacrev(cube)(x), torch.diag(3 * x**2))
    jac = loop.jacrev(lambda t: cube(t * w))(x)
    assert jac.requires_grad
    assert torch.allclose(jac.detach(), torch.diag(3 * (x * w.detach()) ** 2 * w.detach()))


def test_legacy_multi_output_with_non_tensor_argument(loop):
    x, y = _x(3), _x(3) + 3

    def f(a, b):
        return LegacyScaledSinCos.apply(a, b, 2.5)

    jac_a, jac_b = loop.jacrev(f, argnums=(0, 1))(x, y)
    assert torch.allclose(jac_a[0], torch.diag(2.5 * x.cos()))
    assert torch.allclose(jac_a[1], torch.zeros(3, 3, dtype=x.dtype))
    assert torch.allclose(jac_b[0], torch.diag(-x.sin() * y))
    assert torch.allclose(jac_b[1], torch.diag(x.cos()))
    out = loop.vmap(f, in_dims=(0, None))(torch.stack([x, 2 * x]), y)
    assert torch.allclose(out[0][1], 2.5 * (2 * x).sin())


@pytest.mark.parametrize("kind", ["vmap rule", "generated"])
def test_matches_torch_func(loop, reference, kind):
    if not HAS_SETUP_CONTEXT:
        pytest.skip("setup_context-style Functions arrived in torch 2.0")
    cube = _cube(kind)
    x, xs = _x(3), _x(2, 3)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    for build in (
        lambda b: b.jacrev(cube)(x),
        lambda b: b.vmap(cube)(xs),
        lambda b: b.vmap(b.jacrev(cube))(xs),
        lambda b: b.jacrev(b.vmap(cube))(xs),
        lambda b: b.jacrev(b.jacrev(lambda t: cube(t).sum()))(x),
        lambda b: b.jacrev(lambda t: cube(t) * w)(x),
        lambda b: b.vmap(b.jacrev(lambda t: cube(t * w)))(xs),
    ):
        assert_same(build(loop), build(reference))


@pytest.mark.parametrize("nonlinear", [False, True])
def test_legacy_function_matches_plain_code_on_the_reference(loop, reference, nonlinear):
    """The loop through a ctx-style Function, the reference through the same math.

    No reference runs a ctx-style Function under its transforms (functorch
    before torch 2.0 refuses every Function, torch.func this style), so the
    reference gets the plain expression the Function computes, on every torch.
    """

    def through_function(t):
        return LegacyCube.apply(t.sin() if nonlinear else t)

    def plain(t):
        return (t.sin() if nonlinear else t) ** 3

    x, xs = _x(3), _x(2, 3)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    for build in (
        lambda b, cube: b.jacrev(cube)(x),
        lambda b, cube: b.vmap(cube)(xs),
        lambda b, cube: b.vmap(b.jacrev(cube))(xs),
        lambda b, cube: b.jacrev(b.vmap(cube))(xs),
        lambda b, cube: b.jacrev(b.jacrev(lambda t: cube(t).sum()))(x),
        lambda b, cube: b.jacrev(lambda t: cube(t) * w)(x),
        lambda b, cube: b.vmap(b.jacrev(lambda t: cube(t * w)))(xs),
    ):
        assert_same(build(loop, through_function), build(reference, plain))


@needs_setup_context
def test_function_torch_func_cannot_vmap(loop, reference):
    """Without a vmap rule torch.func refuses; the loop runs it."""
    cube = _cube("no vmap rule")
    xs = _x(2, 3)
    with pytest.raises(RuntimeError):
        reference.vmap(cube)(xs)
    assert torch.allclose(loop.vmap(cube)(xs), xs**3)
