"""The loop backend on a CUDA device: results, devices and CUDA random state.

Skipped where no CUDA device is present. The loop must keep every result on
the input's device, cache its one-hot rows per device, and handle vmap's
randomness modes with the CUDA generator as it does with the CPU one.
"""

from __future__ import annotations

import pytest
import torch

import adbackends

from .test_loop_support import assert_same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.fixture
def loop():
    return adbackends.get("loop")


@pytest.fixture
def cuda():
    return torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transforms_match_torch_func(loop, reference, cuda, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, device=cuda, dtype=dtype)
    xs = torch.randn(3, 4, device=cuda, dtype=dtype)
    w = torch.randn(4, device=cuda, dtype=dtype, requires_grad=True)

    def f(t):
        return (t.sin() * w).cumsum(0) * t.sum()

    for build in (
        lambda b: b.jacrev(f)(x),
        lambda b: b.jacrev(f, chunk_size=3)(x),
        lambda b: b.jacrev(b.jacrev(lambda t: f(t).sum()))(x),
        lambda b: b.vmap(f)(xs),
        lambda b: b.vmap(b.jacrev(f))(xs),
        lambda b: b.jacrev(b.vmap(f), chunk_size=5)(xs),
        lambda b: b.vmap(f, in_dims=1, out_dims=-1)(xs.t()),
    ):
        actual = build(loop)
        assert actual.device.type == "cuda"
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert_same(actual, build(reference), atol=tol, rtol=tol)


def test_cpu_and_cuda_rows_do_not_mix(loop, cuda):
    x_cpu = torch.arange(3.0)
    x_cuda = x_cpu.to(cuda)
    a = loop.jacrev(torch.sin)(x_cpu)
    b = loop.jacrev(torch.sin)(x_cuda)
    assert a.device.type == "cpu" and b.device.type == "cuda"
    assert torch.allclose(a, b.cpu())


def test_randomness_with_the_cuda_generator(loop, reference, cuda):
    base = torch.zeros(4, 3, device=cuda)

    def noisy(t):
        return t + torch.rand(3, device=cuda)

    torch.cuda.manual_seed(7)
    same = loop.vmap(noisy, randomness="same")(base)
    after_loop = torch.rand(2, device=cuda)
    torch.cuda.manual_seed(7)
    expected = reference.vmap(noisy, randomness="same")(base)
    after_reference = torch.rand(2, device=cuda)
    assert torch.equal(same, expected)
    assert torch.equal(after_loop, after_reference)

    different = loop.vmap(noisy, randomness="different")(base)
    assert len({tuple(row.tolist()) for row in different}) == 4

    state = torch.cuda.get_rng_state()
    with pytest.raises(RuntimeError, match="randomness error mode"):
        loop.vmap(noisy)(base)
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_vmap_over_autograd_grad_on_cuda(loop, reference, cuda):
    x = torch.randn(5, device=cuda, dtype=torch.float64, requires_grad=True)

    def run(b):
        y = x.tanh() * x.sum()
        return b.vmap(lambda v: torch.autograd.grad(y, x, v))(
            torch.eye(5, device=cuda, dtype=torch.float64)
        )

    assert_same(run(loop), run(reference))
