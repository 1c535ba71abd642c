"""Client code under ``auto`` where auto is ``functorch>loop`` (torch 1.12 and 1.13).

Dispersion-energy forces and Hessians as tad-dftd3 and dxtb compute them:
the results equal the loop backend's, each function falls back only where
functorch cannot transform it, and says so once. A small dispersion energy
written here runs everywhere; tad-dftd3 and dxtb themselves are used where
they are installed (``pip install tad-dftd3`` / ``pip install dxtb``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Tuple

import pytest
import torch

import adbackends
from adbackends.registry import REGISTRY

pytestmark = [
    pytest.mark.skipif(
        REGISTRY.failure("functorch") is not None, reason="functorch does not load here"
    ),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(autouse=True)
def _auto_is_a_chain() -> Any:
    name = adbackends.explain().backend.name
    if ">" not in name:
        pytest.skip(f"auto is {name} here, not a chain")
    adbackends.forget_fallbacks()
    yield
    adbackends.forget_fallbacks()


def _fallback_warnings(call: Callable[[], Any]) -> Tuple[Any, List[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = call()
    return result, [
        str(w.message) for w in record if issubclass(w.category, adbackends.FallbackWarning)
    ]


def dispersion_energy(positions: Any) -> Any:
    """A damped C6/r^6 pair energy with the input check tad-dftd3 has (``.item()``)."""
    n = positions.shape[-2]
    diff = positions[..., :, None, :] - positions[..., None, :, :]
    r2 = diff.pow(2).sum(-1) + torch.eye(n, dtype=positions.dtype)
    if float(r2.max().item()) > 1e6:  # a data-dependent check: vmap cannot run it
        raise ValueError("geometry too large")
    c6 = torch.linspace(1.0, 2.0, n, dtype=positions.dtype)
    pair = c6[:, None] * c6[None, :]
    return -(pair / (r2.pow(3) + 2.5**6)).triu(1).sum()


def smooth_energy(positions: Any) -> Any:
    """The same energy without the check: functorch transforms it."""
    n = positions.shape[-2]
    diff = positions[..., :, None, :] - positions[..., None, :, :]
    r2 = diff.pow(2).sum(-1) + torch.eye(n, dtype=positions.dtype)
    return -(1.0 / (r2.pow(3) + 2.5**6)).triu(1).sum()


GEOMETRIES = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(11)).double() * 2


def test_batched_forces_and_hessian_equal_the_loop() -> None:
    loop = adbackends.get("loop")
    forces, said = _fallback_warnings(
        lambda: adbackends.vmap(adbackends.jacrev(dispersion_energy))(GEOMETRIES)
    )
    assert torch.equal(forces, loop.vmap(loop.jacrev(dispersion_energy))(GEOMETRIES))
    assert len(said) == 1 and "vmap" in said[0]  # vmap cannot run .item(); jacrev can
    again, said = _fallback_warnings(
        lambda: adbackends.vmap(adbackends.jacrev(dispersion_energy))(GEOMETRIES)
    )
    assert torch.equal(again, forces) and said == []  # remembered: no second warning

    hess, said = _fallback_warnings(lambda: adbackends.hessian(dispersion_energy)(GEOMETRIES[0]))
    assert torch.allclose(hess, loop.hessian(dispersion_energy)(GEOMETRIES[0]), atol=1e-12)
    assert said == []  # outside vmap, .item() is fine: functorch computes it


def test_plain_function_never_falls_back() -> None:
    loop = adbackends.get("loop")
    (forces, hess), said = _fallback_warnings(
        lambda: (
            adbackends.vmap(adbackends.jacrev(smooth_energy))(GEOMETRIES),
            adbackends.vmap(adbackends.hessian(smooth_energy))(GEOMETRIES),
        )
    )
    assert said == [] and adbackends.fallbacks() == []
    assert torch.allclose(forces, loop.vmap(loop.jacrev(smooth_energy))(GEOMETRIES), atol=1e-12)
    assert torch.allclose(hess, loop.vmap(loop.hessian(smooth_energy))(GEOMETRIES), atol=1e-12)


def _caffeine_like() -> Tuple[Any, Any]:
    numbers = torch.tensor([6, 6, 7, 8, 1, 1, 1, 1])
    positions = torch.tensor(
        [
            [0.0, 0.0, 0.0],
            [2.6, 0.1, 0.0],
            [3.9, 2.3, 0.2],
            [-1.3, 2.1, -0.1],
            [-1.0, -1.9, 0.3],
            [3.5, -1.8, 0.1],
            [5.8, 2.1, 0.0],
            [-3.1, 1.8, 0.4],
        ],
        dtype=torch.float64,
    )
    return numbers, positions


def test_tad_dftd3_forces_and_hessian() -> None:
    d3 = pytest.importorskip("tad_dftd3")
    numbers, positions = _caffeine_like()
    param = {
        "s6": torch.tensor(1.0, dtype=torch.float64),
        "s8": torch.tensor(0.78981345, dtype=torch.float64),
        "a1": torch.tensor(0.49484001, dtype=torch.float64),
        "a2": torch.tensor(5.73083694, dtype=torch.float64),
    }

    def energy(pos: Any) -> Any:
        return d3.dftd3(numbers, pos, param).sum()

    batch = positions + 0.05 * torch.randn(
        3, *positions.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    loop = adbackends.get("loop")
    forces, said = _fallback_warnings(lambda: adbackends.vmap(adbackends.jacrev(energy))(batch))
    assert torch.allclose(forces, loop.vmap(loop.jacrev(energy))(batch), atol=1e-14)
    assert len(said) <= 1
    hess, said_h = _fallback_warnings(lambda: adbackends.hessian(energy)(positions))
    assert torch.allclose(hess, loop.hessian(energy)(positions), atol=1e-14)
    assert len(said_h) <= 1
    # Whatever fell back is listed once per function (inner transforms that
    # fell back inside a fallback too, without a warning of their own), and
    # later calls warn no more.
    functions = [f.function for f in adbackends.fallbacks()]
    assert len(functions) == len(set(functions)) >= len(said) + len(said_h)
    _, again = _fallback_warnings(
        lambda: (
            adbackends.vmap(adbackends.jacrev(energy))(batch),
            adbackends.hessian(energy)(positions),
        )
    )
    assert again == []


def test_dxtb_forces_and_hessian() -> None:
    dxtb = pytest.importorskip("dxtb")
    dd: Any = {"dtype": torch.float64, "device": torch.device("cpu")}
    numbers = torch.tensor([3, 1])  # LiH
    positions = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.5]], **dd)
    calc = dxtb.Calculator(numbers, dxtb.GFN1_XTB, opts={"verbosity": 0}, **dd)

    def energy(pos: Any) -> Any:
        return calc.energy(pos)

    reference = positions.clone().requires_grad_(True)
    calc.reset()
    (expected,) = torch.autograd.grad(calc.energy(reference), reference)
    calc.reset()
    forces, said = _fallback_warnings(lambda: adbackends.jacrev(energy)(positions))
    assert torch.allclose(forces, expected, atol=1e-10)
    calc.reset()
    hess, said_h = _fallback_warnings(lambda: adbackends.hessian(energy)(positions))
    calc.reset()
    assert torch.allclose(hess, adbackends.get("loop").hessian(energy)(positions), atol=1e-10)
    # dxtb's calculator caches results keyed on data_ptr(), which functorch's
    # tensors lack: each transform falls back, once, saying so.
    assert len(said) <= 1 and len(said_h) <= 1
    for text in said + said_h:
        assert "data pointer" in text
