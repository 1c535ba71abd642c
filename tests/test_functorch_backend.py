"""The functorch backend: old copies' gaps filled or refused, and functorch's own facts.

These run on every torch in the matrix. Where this torch's functorch has the
argument natively, the emulation used for older copies is still exercised
(directly) and compared with the native result, so it is tested everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten

import adbackends
from adbackends.backends import _functorch_chunks as chunks
from adbackends.registry import REGISTRY

TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
HAS_TORCH_FUNC = TORCH >= (2, 0)

pytestmark = pytest.mark.skipif(
    REGISTRY.failure("functorch") is not None,
    reason="functorch does not load here (covered by test_compat)",
)


@pytest.fixture
def ft() -> adbackends.Backend:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return REGISTRY.get("functorch")


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _same(a, b, exact: bool = True) -> None:
    """Equal pytrees of tensors: same structure, shapes, dtypes and values."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    assert sa == sb
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        if exact:
            assert torch.equal(x, y)
        else:
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)


def _two_outputs(a, b):
    return a.sin() * b.sum(), {"outer": a.outer(b), "sq": (b**2).exp()}


# -- jacrev(chunk_size=...) -----------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 11, 12, 100])
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0), -1])
def test_chunked_jacrev_equals_unchunked(ft, chunk_size, argnums):
    x = torch.randn(4, dtype=torch.float64)
    y = torch.randn(2, dtype=torch.float64)
    expected = ft.jacrev(_two_outputs, argnums)(x, y)
    got = ft.jacrev(_two_outputs, argnums, chunk_size=chunk_size)(x, y)
    _same(got, expected, exact=False)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_jacrev_with_aux_and_pytree_argument(ft, chunk_size):
    pair = (torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64))

    def f(p, scale):
        a, m = p
        out = (m @ a[:2]) * scale + a[2]
        return out, {"norm": out.norm()}

    scale = torch.tensor(1.5, dtype=torch.float64)
    jac, aux = ft.jacrev(f, has_aux=True, chunk_size=chunk_size)(pair, scale)
    ref_jac, ref_aux = ft.jacrev(f, has_aux=True)(pair, scale)
    _same(jac, ref_jac, exact=False)
    _same(aux, ref_aux)
    assert isinstance(jac, tuple) and jac[0].shape == (2, 3) and jac[1].shape == (2, 2, 2)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 7])
@pytest.mark.parametrize("argnums", [0, (0, 1)])
def test_emulated_jacrev_matches_functorch(ft, chunk_size, argnums):
    """The emulation itself, against functorch's unchunked jacrev on this torch."""
    x = torch.randn(4, dtype=torch.float64)
    y = torch.randn(2, dtype=torch.float64)
    emulated = chunks.chunked_jacrev(ft._vjp, ft._vmap, _two_outputs, argnums, False, chunk_size)
    _same(emulated(x, y), ft._jacrev(_two_outputs, argnums)(x, y), exact=False)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 50])
def test_emulated_jacrev_is_identical_to_native_chunking(ft, chunk_size):
    if "chunk_size" not in ft._jacrev_params:
        pytest.skip(f"functorch {ft.version} has no native jacrev(chunk_size=...)")
    x = torch.randn(5, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    emulated = chunks.chunked_jacrev(ft._vjp, ft._vmap, _two_outputs, (0, 1), False, chunk_size)
    native = ft._jacrev(_two_outputs, (0, 1), chunk_size=chunk_size)
    _same(emulated(x, y), native(x, y), exact=True)


def test_chunked_jacrev_composes(ft):
    x = torch.randn(3, 4, dtype=torch.float64)
    batched = ft.vmap(ft.jacrev(torch.sin, chunk_size=2))(x)
    assert torch.allclose(batched, torch.diag_embed(x.cos()))
    hessian = ft.jacrev(ft.jacrev(lambda t: t.sin().sum(), chunk_size=1), chunk_size=2)(x[0])
    assert torch.allclose(hessian, torch.diag(-x[0].sin()))


@pytest.mark.parametrize("bad", [0, -1])
def test_jacrev_rejects_bad_chunk_size_like_torch_func(ft, bad):
    with pytest.raises(ValueError, match="chunk_size"):
        ft.jacrev(torch.sin, chunk_size=bad)(torch.ones(2))


def test_emulated_jacrev_rejects_bad_argnums_like_torch_func(ft):
    emulated = chunks.chunked_jacrev(ft._vjp, ft._vmap, torch.add, 2, False, 1)
    with pytest.raises(RuntimeError, match="argnum=2, but only 2 positional inputs"):
        emulated(torch.ones(2), torch.ones(2))
    emulated = chunks.chunked_jacrev(ft._vjp, ft._vmap, torch.add, (0, 0), False, 1)
    with pytest.raises(RuntimeError, match="unique"):
        emulated(torch.ones(2), torch.ones(2))


# -- vmap(chunk_size=...) ----------------------------------------------------------


def _mixed(a, b, scale=1.0):
    return a * b.sum() * scale, a.sum(0)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 10])
def test_chunked_vmap_equals_unchunked(ft, chunk_size):
    xs = torch.randn(4, 7, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    expected = ft.vmap(_mixed, in_dims=(1, None), out_dims=(1, 0))(xs, y, scale=2.0)
    got = ft.vmap(_mixed, in_dims=(1, None), out_dims=(1, 0), chunk_size=chunk_size)(
        xs, y, scale=2.0
    )
    _same(got, expected)


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunked_vmap_nested_in_dims(ft, chunk_size):
    data = {"a": torch.randn(5, 2), "b": (torch.randn(3, 5), torch.randn(4))}

    def f(d):
        return d["a"].sum() + d["b"][0].sum() * d["b"][1]

    in_dims = ({"a": 0, "b": (1, None)},)
    expected = ft.vmap(f, in_dims=in_dims)(data)
    _same(ft.vmap(f, in_dims=in_dims, chunk_size=chunk_size)(data), expected)


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_emulated_vmap_randomness_is_identical_to_native_chunking(ft, randomness):
    if "chunk_size" not in ft._vmap_params:
        pytest.skip(f"functorch {ft.version} has no native vmap(chunk_size=...)")
    xs = torch.zeros(7, 2)

    def noisy(a):
        return a + torch.rand(())

    torch.manual_seed(3)
    native = ft._vmap(noisy, randomness=randomness, chunk_size=3)(xs)
    torch.manual_seed(3)

    def vmap(func, in_dims, out_dims):
        return ft._vmap(func, in_dims, out_dims, randomness=randomness)

    emulated = chunks.chunked_vmap(vmap, noisy, 0, 0, randomness, 3)(xs)
    assert torch.equal(emulated, native)
    if randomness == "same":
        assert len(set(emulated[:, 0].tolist())) == 1


@pytest.mark.parametrize("chunk_size", [1, 2, 4])
def test_emulated_vmap_matches_functorch(ft, chunk_size):
    xs = torch.randn(4, 7, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    emulated = chunks.chunked_vmap(ft._vmap, _mixed, (1, None), (1, 0), "error", chunk_size)
    _same(emulated(xs, y, scale=3.0), ft._vmap(_mixed, (1, None), (1, 0))(xs, y, scale=3.0))


def test_emulated_vmap_passes_bad_input_to_vmap(ft):
    emulated = chunks.chunked_vmap(ft._vmap, torch.add, 0, 0, "error", 2)
    with pytest.raises(ValueError):
        emulated(torch.ones(3), torch.ones(4))  # mismatched batch sizes: vmap's error


@pytest.mark.parametrize("bad", [0, -2])
def test_vmap_rejects_bad_chunk_size(ft, bad):
    with pytest.raises(ValueError, match="chunk_size"):
        ft.vmap(torch.sin, chunk_size=bad)(torch.ones(2, 2))


# -- a missing argument is refused, never dropped --------------------------------


def test_missing_randomness_raises_capability_error(ft, monkeypatch):
    """A functorch whose vmap has no randomness (before 0.2) refuses to drop it."""
    monkeypatch.setattr(ft, "_vmap_params", frozenset({"func", "in_dims", "out_dims"}))
    with pytest.raises(adbackends.CapabilityError) as info:
        ft.vmap(torch.sin, randomness="same")
    err = info.value
    assert err.capability == "randomness"
    assert ft.version in str(err) and "randomness" in str(err)
    assert "functorch" not in err.alternatives
    assert ("loop" in err.alternatives) == bool(adbackends.get("loop").supports("randomness"))
    # The default needs nothing, so it works and is simply not passed on.
    assert ft.vmap(torch.sin)(torch.zeros(2, 3)).shape == (2, 3)


def test_missing_preallocate_raises_capability_error(ft, monkeypatch):
    monkeypatch.setattr(ft, "_jacrev_params", frozenset({"func", "argnums", "has_aux"}))
    with pytest.raises(adbackends.CapabilityError, match="_preallocate_and_copy"):
        ft.jacrev(torch.sin, chunk_size=2, _preallocate_and_copy=True)


def test_chunk_size_is_emulated_when_missing(ft, monkeypatch):
    """Without native chunk_size the emulation runs: same answer, never an ignored argument."""
    calls = []
    real_vmap = ft._vmap

    def counting_vmap(*args, **kwargs):
        calls.append(1)
        return real_vmap(*args, **kwargs)

    monkeypatch.setattr(ft, "_jacrev_params", frozenset({"func", "argnums", "has_aux"}))
    monkeypatch.setattr(ft, "_vmap", counting_vmap)
    x = torch.randn(5, dtype=torch.float64)
    jac = ft.jacrev(torch.sin, chunk_size=2)(x)
    assert torch.allclose(jac, torch.diag(x.cos()))
    assert len(calls) == 3  # rows 0-1, 2-3, 4: one vmap per chunk


# -- custom autograd.Function facts ---------------------------------------------


def _legacy_cube():
    class LegacyCube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    return LegacyCube


def _modern_cube(vmap_rule: str):
    class Cube(torch.autograd.Function):
        generate_vmap_rule = vmap_rule == "generate"

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

    if vmap_rule == "explicit":

        def vmap(info, in_dims, x):
            return Cube.apply(x), in_dims[0]

        Cube.vmap = staticmethod(vmap)
    return Cube


@pytest.mark.skipif(HAS_TORCH_FUNC, reason="torch >= 2.0 accepts setup_context Functions")
@pytest.mark.parametrize("transform", ["jacrev", "vmap", "grad"])
def test_old_functorch_refuses_every_function_even_on_unrelated_tensors(ft, transform):
    legacy = _legacy_cube()
    constant = torch.tensor([2.0])

    def f(x):
        return x.sin().sum() + legacy.apply(constant).sum()  # x never meets the Function

    api = getattr(ft._module, transform)
    with pytest.raises(RuntimeError):
        api(f)(torch.ones(3) if transform != "vmap" else torch.ones(2, 3))
    assert not ft.supports("custom_function")
    assert not ft.supports("legacy_function")


@pytest.mark.skipif(HAS_TORCH_FUNC, reason="torch >= 2.0 accepts setup_context Functions")
def test_old_functorch_refusal_is_a_capability_error_naming_loop(ft):
    legacy = _legacy_cube()
    with pytest.raises(adbackends.CapabilityError) as info:
        ft.jacrev(legacy.apply)(torch.ones(3))
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.capability == "custom_function"
    assert ft.version in str(err) and torch.__version__ in str(err)
    assert "loop" in err.alternatives
    # The loop backend computes it.
    jac = adbackends.get("loop").jacrev(legacy.apply)(torch.ones(3))
    assert torch.allclose(jac, torch.diag(torch.full((3,), 3.0)))


@pytest.mark.skipif(not HAS_TORCH_FUNC, reason="setup_context arrived in torch 2.0")
@pytest.mark.parametrize("name", ["torch.func", "functorch"])
def test_setup_context_function_needs_a_vmap_rule(name):
    backend = REGISTRY.get(name)
    xs = torch.tensor([[0.5, -1.0], [2.0, 1.5]], dtype=torch.float64)
    for rule in ("explicit", "generate"):
        cube = _modern_cube(rule)
        assert torch.allclose(backend.vmap(cube.apply)(xs), xs**3)
        jac = backend.vmap(backend.jacrev(cube.apply))(xs)
        assert torch.allclose(jac, torch.diag_embed(3 * xs**2))
    bare = _modern_cube("none")
    assert torch.allclose(backend.jacrev(bare.apply)(xs[0]), torch.diag(3 * xs[0] ** 2))
    with pytest.raises(RuntimeError, match="vmap"):
        backend.vmap(bare.apply)(xs)


@pytest.mark.skipif(not HAS_TORCH_FUNC, reason="torch.func arrived in torch 2.0")
@pytest.mark.parametrize("transform", ["jacrev", "vmap", "grad", "jacfwd", "hessian"])
def test_ctx_style_function_raises_under_every_torch_func_transform(transform):
    import torch.func

    legacy = _legacy_cube()
    api = getattr(torch.func, transform)
    x = torch.ones(2, 3) if transform == "vmap" else torch.ones(3)
    with pytest.raises(RuntimeError, match="setup_context"):
        api(
            lambda t: legacy.apply(t).sum() if transform in ("grad", "hessian") else legacy.apply(t)
        )(x)


@pytest.mark.skipif(not HAS_TORCH_FUNC, reason="torch.func arrived in torch 2.0")
def test_ctx_style_refusal_is_a_capability_error(ft):
    legacy = _legacy_cube()
    with pytest.raises(adbackends.CapabilityError) as info:
        ft.vmap(legacy.apply)(torch.ones(2, 3))
    assert info.value.capability == "legacy_function"
    assert "loop" in info.value.alternatives


def test_user_errors_are_not_rewritten(ft):
    def bad(x):
        raise RuntimeError("something unrelated")

    with pytest.raises(RuntimeError, match="something unrelated") as info:
        ft.jacrev(bad)(torch.ones(2))
    assert not isinstance(info.value, adbackends.CapabilityError)


# -- loading and the deprecation notice ----------------------------------------


def test_found_by_import():
    import functorch

    backend = REGISTRY.get("functorch")
    assert backend._module is functorch
    assert backend.version == str(getattr(functorch, "__version__", backend.version))


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TAD_AD_BACKEND", None)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_deprecation_warning_at_most_once_per_process():
    result = _run(
        """
        import warnings
        warnings.simplefilter("always")
        import torch, adbackends
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ft = adbackends.get("functorch")
            x = torch.ones(3)
            for _ in range(3):
                ft.jacrev(torch.sin)(x)
                ft.vmap(torch.sin)(torch.ones(2, 3))
                ft.jacrev(torch.sin, chunk_size=1)(x)
                adbackends.fjacrev(torch.sin)(x)
            with adbackends.using("functorch"):
                adbackends.jacrev(torch.sin)(x)
                adbackends.vmap(torch.sin)(torch.ones(2, 3))
        ours = [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))
                and "functorch" in str(w.message)]
        print(len(ours))
        """
    )
    assert result.returncode == 0, result.stderr
    count = int(result.stdout.strip().splitlines()[-1])
    if HAS_TORCH_FUNC:
        assert count == 1
    else:
        assert count == 0


def test_probes_do_not_spend_the_one_deprecation_warning():
    """The report probes functorch first; the user's own first call still warns once."""
    result = _run(
        """
        import warnings
        import torch, adbackends
        from adbackends.cli import report
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            report()  # runs every probe of every backend
            during_probes = len(seen)
            x = torch.ones(3)
            for _ in range(2):
                adbackends.get("functorch").jacrev(torch.sin)(x)
        ours = [w for w in seen if "functorch" in str(w.message)]
        print(during_probes, len(ours))
        """
    )
    assert result.returncode == 0, result.stderr
    during, total = map(int, result.stdout.strip().splitlines()[-1].split())
    assert during == 0
    assert total == (1 if HAS_TORCH_FUNC else 0)


@pytest.mark.parametrize("argnums", [-1, (0, -1), (-2,)])
def test_negative_argnums_count_from_the_end(ft, argnums):
    """functorch 0.2.1's own jacrev returns zeros here; the backend must not."""
    x = torch.randn(3, dtype=torch.float64)
    y = torch.randn(2, dtype=torch.float64)

    def f(a, b):
        return a.sin() * b.sum()

    positive = tuple(n % 2 for n in argnums) if isinstance(argnums, tuple) else argnums % 2
    _same(ft.jacrev(f, argnums)(x, y), ft.jacrev(f, positive)(x, y))
    loop = adbackends.get("loop").jacrev(f, positive)(x, y)
    _same(ft.jacrev(f, argnums)(x, y), loop, exact=False)
