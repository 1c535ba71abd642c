"""Generated differential tests: the loop backend against torch.func.

Before torch 2.0 the reference is functorch instead (tests/reference.py).

Hypothesis draws small programs (chains of torch operations over one to
three arguments, some through a parameter that requires grad, some detached
or under ``no_grad``), pytree output structures, ``argnums``, ``has_aux``,
``chunk_size``, ``in_dims``/``out_dims`` (ints, negatives, ``None``, dict
prefixes), nestings of the transforms, and whether inputs require grad or the
call runs under ``no_grad``. Each case runs on both backends: either both
raise the same exception type, or the results agree in structure, shape,
dtype, ``requires_grad`` and value.

Profiles: ``default`` is small, for every test run; set
``ADBACKENDS_HYPOTHESIS_PROFILE=large`` for the on-demand run of more than
10,000 cases: 4 x 2,600 (``pytest tests/test_loop_hypothesis.py --hypothesis-show-statistics``).
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten  # noqa: E402

import adbackends  # noqa: E402

from . import reference as ref  # noqa: E402
from .test_loop_support import assert_same  # noqa: E402

# Profiles of this module only (named so that they leave hypothesis's global
# default, and other modules' tests, alone): "default" for every run, "large"
# on demand, picked with ADBACKENDS_HYPOTHESIS_PROFILE.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "adbackends-loop-default", max_examples=30, deadline=None, suppress_health_check=_HEALTH
)
settings.register_profile(
    "adbackends-loop-large", max_examples=2600, deadline=None, suppress_health_check=_HEALTH
)
_PROFILE = os.environ.get("ADBACKENDS_HYPOTHESIS_PROFILE", "default")
if _PROFILE not in ("default", "large"):
    raise ValueError(
        f"ADBACKENDS_HYPOTHESIS_PROFILE must be 'default' or 'large', got {_PROFILE!r}"
    )
loop_settings = settings.get_profile(f"adbackends-loop-{_PROFILE}")

Triple = collections.namedtuple("Triple", "a b c")

# A parameter the generated functions may close over.
_W = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)


def _no_grad_square(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        c = t * t
    return t - c


UNARY: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "square": lambda t: t * t,
    "exp": lambda t: (0.5 * t).exp(),
    "scale": lambda t: 1.5 * t,
    "softplus": torch.nn.functional.softplus,
    "cumsum": lambda t: t.cumsum(0) if t.dim() else t,
    "flip": lambda t: t.flip(0) if t.dim() else t,
    "sum": lambda t: t.sum(),
    "sum_last": lambda t: t.sum(-1) if t.dim() else t,
    "flatten": lambda t: t.reshape(-1),
    "unsqueeze": lambda t: t.unsqueeze(0),
    "transpose": lambda t: t.t() if t.dim() == 2 else t,
    "detach": lambda t: t.detach(),
    "no_grad": _no_grad_square,
    "closure": lambda t: t * _W,
    "cube": lambda t: t**3,
}


def _inplace(t: torch.Tensor) -> torch.Tensor:
    out = t * 1.0
    out.mul_(0.5).add_(0.25)
    return out


UNARY["inplace"] = _inplace

if hasattr(torch.autograd.Function, "setup_context"):

    class _Cube(torch.autograd.Function):
        """A setup_context-style Function with a differentiable backward."""

        generate_vmap_rule = True

        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return x**3

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    UNARY["function"] = _Cube.apply

UNARY_NAMES = sorted(UNARY)

# An expression: (argument index, unary chain, optional (other index, chain)).
Expr = Tuple[int, List[str], Any]


def _eval(expr: Expr, args: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    index, chain, other = expr
    out = args[index % len(args)]
    for name in chain:
        out = UNARY[name](out)
    if other is not None:
        o_index, o_chain = other
        mix = args[o_index % len(args)]
        for name in o_chain:
            mix = UNARY[name](mix)
        out = out * mix.sum()
    return out


def exprs(n_args: int) -> st.SearchStrategy[Expr]:
    chain = st.lists(st.sampled_from(UNARY_NAMES), max_size=3)
    index = st.integers(0, n_args - 1)
    return st.tuples(index, chain, st.none() | st.tuples(index, chain))


def structures(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Output structures: a leaf, or tuples, lists, dicts, namedtuples of them."""
    return st.one_of(
        leaf,
        st.tuples(leaf, leaf),
        st.lists(leaf, min_size=1, max_size=3),
        st.fixed_dictionaries({"y": leaf, "x": leaf}),
        st.builds(Triple, leaf, leaf, st.tuples(leaf)),
    )


def _depends(expr: Expr, batched: Tuple[bool, ...]) -> bool:
    """Whether the expression reads a batched argument."""
    index, _, other = expr
    n = len(batched)
    return batched[index % n] or (other is not None and batched[other[0] % n])


def _build(structure: Any, args: Tuple[Any, ...], leaf: Callable[..., Any] = _eval) -> Any:
    def again(node: Any) -> Any:
        return _build(node, args, leaf)

    if isinstance(structure, Triple):
        return Triple(*(again(s) for s in structure))
    if isinstance(structure, dict):
        return {k: again(v) for k, v in structure.items()}
    if isinstance(structure, list):
        return [again(s) for s in structure]
    if isinstance(structure, tuple) and len(structure) == 3 and isinstance(structure[0], int):
        return leaf(structure, args)
    return tuple(again(s) for s in structure)


shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)


def _tensor(shape: Tuple[int, ...], seed: int, requires_grad: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return t.requires_grad_(requires_grad)


def _outcome(call: Callable[[], Any]) -> Tuple[bool, Any]:
    try:
        return True, call()
    except Exception as exc:  # compared below
        return False, exc


def _functorch_internal_error(ok: bool, outcome: Any) -> bool:
    """functorch before torch 2.0 fails on some 0-dim samples with an internal
    error ("Could not allocate memory to change Tensor SizesAndStrides!") where
    torch.func and the loop compute the result: such cases have no reference."""
    return ref.OLD and not ok and "SizesAndStrides" in str(outcome)


def _compare(loop_call: Callable[[], Any], reference_call: Callable[[], Any]) -> None:
    ok_ref, expected = _outcome(reference_call)
    ok_loop, actual = _outcome(loop_call)
    assume(not _functorch_internal_error(ok_ref, expected))
    if not ok_ref and "expanded size" in str(expected):
        # torch.func cannot expand an unbatched output to out_dims != 0.
        assume(False)
    if not ok_ref:
        assert not ok_loop, f"torch.func raised {expected!r}, the loop returned {actual!r}"
        assert type(actual) is type(expected), f"loop {actual!r} vs torch.func {expected!r}"
        return
    if not ok_loop:
        raise actual
    assert_same(actual, expected, atol=1e-9, rtol=1e-7)


@pytest.fixture(scope="module")
def pair() -> Tuple[adbackends.Backend, adbackends.Backend]:
    from adbackends.registry import REGISTRY

    return REGISTRY.get("loop"), ref.backend()


def _argnums(draw: Any, n_args: int) -> Any:
    if draw(st.booleans()):
        return draw(st.integers(-n_args, n_args - 1))
    picks = draw(st.lists(st.integers(0, n_args - 1), min_size=1, max_size=n_args, unique=True))
    negate = draw(st.booleans())
    return tuple(p - n_args if negate and i == 0 else p for i, p in enumerate(picks))


@loop_settings
@given(data=st.data())
def test_jacrev(pair, data):
    loop, reference = pair
    n_args = data.draw(st.integers(1, 3), label="n_args")
    arg_shapes = data.draw(st.lists(shapes, min_size=n_args, max_size=n_args), label="shapes")
    requires_grad = data.draw(st.lists(st.booleans(), min_size=n_args, max_size=n_args))
    structure = data.draw(structures(exprs(n_args)), label="outputs")
    has_aux = data.draw(st.booleans(), label="has_aux")
    aux_structure = data.draw(structures(exprs(n_args)), label="aux") if has_aux else None
    packed = n_args >= 2 and data.draw(st.booleans(), label="dict argument")
    argnums = _argnums(data.draw, n_args - 1 if packed else n_args)
    chunk_size = data.draw(st.sampled_from([None, 1, 2, 5]), label="chunk_size")
    no_grad = data.draw(st.booleans(), label="outer no_grad")
    nesting = data.draw(
        st.sampled_from(["plain", "jacrev", "closure", "vmap", "vmap of jacrev"]), label="nesting"
    )
    args = tuple(
        _tensor(shape, i, rg) for i, (shape, rg) in enumerate(zip(arg_shapes, requires_grad))
    )

    def unpack(xs: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return (xs[0]["p"], xs[0]["q"], *xs[1:]) if packed else xs

    def pack(xs: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return ({"p": xs[0], "q": xs[1]}, *xs[2:]) if packed else xs

    def f(*xs):
        flat = unpack(xs)
        out = _build(structure, flat)
        return (out, _build(aux_structure, flat)) if has_aux else out

    def f_out(*xs):
        return f(*xs)[0] if has_aux else f(*xs)

    def run(b):
        call_args = pack(args)
        if nesting == "plain":
            return b.jacrev(f, argnums, has_aux=has_aux, chunk_size=chunk_size)(*call_args)
        if nesting == "jacrev":
            inner = b.jacrev(f, argnums, has_aux=has_aux, chunk_size=chunk_size)
            return b.jacrev(inner, argnums, has_aux=has_aux)(*call_args)
        if nesting == "closure":
            # The inner jacrev closes over the outer variables: no confusion.
            def g(*xs):
                def scaled(*ys):
                    return f_out(*tree_map(lambda y, x: y * x, ys, xs))

                return b.jacrev(scaled, argnums, chunk_size=chunk_size)(*xs)

            return b.jacrev(g, argnums)(*call_args)
        if nesting == "vmap":
            # jacrev of a vmap over a leading batch of 2 on every argument.
            batched = pack(tuple(torch.stack([a, 2 * a]) for a in args))
            return b.jacrev(b.vmap(f), argnums, has_aux=has_aux, chunk_size=chunk_size)(*batched)
        batched = pack(tuple(torch.stack([a, a.cos()]) for a in args))
        return b.vmap(b.jacrev(f, argnums, has_aux=has_aux, chunk_size=chunk_size))(*batched)

    with torch.set_grad_enabled(not no_grad):
        _compare(lambda: run(loop), lambda: run(reference))


@loop_settings
@given(data=st.data())
def test_vmap_over_autograd_grad(pair, data):
    """vmap of a function that calls torch.autograd.grad on a graph built outside."""
    loop, reference = pair
    shape = data.draw(shapes, label="shape")
    structure = data.draw(exprs(1), label="expression")
    batch = data.draw(st.integers(1, 4), label="batch")
    create_graph = data.draw(st.booleans(), label="create_graph")
    retain_graph = data.draw(st.sampled_from([None, False, True]), label="retain_graph")
    chunk_size = data.draw(st.sampled_from([None, 1, 2]), label="chunk_size")

    def run(b, chunk_size=chunk_size):
        x = _tensor(shape, 0, True)
        y = _eval(structure, (x,))
        assume(y.requires_grad)
        cotangents = _tensor((batch, *y.shape), 1, False)

        def vjp(v):
            return torch.autograd.grad(
                y, x, v, retain_graph=retain_graph, create_graph=create_graph
            )

        return b.vmap(vjp, chunk_size=chunk_size)(cotangents)

    # torch.func runs one backward per chunk, so with several chunks the first
    # frees the graph; the loop keeps it until the last sample, which gives
    # what an unchunked map gives.
    _compare(lambda: run(loop), lambda: run(reference, chunk_size=None))


def _in_dim(draw: Any, ndim: int) -> Any:
    """None, or a dim of a tensor with ``ndim`` dims (batch included), maybe negative."""
    if draw(st.integers(0, 3)) == 0:
        return None
    dim = draw(st.integers(0, ndim - 1))
    return dim - ndim if draw(st.booleans()) else dim


@loop_settings
@given(data=st.data())
def test_vmap(pair, data):
    loop, reference = pair
    n_args = data.draw(st.integers(1, 3), label="n_args")
    arg_shapes = data.draw(st.lists(shapes, min_size=n_args, max_size=n_args), label="shapes")
    batch = data.draw(st.integers(1, 3), label="batch")
    structure = data.draw(structures(exprs(n_args)), label="outputs")
    requires_grad = data.draw(st.booleans(), label="requires_grad")
    chunk_size = data.draw(st.sampled_from([None, 1, 2]), label="chunk_size")
    as_dict = n_args >= 2 and data.draw(st.booleans(), label="dict argument")
    nested = data.draw(st.booleans(), label="nested")
    bad_batch = data.draw(st.integers(0, 9), label="bad batch") == 0

    args: List[Any] = []
    dims: List[Any] = []
    for i, shape in enumerate(arg_shapes):
        dim = _in_dim(data.draw, len(shape) + 1)
        full = list(shape)
        if dim is not None:
            size = batch + 1 if bad_batch and i == n_args - 1 else batch
            full.insert(dim % (len(shape) + 1), size)
        args.append(_tensor(tuple(full), i, requires_grad))
        dims.append(dim)

    scale = data.draw(st.sampled_from([None, 0.5, "tensor"]), label="keyword argument")
    kwargs: Dict[str, Any] = {}
    if scale == "tensor":
        kwargs["scale"] = _tensor((), 9, requires_grad)
    elif scale is not None:
        kwargs["scale"] = scale

    def per_sample(*xs, scale=1.0):
        return tree_map(lambda t: t * scale, _build(structure, xs))

    # out_dims: drawn against the outputs' per-sample shapes.
    example = _outcome(lambda: per_sample(*(_sample(a, d) for a, d in zip(args, dims)), **kwargs))
    assume(example[0])
    leaves, spec = tree_flatten(example[1])
    # torch.func mis-shapes an output that does not depend on the batch when
    # its out_dim is not 0 (a garbage shape or a failed expand): keep those at 0.
    batched = [d is not None for d in dims]
    depends = tree_flatten(_build(structure, tuple(batched), leaf=_depends))[0]
    out_leaf_dims = [
        data.draw(st.integers(-(leaf.dim() + 1), leaf.dim()), label="out_dim") if dep else 0
        for leaf, dep in zip(leaves, depends)
    ]
    if len(set(out_leaf_dims)) <= 1 and data.draw(st.booleans()):
        out_dims: Any = out_leaf_dims[0] if out_leaf_dims else 0
    else:
        out_dims = tree_unflatten(out_leaf_dims, spec)

    if nested:
        # An outer map over a new leading dim of size 2 on the batched arguments.
        args = [a if d is None else torch.stack([a, 0.5 * a]) for a, d in zip(args, dims)]

    if as_dict:
        # The first two arguments travel together in a dict, with a dict prefix.
        def f(d, *rest, **kw):
            return per_sample(d["p"], d["q"], *rest, **kw)

        call_args: Tuple[Any, ...] = ({"p": args[0], "q": args[1]}, *args[2:])
        in_dims: Any = ({"p": dims[0], "q": dims[1]}, *dims[2:])
    else:
        f = per_sample
        call_args = tuple(args)
        in_dims = tuple(dims)
    if all(d == 0 for d in dims) and data.draw(st.booleans(), label="int in_dims"):
        in_dims = 0

    def run(b):
        inner = b.vmap(f, in_dims, out_dims, chunk_size=chunk_size)
        if not nested:
            return inner(*call_args, **kwargs)
        outer_dims = tree_map(lambda d: None if d is None else 0, in_dims)
        return b.vmap(inner, outer_dims)(*call_args, **kwargs)

    if all(d is None for d in dims) and ref.vmap_breaks_without_batched_input():
        # functorch 0.2.1 (torch 1.12) fails on a map with no batched input
        # with an IndexError of its own; the loop raises torch.func's error.
        with pytest.raises(ValueError, match="^" + re.escape(ref.NO_BATCHED_INPUT)):
            run(loop)
        return
    _compare(lambda: run(loop), lambda: run(reference))


def _sample(arg: torch.Tensor, dim: Any) -> torch.Tensor:
    return arg if dim is None else arg.select(dim, 0)


@loop_settings
@given(data=st.data())
def test_argument_errors(pair, data):
    """Random, often invalid, argnums / in_dims / out_dims / chunk_size."""
    loop, reference = pair
    x = _tensor((2, 3), 0, False)
    y = _tensor((3,), 1, False)
    which = data.draw(st.sampled_from(["jacrev", "vmap"]))
    value = st.one_of(
        st.none(),
        st.integers(-4, 4),
        st.floats(-2, 2),
        st.tuples(st.integers(-3, 3)),
        st.tuples(st.integers(-3, 3), st.integers(-3, 3)),
        st.tuples(st.integers(-3, 3), st.none()),
        st.lists(st.integers(-2, 2), max_size=2),
        st.just("0"),
    )
    if which == "jacrev":
        argnums = data.draw(value, label="argnums")
        chunk_size = data.draw(st.sampled_from([None, 0, -1, 1, 3]), label="chunk_size")

        def run(b):
            return b.jacrev(lambda a, c: (a * c).sin(), argnums, chunk_size=chunk_size)(x, y)

    else:
        in_dims = data.draw(value, label="in_dims")
        out_dims = data.draw(value, label="out_dims")

        # functorch before torch 2.0 refuses any None in out_dims before
        # anything else: no reference for the other errors of such a call.
        has_none = out_dims is None or (isinstance(out_dims, (tuple, list)) and None in out_dims)
        assume(not (ref.OLD and has_none))

        def run(b):
            return b.vmap(lambda a, c: a * c, in_dims, out_dims)(x, y)

    ok_ref, expected = _outcome(lambda: run(reference))
    ok_loop, actual = _outcome(lambda: run(loop))
    assume(not _functorch_internal_error(ok_ref, expected))
    assert ok_ref == ok_loop, f"torch.func: {expected!r}; loop: {actual!r}"
    if ok_ref:
        assert_same(actual, expected)
    else:
        assert type(actual) is type(expected), f"loop {actual!r} vs torch.func {expected!r}"
