"""Nested transforms on the loop backend and on the reference, result by result.

The reference is torch.func, or functorch before torch 2.0 (tests/reference.py).

Every combination of two levels (jacrev or vmap, outer and inner) and of the
arguments each level acts on is run on both backends, with inputs that do or
do not require grad, inside and outside ``torch.no_grad``. Each result must
match in structure, shape, dtype, values, ``requires_grad`` and whether it
carries a ``grad_fn``: a graph the loop keeps where torch.func keeps none is
memory nobody can use.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch.utils._pytree import tree_flatten

import adbackends

from . import reference
from .test_loop_support import assert_same, same_error

ARGNUMS = [0, 1, (0, 1), -1]
LEVELS = ["jacrev", "vmap"]
OUTER_BATCH, INNER_BATCH = 3, 4

_WEIGHT = torch.tensor([0.5, -1.5], dtype=torch.float64, requires_grad=True)

FUNCTIONS: Dict[str, Callable[..., Any]] = {
    "sin(a) * b": lambda a, b: torch.sin(a) * b,
    "closure": lambda a, b: torch.sin(a) * b * _WEIGHT,
}

REQUIRES_GRAD = {"none": (False, False), "both": (True, True), "a only": (True, False)}


@pytest.fixture
def loop() -> adbackends.Backend:
    return adbackends.get("loop")


@pytest.fixture
def func_backend() -> adbackends.Backend:
    """torch.func, or functorch before torch 2.0 (tests/reference.py)."""
    return reference.backend()  # type: ignore[no-any-return]


def _positions(argnums: Any) -> Tuple[int, ...]:
    """The argument positions (of two) that ``argnums`` selects."""
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    return tuple(n % 2 for n in nums)


def _in_dims(argnums: Any) -> Tuple[Any, Any]:
    """vmap's counterpart of ``argnums``: batch exactly the selected arguments."""
    chosen = _positions(argnums)
    return (0 if 0 in chosen else None, 0 if 1 in chosen else None)


def _level(backend: adbackends.Backend, kind: str, argnums: Any, f: Callable[..., Any]) -> Any:
    if kind == "jacrev":
        return backend.jacrev(f, argnums=argnums)
    return backend.vmap(f, in_dims=_in_dims(argnums))


def _inputs(
    outer: str, outer_argnums: Any, inner: str, inner_argnums: Any, requires_grad: Tuple[bool, bool]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two arguments of shape ``(2,)``, with a leading dim per vmap level that maps them."""
    gen = torch.Generator().manual_seed(7)
    args = []
    for position, grad in enumerate(requires_grad):
        shape = [2]
        if inner == "vmap" and position in _positions(inner_argnums):
            shape.insert(0, INNER_BATCH)
        if outer == "vmap" and position in _positions(outer_argnums):
            shape.insert(0, OUTER_BATCH)
        value = torch.randn(shape, generator=gen, dtype=torch.float64)
        args.append(value.requires_grad_(grad))
    return args[0], args[1]


def assert_same_graphs(actual: Any, expected: Any) -> None:
    """``assert_same``, and every tensor has a ``grad_fn`` exactly where torch.func's has."""
    assert_same(actual, expected)
    for i, (a, e) in enumerate(zip(tree_flatten(actual)[0], tree_flatten(expected)[0])):
        if isinstance(e, torch.Tensor):
            assert (a.grad_fn is not None) == (e.grad_fn is not None), (
                f"leaf {i}: loop grad_fn {a.grad_fn}, torch.func grad_fn {e.grad_fn}"
            )


CASES = list(itertools.product(LEVELS, ARGNUMS, LEVELS, ARGNUMS))


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("requires_grad", list(REQUIRES_GRAD))
@pytest.mark.parametrize("function", list(FUNCTIONS))
@pytest.mark.parametrize(
    "outer, outer_argnums, inner, inner_argnums",
    CASES,
    ids=[f"{o}{oa}-{i}{ia}".replace(" ", "") for o, oa, i, ia in CASES],
)
def test_nested_transforms_match(
    loop, func_backend, outer, outer_argnums, inner, inner_argnums, function, requires_grad, no_grad
):
    f = FUNCTIONS[function]
    a, b = _inputs(outer, outer_argnums, inner, inner_argnums, REQUIRES_GRAD[requires_grad])

    def run(backend: adbackends.Backend) -> Any:
        mode = torch.no_grad() if no_grad else contextlib.nullcontext()
        with mode:
            nested = _level(backend, outer, outer_argnums, _level(backend, inner, inner_argnums, f))
            return nested(a, b)

    try:
        expected = run(func_backend)
    except Exception:
        same_error(lambda: run(loop), lambda: run(func_backend), message=False)
        return
    assert_same_graphs(run(loop), expected)


def test_second_derivative_of_plain_scalars_keeps_no_graph(loop, func_backend):
    # The mixed second derivative of sin(a) * b: nothing outside requires grad.
    def f(a, b):
        return torch.sin(a) * b

    a = torch.tensor(0.3, dtype=torch.float64)
    b = torch.tensor(-1.2, dtype=torch.float64)
    actual = loop.jacrev(loop.jacrev(f, argnums=0), argnums=1)(a, b)
    expected = func_backend.jacrev(func_backend.jacrev(f, argnums=0), argnums=1)(a, b)
    assert not actual.requires_grad and actual.grad_fn is None
    assert_same_graphs(actual, expected)
    assert torch.allclose(actual, torch.cos(a))


# -- out_dims=None: refused exactly when the output depends on the batch --------


def _tensor(*shape: int, dtype: torch.dtype = torch.float64, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(11)
    value = torch.randn(shape, generator=gen, dtype=torch.float64)
    if not dtype.is_floating_point:
        value = (value * 3).to(dtype)
    return value.to(dtype).requires_grad_(requires_grad)


def _no_grad_times_zero(v: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return v * 0


_CONSTANT = torch.arange(3.0, dtype=torch.float64)

OUT_NONE = {
    # Depends on the batch, whatever the values: torch.func refuses.
    "times zero": lambda v: v * 0,
    "zeros_like": torch.zeros_like,
    "new_zeros": lambda v: v.new_zeros(3),
    "comparison": lambda v: (v * 0 > 1).to(v.dtype),
    "detached": lambda v: v.detach() * 0,
    "under no_grad": _no_grad_times_zero,
    "view": lambda v: v[:1] * 0,
    "sum": lambda v: v.sum() * 0,
    "pytree": lambda v: {"a": _CONSTANT * 1, "b": (v * 0,)},
    # Does not: torch.func returns it as is.
    "constant": lambda v: _CONSTANT * 2,
    "from shape": lambda v: torch.zeros(v.shape, dtype=v.dtype),
    "new_tensor": lambda v: v.new_tensor([1.0, 2.0]),
    "constant pytree": lambda v: (_CONSTANT, {"k": _CONSTANT.sum()}),
}


#: The cases above that depend on the batch.
DEPENDS = {
    "times zero",
    "zeros_like",
    "new_zeros",
    "comparison",
    "detached",
    "under no_grad",
    "view",
    "sum",
    "pytree",
}

#: The cases above that reach their output by indexing a sample.
INDEXING = {"view"}

#: torch.func's message when an output with out_dim None depends on the batch.
REFUSED = "can not return a BatchedTensor when out_dim is None"

# functorch before torch 2.0 refuses out_dims=None altogether ("`out_dims`
# must be an int or a python collection of ints"). There the loop is checked
# against what torch.func does: a refusal with its message where the output
# depends on the batch, and the output of one sample, as is, where it does not.
OLD_FUNCTORCH = reference.OLD


def _judged_by_values(request: Any, indexing: bool = False) -> None:
    """Mark a test whose output depends on the batch but is the same for
    every sample as an expected failure where the loop cannot follow the
    operations that computed it, and so judges it by its values
    (docs/loop.rst): on torch 1.12, whose function modes cannot be built,
    and, for ``indexing`` (an output reached by indexing a sample), where
    ``Tensor.__getitem__`` does not pass through function modes (torch 1.13
    and 2.0). Found out at run time; on torch >= 2.1 this marks nothing.
    """
    if not reference.function_modes():
        reason = "no torch function mode can be built here: out_dims=None judged by values"
    elif indexing and not reference.function_modes_see_indexing():
        reason = "indexing does not pass through torch function modes here: judged by values"
    else:
        return
    request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def _refused(call: Callable[[], Any]) -> None:
    with pytest.raises(ValueError, match=REFUSED):
        call()


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(OUT_NONE))
def test_out_dims_none_matches(request, loop, func_backend, name, batch, requires_grad, no_grad):
    f = OUT_NONE[name]
    x = _tensor(batch, 3, requires_grad=requires_grad)

    def run(backend: adbackends.Backend) -> Any:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            return backend.vmap(f, out_dims=None)(x)

    if name in DEPENDS:
        _judged_by_values(request, indexing=name in INDEXING)
    # torch.func of torch 2.0 fails on new_tensor with out_dims=None (an
    # internal RuntimeError, "DispatchKey FuncTorchBatched doesn't correspond
    # to a device"), a bug of that release: there, as on old functorch, the
    # loop is checked against what torch.func returns, one sample's output.
    no_reference = OLD_FUNCTORCH or (
        name == "new_tensor" and reference.vmap_breaks_on_new_tensor_with_out_dims_none()
    )
    if no_reference:
        if name in DEPENDS:
            _refused(lambda: run(loop))
            return
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            expected = f(x[0])
        assert_same_graphs(run(loop), expected)
        return
    try:
        expected = run(func_backend)
    except ValueError:
        same_error(lambda: run(loop), lambda: run(func_backend))
        return
    assert_same_graphs(run(loop), expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
@pytest.mark.parametrize("depends", [True, False])
def test_out_dims_none_for_other_dtypes(request, loop, func_backend, dtype, depends):
    x = _tensor(2, 3, dtype=dtype)
    if depends:
        _judged_by_values(request)

    def f(v):
        return v * 0 if depends else torch.zeros(3, dtype=v.dtype)

    def run(backend: adbackends.Backend) -> Any:
        return backend.vmap(f, out_dims=None)(x)

    if depends:
        if OLD_FUNCTORCH:
            _refused(lambda: run(loop))
        else:
            same_error(lambda: run(loop), lambda: run(func_backend))
    elif OLD_FUNCTORCH:
        assert_same_graphs(run(loop), f(x[0]))
    else:
        assert_same_graphs(run(loop), run(func_backend))


def _pair(a: torch.Tensor, b: torch.Tensor) -> Any:
    return a * b, b * 0


def _swapped(a: torch.Tensor, b: torch.Tensor) -> Any:
    return a * 0, a + b


def _joint(a: torch.Tensor, b: torch.Tensor) -> Any:
    return a.sum() * 0 + b.sum() * 0


@pytest.mark.parametrize(
    "f, in_dims, out_dims, refused",
    [
        (_pair, (0, None), (0, None), False),
        (_pair, (None, 0), (0, None), True),
        (_swapped, (0, 0), (None, 0), True),
        (_swapped, (None, 0), (None, 0), False),
        (_joint, (0, None), None, True),
        (_joint, (None, 0), None, True),
    ],
)
def test_out_dims_none_with_several_arguments(
    request, loop, func_backend, f, in_dims, out_dims, refused
):
    if refused:
        # Every refused output here is the same for every sample.
        _judged_by_values(request)
    a = _tensor(2, 3) if in_dims[0] == 0 else _tensor(3)
    b = _tensor(2, 3) if in_dims[1] == 0 else _tensor(3)

    def run(backend: adbackends.Backend) -> Any:
        return backend.vmap(f, in_dims=in_dims, out_dims=out_dims)(a, b)

    if OLD_FUNCTORCH:
        if refused:
            _refused(lambda: run(loop))
            return
        # The batched outputs from the reference with out_dim 0; the
        # unbatched one is that of a single sample.
        batched = func_backend.vmap(f, in_dims=in_dims, out_dims=0)(a, b)
        sample = f(*(t[0] if d == 0 else t for t, d in zip((a, b), in_dims)))
        expected = tuple(s if d is None else o for s, o, d in zip(sample, batched, out_dims))
        assert_same_graphs(run(loop), expected)
        return
    try:
        expected = run(func_backend)
    except ValueError:
        same_error(lambda: run(loop), lambda: run(func_backend))
        assert refused
        return
    assert not refused
    assert_same_graphs(run(loop), expected)


def _nested(backend: adbackends.Backend, f: Callable[..., Any]) -> Any:
    inner = backend.vmap(f, out_dims=None)
    return backend.vmap(inner)(_tensor(2, 3, 4))


def test_out_dims_none_in_nested_maps(request, loop, func_backend):
    # The inner output depends on the inner batch: refused.
    _judged_by_values(request)
    if OLD_FUNCTORCH:
        _refused(lambda: _nested(loop, lambda v: v * 0))
        return
    same_error(
        lambda: _nested(loop, lambda v: v * 0), lambda: _nested(func_backend, lambda v: v * 0)
    )


def test_out_dims_none_in_nested_maps_depending_on_the_outer_batch(loop, func_backend):
    # The inner output depends on the outer batch only: fine for the inner map,
    # which returns the constant as is; the outer one expands it.
    if OLD_FUNCTORCH:
        expected = func_backend.vmap(lambda v: _CONSTANT)(_tensor(2, 3, 4))
    else:
        expected = _nested(func_backend, lambda v: _CONSTANT)
    assert_same_graphs(_nested(loop, lambda v: _CONSTANT), expected)


def test_out_dims_none_through_a_gradient(request, loop, func_backend):
    _judged_by_values(request)
    x = _tensor(3, requires_grad=True)
    y = x.sin()

    def f(v):
        return torch.autograd.grad(y, x, v * 0, retain_graph=True)[0]

    seeds = _tensor(2, 3)
    if OLD_FUNCTORCH:
        _refused(lambda: loop.vmap(f, out_dims=None)(seeds))
        return
    same_error(
        lambda: loop.vmap(f, out_dims=None)(seeds),
        lambda: func_backend.vmap(f, out_dims=None)(seeds),
    )


# -- per-sample slices: in-place updates ------------------------------------------


def test_in_place_update_of_slices_matches(loop, func_backend):
    def run(backend: adbackends.Backend, make: Callable[[], torch.Tensor]) -> Any:
        x = make()
        out = backend.vmap(lambda v: v.mul_(2).add_(1))(x)
        return out, x

    plain = lambda: _tensor(4, 3)  # noqa: E731
    assert_same_graphs(run(loop, plain), run(func_backend, plain))
    leaf = _tensor(4, 3, requires_grad=True)
    non_leaf = lambda: leaf * 1  # noqa: E731
    assert_same_graphs(run(loop, non_leaf), run(func_backend, non_leaf))
    actual, expected = run(loop, non_leaf)[1], run(func_backend, non_leaf)[1]
    (g_actual,) = torch.autograd.grad(actual.sum(), leaf)
    (g_expected,) = torch.autograd.grad(expected.sum(), leaf)
    assert torch.allclose(g_actual, g_expected)


def test_in_place_update_with_a_requires_grad_operand_is_a_known_difference(loop, func_backend):
    # docs/loop.rst: slices of an input that does not require grad come from
    # one unbind; autograd refuses to rebase such a view's history.
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert func_backend.vmap(lambda v: v.mul_(w))(_tensor(3, 2)).requires_grad
    with pytest.raises(RuntimeError):
        loop.vmap(lambda v: v.mul_(w))(_tensor(3, 2))
