"""The backends on CUDA tensors: same results as on the CPU, on the same device.

These run only where a CUDA device is present; elsewhere they are skipped.
"""

from __future__ import annotations

import pytest
import torch

import adbackends
from adbackends.backends.loop import LoopBackend
from adbackends.plugin import PROBES

from .conftest import require

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(*shape):
    cpu = torch.randn(*shape, dtype=torch.float64)
    return cpu, cpu.cuda()


def test_jacrev_on_cuda_matches_cpu(backend):
    cpu, gpu = _pair(6)

    def f(x):
        return (x.sin() * x.roll(1)).cumsum(0)

    out = backend.jacrev(f)(gpu)
    assert out.device == gpu.device
    assert torch.allclose(out.cpu(), backend.jacrev(f)(cpu))


def test_hessian_on_cuda_matches_cpu(backend):
    require(backend, "higher_order")
    cpu, gpu = _pair(5)

    def f(x):
        return (x.exp() * x.cos()).sum()

    out = backend.jacrev(backend.jacrev(f))(gpu)
    assert out.device == gpu.device
    assert torch.allclose(out.cpu(), backend.jacrev(backend.jacrev(f))(cpu))


def test_vmap_of_jacrev_on_cuda_matches_cpu(backend):
    cpu, gpu = _pair(8, 4)
    out = backend.vmap(backend.jacrev(torch.tanh))(gpu)
    assert out.device == gpu.device
    assert torch.allclose(out.cpu(), torch.diag_embed(1 - cpu.tanh() ** 2))


def test_custom_function_on_cuda(backend):
    require(backend, "custom_function")
    from adbackends.probes import _cube_functions

    cube = _cube_functions()["modern"]
    cpu, gpu = _pair(3, 4)
    out = backend.vmap(backend.jacrev(cube))(gpu)
    assert out.device == gpu.device
    assert torch.allclose(out.cpu(), torch.diag_embed(3 * cpu**2))


def test_vmap_randomness_with_cuda_generator(backend):
    require(backend, "randomness")
    base = torch.zeros(6, device="cuda")

    def noisy(x):
        return x + torch.rand((), device="cuda")

    same = backend.vmap(noisy, randomness="same")(base)
    assert bool((same == same[0]).all())
    different = backend.vmap(noisy, randomness="different")(base)
    assert len(set(different.tolist())) == len(different)
    with pytest.raises(RuntimeError, match="randomness"):
        backend.vmap(noisy, randomness="error")(base)


def test_probes_restore_cuda_rng_state():
    torch.cuda.init()
    torch.cuda.manual_seed_all(7)
    before = torch.cuda.get_rng_state_all()
    caps = LoopBackend().capabilities()
    after = torch.cuda.get_rng_state_all()
    assert len(caps) == len(PROBES)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_differential_against_torch_func_on_cuda(reference):
    loop = adbackends.get("loop")
    _, gpu = _pair(4, 3)

    def f(x, y):
        return {"a": x @ y.T, "b": (x * y).sum(-1).exp()}

    for argnums in (0, 1, (0, 1)):
        expected = reference.jacrev(f, argnums=argnums)(gpu, gpu.flip(0))
        actual = loop.jacrev(f, argnums=argnums)(gpu, gpu.flip(0))
        for key in ("a", "b"):
            e, a = expected[key], actual[key]
            if isinstance(e, tuple):
                assert all(torch.allclose(x, y) and x.device == y.device for x, y in zip(e, a))
            else:
                assert torch.allclose(e, a) and a.device == e.device
