"""Bad arguments: the loop backend raises what torch.func raises.

Each case runs on both backends; the exception types must be the same and
the loop's message must start the way torch.func's does, so that users'
``except`` clauses and searches for the message keep working. Before torch
2.0 the reference is functorch (tests/reference.py).
"""

from __future__ import annotations

import collections

import pytest
import torch

import adbackends

from . import reference as ref
from .test_loop_support import same_error

Point = collections.namedtuple("Point", "x y")


@pytest.fixture
def reference():
    """torch.func, or functorch before torch 2.0 (tests/reference.py).

    Overrides the torch.func-only fixture of conftest.py for this module.
    """
    return ref.backend()


X = torch.ones(3)
XS = torch.arange(6.0).reshape(2, 3)


def _f(a, b=None):
    return a * 2


JACREV_CASES = {
    "argnums list": (lambda jacrev: jacrev(_f, argnums=[0])(X)),
    "argnums float": (lambda jacrev: jacrev(_f, argnums=0.0)(X)),
    "argnums tuple of float": (lambda jacrev: jacrev(_f, argnums=(0.0,))(X)),
    "argnums empty": (lambda jacrev: jacrev(_f, argnums=())(X)),
    "argnums duplicate": (lambda jacrev: jacrev(_f, argnums=(0, -2))(X, X)),
    "argnums out of range": (lambda jacrev: jacrev(_f, argnums=2)(X, X)),
    "argnums negative out of range": (lambda jacrev: jacrev(_f, argnums=(0, -3))(X, X)),
    "no arguments": (lambda jacrev: jacrev(lambda: X)()),
    "non-tensor argument": (lambda jacrev: jacrev(_f)(3.0)),
    "non-tensor leaf in pytree": (lambda jacrev: jacrev(lambda d: d["a"])({"a": X, "b": 1})),
    "integer argument": (lambda jacrev: jacrev(_f)(torch.arange(3))),
    "complex argument": (lambda jacrev: jacrev(_f)(X.to(torch.cfloat))),
    "complex other argument": (lambda jacrev: jacrev(_f)(X, X.to(torch.cfloat))),
    "complex output": (lambda jacrev: jacrev(lambda a: a.to(torch.cfloat))(X)),
    "integer output": (lambda jacrev: jacrev(lambda a: a.long())(X)),
    "None output": (lambda jacrev: jacrev(lambda a: None)(X)),
    "empty output": (lambda jacrev: jacrev(lambda a: ())(X)),
    "non-tensor output": (lambda jacrev: jacrev(lambda a: (a, 3.0))(X)),
    "has_aux not a pair": (lambda jacrev: jacrev(lambda a: a, has_aux=True)(X)),
    "has_aux triple": (lambda jacrev: jacrev(lambda a: (a, a, a), has_aux=True)(X)),
    "aux non-tensor": (lambda jacrev: jacrev(lambda a: (a, {"n": 3}), has_aux=True)(X)),
    "aux None": (lambda jacrev: jacrev(lambda a: (a, None), has_aux=True)(X)),
    "chunk_size zero": (lambda jacrev: jacrev(_f, chunk_size=0)),
    "chunk_size negative": (lambda jacrev: jacrev(_f, chunk_size=-2)),
    "chunk_size string": (lambda jacrev: jacrev(_f, chunk_size="2")),
    "chunk_size float": (lambda jacrev: jacrev(_f, chunk_size=1.5)(X)),
    "keyword argument": (lambda jacrev: jacrev(_f)(X, b=X)),
    "error inside f": (lambda jacrev: jacrev(lambda a: a @ torch.ones(2))(X)),
}


# torch.func's message for these comes from its internals, not from a check.
TYPE_ONLY = {"chunk_size float", "error inside f"}


# functorch before torch 2.0 has no chunk_size (the functorch backend checks
# it its own way) and differentiates complex functions in jacrev. There the
# loop is checked against what torch.func raises: the type, and how the
# message starts ("" where torch.func's comes from its internals).
TORCH_FUNC_ERRORS = {
    "jacrev": {
        "complex argument": (RuntimeError, "jacrev: Expected all inputs to be real"),
        "complex other argument": (RuntimeError, "jacrev: Expected all inputs to be real"),
        "complex output": (RuntimeError, "jacrev: Expected all outputs to be real"),
        "chunk_size zero": (ValueError, "jacrev: `chunk_size` should be greater than 0."),
        "chunk_size negative": (ValueError, "jacrev: `chunk_size` should be greater than 0."),
        "chunk_size string": (TypeError, ""),
        "chunk_size float": (TypeError, ""),
    },
    "vmap": {
        # functorch before torch 2.0 has no out_dims=None (its backend refuses it).
        "batched output with out_dim None": (
            ValueError,
            "vmap(_f, ...): `_f` can not return a BatchedTensor when out_dim is None",
        ),
        "chunk_size zero": (ValueError, "vmap: chunk_size should be None or greater than 0."),
        "chunk_size float": (TypeError, ""),
    },
}


def _raises_as_torch_func(api: str, name: str, call) -> bool:
    """Where the reference cannot say, check ``call`` against TORCH_FUNC_ERRORS."""
    if ref.OLD and name in TORCH_FUNC_ERRORS[api]:
        kind, start = TORCH_FUNC_ERRORS[api][name]
    elif api == "vmap" and name == "no batched input" and ref.vmap_breaks_without_batched_input():
        # functorch 0.2.1 (torch 1.12) fails there with an IndexError of its own.
        kind, start = ValueError, ref.NO_BATCHED_INPUT
    else:
        return False
    with pytest.raises(Exception) as raised:
        call()
    assert type(raised.value) is kind, f"loop raised {raised.value!r}"
    assert str(raised.value).startswith(start), f"loop raised {raised.value!r}"
    return True


@pytest.mark.parametrize("name", list(JACREV_CASES))
def test_jacrev_errors(reference, name):
    loop = adbackends.get("loop")
    case = JACREV_CASES[name]
    if _raises_as_torch_func("jacrev", name, lambda: case(loop.jacrev)):
        return
    same_error(
        lambda: case(loop.jacrev), lambda: case(reference.jacrev), message=name not in TYPE_ONLY
    )


def _dot(a, b):
    return torch.dot(a, b)


VMAP_CASES = {
    "sizes disagree": (lambda vmap: vmap(torch.add)(XS, torch.ones(3, 3))),
    "no batched input": (lambda vmap: vmap(_f, in_dims=(None,))(XS)),
    "in_dims None": (lambda vmap: vmap(_f, in_dims=None)(XS)),
    "in_dims list": (lambda vmap: vmap(_dot, in_dims=[0, 0])(XS, XS)),
    "in_dims string": (lambda vmap: vmap(_f, in_dims="0")(XS)),
    "in_dims float leaf": (lambda vmap: vmap(_f, in_dims=(1.0,))(XS)),
    "in_dims too short": (lambda vmap: vmap(_dot, in_dims=(0,))(XS, XS)),
    "in_dims dict keys": (
        lambda vmap: vmap(lambda d: d["x"], in_dims=({"x": 0},))({"x": XS, "y": X})
    ),
    "in_dims tuple for namedtuple": (
        lambda vmap: vmap(lambda p: p.x, in_dims=((0, None),))(Point(XS, X))
    ),
    "in_dim out of range": (lambda vmap: vmap(_f, in_dims=2)(XS)),
    "in_dim negative out of range": (lambda vmap: vmap(_f, in_dims=-3)(XS)),
    "in_dim on non-tensor": (lambda vmap: vmap(_f, in_dims=(0, 0))(XS, 2.0)),
    "no inputs": (lambda vmap: vmap(lambda: X)()),
    "non-tensor output": (lambda vmap: vmap(lambda a: (a, 3))(XS)),
    "None output": (lambda vmap: vmap(lambda a: None)(XS)),
    "batched output with out_dim None": (lambda vmap: vmap(_f, out_dims=None)(XS)),
    "out_dims string": (lambda vmap: vmap(_f, out_dims="a")(XS)),
    "out_dims float": (lambda vmap: vmap(_f, out_dims=(1.0,))(XS)),
    "out_dims too long": (lambda vmap: vmap(lambda a: (a, a), out_dims=(0, 1, 0))(XS)),
    "out_dims 2-tuple for tensor": (lambda vmap: vmap(_f, out_dims=(1, 0))(XS)),
    "out_dims tuple for list": (lambda vmap: vmap(lambda a: [a, a], out_dims=(0, 1))(XS)),
    "out_dim out of range": (lambda vmap: vmap(_f, out_dims=5)(XS)),
    "out_dim negative out of range": (lambda vmap: vmap(_f, out_dims=-3)(XS)),
    "randomness unknown": (lambda vmap: vmap(_f, randomness="sometimes")),
    "random op in error mode": (lambda vmap: vmap(lambda a: a + torch.rand(()))(XS)),
    "random_like in error mode": (lambda vmap: vmap(torch.rand_like)(XS)),
    "in-place random in error mode": (lambda vmap: vmap(lambda a: a.clone().normal_())(XS)),
    "chunk_size zero": (lambda vmap: vmap(_f, chunk_size=0)),
    "chunk_size float": (lambda vmap: vmap(_f, chunk_size=1.5)(XS)),
    "error inside f": (lambda vmap: vmap(lambda a: a @ torch.ones(2))(XS)),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vmap_errors(reference, name):
    loop = adbackends.get("loop")
    case = VMAP_CASES[name]
    if _raises_as_torch_func("vmap", name, lambda: case(loop.vmap)):
        return
    same_error(lambda: case(loop.vmap), lambda: case(reference.vmap), message=name not in TYPE_ONLY)


# -- run on every torch: the errors themselves ---------------------------------


def test_errors_without_reference():
    loop = adbackends.get("loop")
    with pytest.raises(RuntimeError, match="argnums elements must be unique"):
        loop.jacrev(_f, argnums=(0, 0))(X, X)
    with pytest.raises(ValueError, match="vmap: Expected all tensors to have the same size"):
        loop.vmap(torch.add)(XS, torch.ones(3, 3))
    with pytest.raises(ValueError, match="Expected at least one Tensor to vmap over"):
        loop.vmap(_f, in_dims=(None,))(XS)
    with pytest.raises(RuntimeError, match="randomness error mode"):
        loop.vmap(lambda a: a + torch.rand(()))(XS)
    with pytest.raises(ValueError, match="`chunk_size` should be greater than 0"):
        loop.jacrev(_f, chunk_size=0)


def test_rng_state_is_untouched_by_a_failed_random_call():
    loop = adbackends.get("loop")
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError):
        loop.vmap(lambda a: a + torch.rand(()))(XS)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_grad_wrapper_removed_after_an_error():
    loop = adbackends.get("loop")
    original = torch.autograd.grad

    def boom(a):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        loop.vmap(boom)(XS)
    assert torch.autograd.grad is original
