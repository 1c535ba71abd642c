"""The survey: the transform family through the functorch backend against the loop backend.

Every case of ``tests/functorch_survey.py`` runs on both backends; none may
end in a silent difference (functorch returning another result than the
loop's) or in an error a chain ``functorch>loop`` would not send to the loop,
apart from the few listed in :data:`SHARED` that torch.func has as well.
Hypothesis then draws programs over the family (argnums with negatives and
tuples, has_aux, outer ``no_grad``/``enable_grad``, nestings, dtypes).

Each guard of :mod:`adbackends.backends._functorch_guards` is then tested by
itself: the raw functorch call shows the difference where this copy has it,
and the call through adbackends does not.

These run on every torch: on torch >= 2.0 the functorch backend runs
torch.func's implementation, and the survey checks that the guards stay out
of the way there. The deep run: ``ADBACKENDS_HYPOTHESIS_PROFILE=large``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

import adbackends
from adbackends.registry import REGISTRY

from . import functorch_survey as survey

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .test_loop_hypothesis import _build, _tensor, exprs, shapes, structures  # noqa: E402

TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
OLD = TORCH < (2, 0)

pytestmark = [
    pytest.mark.skipif(
        REGISTRY.failure("functorch") is not None, reason="functorch does not load here"
    ),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "adbackends-survey-default", max_examples=25, deadline=None, suppress_health_check=_HEALTH
)
settings.register_profile(
    "adbackends-survey-large", max_examples=5000, deadline=None, suppress_health_check=_HEALTH
)
_PROFILE = os.environ.get("ADBACKENDS_HYPOTHESIS_PROFILE", "default")
survey_settings = settings.get_profile(f"adbackends-survey-{_PROFILE}")

#: Cases where functorch and the loop disagree on every torch, torch.func
#: included: not old functorch's, and not silent wrong results of the
#: functorch backend. The verdict each gives, and why.
SHARED: Dict[str, Tuple[str, str]] = {
    "no_grad inside jacfwd": (
        "silent",
        "forward-mode AD ignores no_grad on every torch, so functorch and torch.func "
        "differentiate through the block; the loop's jacfwd (two reverse passes) does not",
    ),
    "jacfwd float32 0-dim times a number": (
        "silent",
        "forward-mode AD gives a float64 tangent for a float32 0-dim tensor times a Python "
        "number on every torch; the loop's jacfwd keeps float32",
    ),
    "jacfwd requires_grad of a linear in-place chain": (
        "silent",
        "jacfwd of an input that requires grad through a linear chain (an in-place one, or "
        "x * x.detach()): functorch and torch.func give a result that requires grad, the "
        "loop's does not",
    ),
    "hessian requires_grad of a zero block": (
        "silent",
        "hessian over two arguments of which one requires grad: functorch and torch.func "
        "mark the blocks of the other argument's row as requiring grad, the loop marks "
        "those of its column",
    ),
    "vmap zero batch of an input that requires grad": (
        "silent",
        "vmap over a batch of size 0: functorch and torch.func return a result that "
        "requires grad where the input does, the loop's (stacked from no samples) does not",
    ),
    "vmap identity under no_grad": (
        "silent",
        "vmap of a function that returns its input unchanged: functorch and torch.func "
        "return the input itself (so it requires grad, even under no_grad), the loop a "
        "new tensor",
    ),
    "vmap(jacrev) of an output without the input under no_grad": (
        "error",
        "under an outer no_grad, vmap of jacrev of an output that does not depend on the "
        "differentiated input: functorch and torch.func give zeros, the loop raises "
        "RuntimeError (element 0 of tensors does not require grad)",
    ),
    "hessian integer input": (
        "error",
        "functorch and torch.func raise RuntimeError (an integer tensor cannot require "
        "grad), the loop raises jvp's ValueError",
    ),
    "vmap in-place on unbatched": (
        "error",
        "functorch and torch.func cannot write a batched value into an unbatched tensor",
    ),
}


@pytest.fixture(scope="module")
def backends() -> Tuple[adbackends.Backend, adbackends.Backend]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return REGISTRY.get("functorch"), REGISTRY.get("loop")


@pytest.mark.parametrize("name", list(survey.CASES))
def test_case(backends, name):
    functorch, loop = backends
    verdict = survey.judge(survey.CASES[name], functorch, loop)
    if name in SHARED:
        expected, why = SHARED[name]
        assert verdict.kind == expected, f"{name}: expected {expected} ({why}), got {verdict}"
        return
    assert verdict.kind in ("same", "both raise", "refused"), f"{name}: {verdict}"


def test_refused_cases_run_on_the_loop_through_the_chain(backends):
    """Every refusal of the survey gives the loop's result through functorch>loop."""
    functorch, loop = backends
    chain = adbackends.get("functorch>loop")
    refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in survey.CASES.items():
            if name in SHARED or survey.judge(call, functorch, loop).kind != "refused":
                continue
            refused += 1
            assert survey.difference(call(chain), call(loop)) is None, name
    adbackends.forget_fallbacks()
    assert refused >= 1  # linearize at least, on every torch before 2.0


def test_judge_sees_each_kind_of_difference(backends):
    """The judge itself: a silent difference and an unrecognised error are caught."""
    functorch, loop = backends

    def differs(b: Any) -> Any:
        return torch.ones(2) * (2.0 if b is functorch else 1.0)

    def raises(b: Any) -> Any:
        if b is functorch:
            raise IndexError("not a refusal")
        return torch.ones(2)

    def refuses(b: Any) -> Any:
        if b is functorch:
            return b.linearize(torch.sin, torch.ones(2)) if OLD else b._refusal("x", "y")
        return torch.ones(2)

    def rg(b: Any) -> Any:
        return torch.ones(2, requires_grad=b is functorch)

    assert survey.judge(differs, functorch, loop).kind == "silent"
    assert survey.judge(rg, functorch, loop).kind == "silent"
    assert survey.judge(raises, functorch, loop).kind == "error"
    if OLD:
        assert survey.judge(refuses, functorch, loop).kind == "refused"
    assert survey.judge(lambda b: torch.ones(2), functorch, loop).kind == "same"


# -- generated ---------------------------------------------------------------------------


def _argnums(draw: Any, n_args: int) -> Any:
    if draw(st.booleans()):
        return draw(st.integers(-n_args, n_args - 1))
    picks = draw(st.lists(st.integers(0, n_args - 1), min_size=1, max_size=n_args, unique=True))
    return tuple(p - n_args if draw(st.booleans()) else p for p in picks)


_SCALAR = ("grad", "grad_and_value", "hessian")
_FORWARD = ("jacfwd", "jvp")


@survey_settings
@given(data=st.data())
def test_family(backends, data):
    functorch, loop = backends
    transform = data.draw(
        st.sampled_from(["jacrev", "jacfwd", "grad", "grad_and_value", "hessian", "vjp", "jvp"]),
        label="transform",
    )
    n_args = data.draw(st.integers(1, 3), label="n_args")
    arg_shapes = data.draw(st.lists(shapes, min_size=n_args, max_size=n_args), label="shapes")
    requires_grad = data.draw(st.lists(st.booleans(), min_size=n_args, max_size=n_args))
    forward = transform in _FORWARD
    # Forward-mode AD ignores no_grad on every torch (SHARED): not drawn for it.
    leaf = exprs(n_args).filter(lambda e: not forward or "no_grad" not in str(e))
    if transform in _SCALAR:
        structure = data.draw(leaf, label="output")
    else:
        structure = data.draw(structures(leaf), label="outputs")
    has_aux = transform != "hessian" and data.draw(st.booleans(), label="has_aux")
    aux = data.draw(structures(exprs(n_args)), label="aux") if has_aux else None
    argnums = _argnums(data.draw, n_args)
    mode = data.draw(st.sampled_from(["plain", "no_grad", "enable_grad"]), label="grad mode")
    nesting = data.draw(st.sampled_from(["plain", "vmap", "closure"]), label="nesting")
    # Forward-mode AD of a float32 0-dim tensor times a Python number gives a
    # float64 tangent on every torch (SHARED): float32 is drawn for reverse mode.
    dtypes = [torch.float64] if forward else [torch.float64, torch.float32]
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    args = tuple(
        _tensor(shape, i, False).to(dtype).requires_grad_(rg)
        for i, (shape, rg) in enumerate(zip(arg_shapes, requires_grad))
    )

    def body(*xs: Any) -> Any:
        out = _build(structure, xs)
        if transform in _SCALAR:
            out = out.sum()
        return (out, _build(aux, xs)) if has_aux else out

    def apply(b: Any, *xs: Any) -> Any:
        if transform == "vjp":
            result = b.vjp(body, *xs, has_aux=has_aux)
            cotangent = torch.utils._pytree.tree_map(torch.ones_like, result[0])
            return (result[0], result[1](cotangent), *result[2:])
        if transform == "jvp":
            tangents = tuple(x.detach().cos() for x in xs)
            return b.jvp(body, xs, tangents, has_aux=has_aux)
        if transform == "hessian":
            return b.hessian(body, argnums)(*xs)
        kwargs = {"has_aux": has_aux}
        return getattr(b, transform)(body, argnums, **kwargs)(*xs)

    def run(b: Any) -> Any:
        with {"plain": _nothing, "no_grad": torch.no_grad, "enable_grad": torch.enable_grad}[
            mode
        ]():
            if nesting == "vmap":
                batched = tuple(torch.stack([a, a * 0.5]) for a in args)
                return b.vmap(lambda *xs: apply(b, *xs))(*batched)
            if nesting == "closure":
                weight = _tensor((), 7, True).to(dtype)

                def scaled(*xs: Any) -> Any:
                    return apply(b, *(x * weight for x in xs))

                return scaled(*args)
            return apply(b, *args)

    tol: Dict[str, Any] = {"atol": 1e-4, "rtol": 1e-3} if dtype == torch.float32 else {}
    if forward or transform == "hessian":
        # Whether a forward-mode or Hessian result requires grad differs between
        # the loop and torch.func on every torch (SHARED): values, shapes,
        # dtypes and structure are compared.
        tol["requires_grad"] = False
    verdict = survey.judge(run, functorch, loop, **tol)
    assert verdict.kind in ("same", "both raise", "refused"), verdict


@survey_settings
@given(data=st.data())
def test_vmap_family(backends, data):
    """vmap over drawn in_dims/out_dims (None, negative), batch sizes from 0,
    chunk_size, outer maps, and vmap of a transform of the family."""
    functorch, loop = backends
    n_args = data.draw(st.integers(1, 3), label="n_args")
    arg_shapes = data.draw(st.lists(shapes, min_size=n_args, max_size=n_args), label="shapes")
    batch = data.draw(st.integers(0, 3), label="batch")
    structure = data.draw(structures(exprs(n_args)), label="outputs")
    requires_grad = data.draw(st.booleans(), label="requires_grad")
    chunk_size = data.draw(st.sampled_from([None, 1, 2]), label="chunk_size")
    inner = data.draw(st.sampled_from(["none", "jacrev", "grad", "vjp", "hessian"]), label="inner")
    outer = data.draw(st.booleans(), label="outer vmap")
    mode = data.draw(st.sampled_from(["plain", "no_grad"]), label="grad mode")
    args: List[Any] = []
    dims: List[Any] = []
    for i, shape in enumerate(arg_shapes):
        ndim = len(shape) + 1
        dim = None if data.draw(st.integers(0, 3)) == 0 else data.draw(st.integers(-ndim, ndim - 1))
        full = list(shape)
        if dim is not None:
            full.insert(dim % ndim, batch)
        args.append(_tensor(tuple(full), i, requires_grad))
        dims.append(dim)
    out_dims = data.draw(st.sampled_from([0, -1, 1]), label="out_dims") if inner == "none" else 0

    def per_sample(*xs: Any) -> Any:
        return _build(structure, xs)

    def scalar(*xs: Any) -> Any:
        return sum(t.sum() for t in torch.utils._pytree.tree_flatten(_build(structure, xs))[0])

    def run(b: Any) -> Any:
        if inner == "none":
            f: Callable[..., Any] = per_sample
        elif inner == "jacrev":
            f = b.jacrev(lambda *xs: per_sample(*xs), 0)
        elif inner == "grad":
            f = b.grad(scalar, 0)
        elif inner == "hessian":
            f = b.hessian(scalar, 0)
        else:

            def f(*xs: Any) -> Any:
                out, fn = b.vjp(scalar, *xs)
                return fn(torch.ones_like(out))

        mapped = b.vmap(f, tuple(dims), out_dims, chunk_size=chunk_size)
        with torch.no_grad() if mode == "no_grad" else _nothing():
            if outer:
                outer_args = [
                    a if d is None else torch.stack([a, 0.5 * a]) for a, d in zip(args, dims)
                ]
                outer_dims = tuple(None if d is None else 0 for d in dims)
                return b.vmap(mapped, outer_dims)(*outer_args)
            return mapped(*args)

    # The shared differences (SHARED): no requires_grad comparison for Hessians,
    # for a batch of size 0, or under no_grad (where functorch returns an input
    # the function returned unchanged as it is).
    tol: Dict[str, Any] = {"requires_grad": inner != "hessian" and batch > 0 and mode == "plain"}
    verdict = survey.judge(run, functorch, loop, **tol)
    if verdict.kind == "error" and _LOOP_NO_GRAPH in verdict.detail:
        return  # the loop's own failure, on every torch (SHARED)
    assert verdict.kind in ("same", "both raise", "refused"), verdict


#: The loop's error where torch.func returns zeros (SHARED).
_LOOP_NO_GRAPH = "does not require grad and does not have a grad_fn"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# -- each guard by itself ----------------------------------------------------------------


def _raw(name: str) -> Callable[..., Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import functorch

    return getattr(functorch, name)  # type: ignore[no-any-return]


def _raises(call: Callable[[], Any]) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
    except Exception as exc:
        return exc
    return None


Z = torch.complex(torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.25])).to(torch.complex128)


@pytest.mark.parametrize("api", ["jacrev", "jacfwd", "hessian"])
def test_complex_inputs_raise_torch_funcs_error(backends, api):
    functorch, loop = backends
    f = (lambda z: (z * z.conj()).real.sum()) if api == "hessian" else (lambda z: z * z)
    raw = _raises(lambda: _raw(api)(f)(Z))
    assert functorch._complex_guard == (raw is None)
    if raw is None:
        # What the guard stops: old functorch returns a Jacobian, jacrev's the
        # conjugate of jacfwd's, where torch.func raises.
        assert not torch.equal(
            _raw("jacrev")(lambda z: z * z)(Z), _raw("jacfwd")(lambda z: z * z)(Z)
        )
    with pytest.raises(RuntimeError, match="Expected all inputs to be real") as got:
        getattr(functorch, api)(f)(Z)
    with pytest.raises(RuntimeError, match="Expected all inputs to be real") as expected:
        getattr(loop, api)(f)(Z)
    if api != "hessian":  # hessian's names the inner transform, which may differ
        assert str(got.value) == str(expected.value)
    # As torch.func: complex arguments that are not differentiated are refused
    # too, and so are complex outputs of real inputs; real ones are untouched.
    x = torch.tensor([0.5, 2.0], dtype=torch.float64)
    if api == "hessian":
        g: Callable[..., Any] = lambda x, z: (x * x).sum() * z.abs().sum()  # noqa: E731
        h: Callable[..., Any] = lambda x: (x * (1 + 1j)).abs().sum()  # noqa: E731
    else:
        g = lambda x, z: x * z.abs()  # noqa: E731
        h = lambda x: x * (1 + 1j)  # noqa: E731
    for nums in (0, -2):
        verdict = survey.judge(lambda b, n=nums: getattr(b, api)(g, n)(x, Z), functorch, loop)
        assert verdict.kind == "both raise", verdict
    assert survey.judge(lambda b: getattr(b, api)(h)(x), functorch, loop).kind in (
        "same",
        "both raise",
    )
    assert survey.judge(lambda b: getattr(b, api)(g, 0)(x, Z.abs()), functorch, loop).kind == "same"


@pytest.mark.parametrize("where", ["primal", "tangent"])
def test_integer_jvp_raises_torch_funcs_error(backends, where):
    functorch, loop = backends
    n = torch.ones(2, dtype=torch.long)
    x = torch.ones(2, dtype=torch.float64)
    primals, tangents = ((n,), (x,)) if where == "primal" else ((x,), (n,))
    raw = _raises(lambda: _raw("jvp")(lambda v: v * 2, primals, tangents))
    if raw is None:
        assert functorch._integer_guard  # functorch 0.2.1
    with pytest.raises(ValueError, match=f"Expected {where} to be floating point") as got:
        functorch.jvp(lambda v: v * 2, primals, tangents)
    with pytest.raises(ValueError) as expected:
        loop.jvp(lambda v: v * 2, primals, tangents)
    assert str(got.value) == str(expected.value)


def test_integer_jacfwd_raises_torch_funcs_error(backends):
    functorch, loop = backends
    n = torch.arange(3)
    raw = _raises(lambda: _raw("jacfwd")(lambda v: v * 2.0)(n))
    assert (raw is None) <= functorch._integer_guard
    for argnums in (0, -1, (0,)):
        with pytest.raises(ValueError, match="Expected primal to be floating point"):
            functorch.jacfwd(lambda v: v * 2.0, argnums)(n)
        with pytest.raises(ValueError, match="Expected primal to be floating point"):
            loop.jacfwd(lambda v: v * 2.0, argnums)(n)
    # An integer argument that is not differentiated is allowed.
    x = torch.ones(3, dtype=torch.float64)
    got = functorch.jacfwd(lambda v, k: v * k, 0)(x, n)
    assert survey.difference(got, loop.jacfwd(lambda v, k: v * k, 0)(x, n)) is None


def test_vmap_without_batched_input_raises_torch_funcs_error(backends):
    functorch, loop = backends
    x = torch.ones(3)
    raw = _raises(lambda: _raw("vmap")(torch.sin, (None,))(x))
    assert raw is not None  # every copy fails; functorch 0.2.1 with an IndexError
    with pytest.raises(ValueError, match="Expected at least one Tensor to vmap over"):
        functorch.vmap(torch.sin, (None,))(x)
    with pytest.raises(ValueError, match="Expected at least one Tensor to vmap over"):
        loop.vmap(torch.sin, (None,))(x)
    # An IndexError of the function itself is the function's own.
    with pytest.raises(IndexError, match="mine"):
        functorch.vmap(_index_error)(torch.ones(2, 3))


def _summed(x: Any) -> Any:
    return x.sin() + x.sum()


def _index_error(v: Any) -> Any:
    raise IndexError("mine")


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.vmap(_summed)(torch.ones(0, 3)),
        lambda b: b.vmap(survey._vector, (0, None))(torch.ones(0, 3), torch.ones(3)),
        lambda b: b.vmap(b.jacrev(_summed))(torch.ones(0, 3)),
        lambda b: b.vmap(_summed, chunk_size=2)(torch.ones(0, 3)),
    ],
    ids=["plain", "in_dims None", "vmap(jacrev)", "chunk_size"],
)
def test_zero_size_batch_is_refused_and_the_chain_maps_it(backends, call):
    functorch, loop = backends
    with pytest.raises(adbackends.CapabilityError, match="batch of size 0") as refused:
        call(functorch)
    assert functorch.cannot_transform(refused.value) is not None
    expected = call(loop)
    with pytest.warns(adbackends.FallbackWarning, match="batch of size 0"):
        got = call(adbackends.get("functorch>loop"))
    assert survey.difference(got, expected) is None
    adbackends.forget_fallbacks()


@pytest.mark.parametrize(
    "f, out_dims",
    [
        (lambda x: survey.Y.sum() * 3, -1),  # a 0-dim output: old functorch crashes
        (lambda x: survey.Y * 3, 1),
        (lambda x: (x * 2, survey.Y * 3), (0, 1)),
        (lambda x: (x * 2, survey.Y * 3), -1),
    ],
    ids=["0-dim at -1", "at 1", "one of two at 1", "both at -1"],
)
def test_unbatched_output_at_nonzero_out_dims_is_refused(backends, f, out_dims):
    functorch, loop = backends
    xs = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(adbackends.CapabilityError, match="does not depend on the batch") as got:
        functorch.vmap(f, out_dims=out_dims)(xs)
    assert functorch.cannot_transform(got.value) is not None
    expected = loop.vmap(f, out_dims=out_dims)(xs)
    with pytest.warns(adbackends.FallbackWarning, match="does not depend on the batch"):
        result = adbackends.get("functorch>loop").vmap(f, out_dims=out_dims)(xs)
    assert survey.difference(result, expected) is None
    adbackends.forget_fallbacks()
    # Batched outputs at any out_dims stay native, and nested maps too.
    assert (
        survey.difference(
            functorch.vmap(lambda x: x * 2, out_dims=-1)(xs),
            loop.vmap(lambda x: x * 2, out_dims=-1)(xs),
        )
        is None
    )
    nested = functorch.vmap(functorch.vmap(lambda x: x.sin(), out_dims=1))(xs[None].expand(2, 4, 3))
    assert nested.shape == (2, 3, 4)


@pytest.mark.parametrize("out_dims", [None, (0, None)])
def test_out_dims_none_is_refused_where_functorch_lacks_it(backends, out_dims):
    functorch, loop = backends
    y = torch.arange(3.0)

    def f(x: Any) -> Any:
        return (x * 2, y * 3) if isinstance(out_dims, tuple) else y * 3

    xs = torch.ones(4, 3)
    raw = _raises(lambda: _raw("vmap")(f, out_dims=out_dims)(xs))
    assert functorch._none_out_dims_guard == isinstance(raw, ValueError)
    expected = loop.vmap(f, out_dims=out_dims)(xs)
    if functorch._none_out_dims_guard:
        with pytest.raises(adbackends.CapabilityError, match="out_dims=None") as refused:
            functorch.vmap(f, out_dims=out_dims)
        assert functorch.cannot_transform(refused.value) is not None
    else:
        assert survey.difference(functorch.vmap(f, out_dims=out_dims)(xs), expected) is None
    got = adbackends.get("functorch>loop").vmap(f, out_dims=out_dims)(xs)
    assert survey.difference(got, expected) is None


@pytest.mark.parametrize("api", ["jacrev", "jacfwd", "hessian", "grad"])
def test_negative_argnums_are_counted_from_the_front(backends, api):
    functorch, loop = backends
    x = torch.tensor([0.5, -1.0], dtype=torch.float64)
    y = torch.tensor([2.0, 0.25], dtype=torch.float64)
    f = survey._scalar if api in ("hessian", "grad") else survey._vector
    raw = _raw(api)(f, -1)(x, y)
    right = _raw(api)(f, 1)(x, y)
    if not torch.allclose(raw, right):
        assert not raw.any()  # the old functorch's zeros, which the backend avoids
    for nums in (-1, (-2, -1), (0, -1)):
        assert (
            survey.difference(
                getattr(functorch, api)(f, nums)(x, y), getattr(loop, api)(f, nums)(x, y)
            )
            is None
        )
