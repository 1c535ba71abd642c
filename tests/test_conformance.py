"""The conformance kit: every backend here passes it, and it catches broken ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import pytest

import adbackends
from adbackends import cli
from adbackends.backends.loop import LoopBackend
from adbackends.registry import REGISTRY
from adbackends.selection import AUTO_ORDER
from adbackends.testing import (
    CHECKS,
    WAIVABLE,
    ConformanceError,
    ConformanceReport,
    check_backend,
)

from .conftest import env_without_backend

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PROJECTS = sorted(ROOT.glob("plugins/*/pyproject.toml"))


def statuses(report: ConformanceReport) -> dict:
    return {r.name: r.status for r in report.results}


# -- every backend here passes ------------------------------------------------------


def test_built_in_backend_passes_the_kit(backend: adbackends.Backend) -> None:
    report = check_backend(backend)  # raises ConformanceError with the summary
    assert report.ok
    passed = [r.name for r in report.results if r.status == "pass"]
    # Skips only for capabilities the probes deny, never silently.
    for r in report.results:
        if r.status == "skip":
            assert "lacks capability" in r.detail
    assert len(passed) >= len(CHECKS) - 4, report.summary()


def _declared_backends(pyproject: Path) -> Tuple[str, List[str]]:
    """The distribution name and the backend names a plugin's pyproject declares."""
    text = pyproject.read_text(encoding="utf-8")
    dist = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M)
    section = re.search(
        r'^\[project\.entry-points\."adbackends\.backends"\]\n(.*?)(?:^\[|\Z)', text, re.M | re.S
    )
    assert dist and section, f"{pyproject} declares no adbackends.backends entry point"
    names = re.findall(r'^"?([^"=\s]+)"?\s*=', section.group(1), re.M)
    return dist.group(1), names


@pytest.mark.parametrize("pyproject", PLUGIN_PROJECTS, ids=lambda p: p.parent.name)
def test_plugin_distribution_is_found_selected_by_name_and_passes_the_kit(
    pyproject: Path,
) -> None:
    from importlib.metadata import PackageNotFoundError, distribution

    dist, names = _declared_backends(pyproject)
    try:
        distribution(dist)
    except PackageNotFoundError:
        pytest.skip(f"{dist} is not installed here: pip install -e {pyproject.parent}")
    auto = adbackends.current().name
    for name in names:
        assert name in adbackends.available()
        backend = adbackends.get(name)
        assert (backend.origin, backend.distribution) == ("plugin", dist)
        report = check_backend(backend)
        assert report.ok
        assert [r for r in report.results if r.name.startswith("claim:")] or not getattr(
            backend, "claims", ()
        )
    assert (
        adbackends.current().name == auto and auto.split(">")[0] in AUTO_ORDER
    )  # installing never changes auto
    assert not [p for p in REGISTRY.problems() if dist in p]


def test_there_is_at_least_one_plugin_distribution() -> None:
    assert PLUGIN_PROJECTS, "plugins/ holds no distribution"


# -- the kit catches broken backends ---------------------------------------------------


class Mutant(LoopBackend):
    """The loop backend with one defect, set per test."""

    name = "mutant"
    jacobian_hook: Optional[Callable[[Any], Any]] = None

    def jacrev(
        self,
        func,
        argnums=0,
        *,
        has_aux=False,
        chunk_size=None,  # type: ignore[override]
        _preallocate_and_copy=False,
    ):
        inner = super().jacrev(func, argnums, has_aux=has_aux, chunk_size=chunk_size)
        hook = type(self).jacobian_hook
        if hook is None:
            return inner
        return lambda *a, **k: hook(inner(*a, **k))


def mutant(**attrs: Any) -> adbackends.Backend:
    return type("M", (Mutant,), attrs)()


def _scaled(result: Any) -> Any:
    import torch

    if isinstance(result, torch.Tensor):
        return result * (1 + 1e-5)
    return result


def _tuple_to_list(result: Any) -> Any:
    return (
        list(result)
        if isinstance(result, tuple) and len(result) == 2 and not isinstance(result[1], dict)
        else result
    )


def _detached(result: Any) -> Any:
    import torch

    return result.detach() if isinstance(result, torch.Tensor) else result


def test_a_correct_mutant_passes() -> None:
    assert check_backend(mutant()).ok  # the harness itself breaks nothing


@pytest.mark.parametrize(
    ("hook", "failing"),
    [
        (_scaled, "jacrev_basic"),
        (_tuple_to_list, "jacrev_argnums"),
        (_detached, "jacrev_differentiable"),
    ],
    ids=["values-off-by-1e-5", "tuple-as-list", "detached"],
)
def test_kit_fails_a_wrong_jacobian(hook: Callable[[Any], Any], failing: str) -> None:
    with pytest.raises(ConformanceError) as info:
        check_backend(mutant(jacobian_hook=staticmethod(hook)))
    report = info.value.report
    assert statuses(report)[failing] == "fail"
    assert f"FAIL {failing}" in str(info.value)


def test_tolerance_declared_by_an_approximate_backend_is_used() -> None:
    loose = mutant(jacobian_hook=staticmethod(_scaled), tolerance=(1e-4, 1e-6))
    report = check_backend(loose)
    assert report.ok and (report.rtol, report.atol) == (1e-4, 1e-6)
    assert "rtol=0.0001" in report.summary()
    # An explicit tolerance wins over the declared one.
    strict = check_backend(loose, rtol=1e-9, atol=1e-12, raise_on_failure=False)
    assert statuses(strict)["jacrev_basic"] == "fail"


def test_kit_fails_a_wrong_exception_type() -> None:
    class WrongErrors(Mutant):
        def jacrev(self, func, argnums=0, **kwargs):  # type: ignore[override]
            if not isinstance(argnums, (int, tuple)):
                raise ValueError("bad argnums")
            return super().jacrev(func, argnums, **kwargs)

    report = check_backend(WrongErrors(), raise_on_failure=False)
    assert statuses(report)["errors"] == "fail"
    detail = next(r.detail for r in report.results if r.name == "errors")
    assert "jacrev argnums not an int" in detail and "expected RuntimeError" in detail


def test_kit_fails_ignored_out_dims() -> None:
    class NoOutDims(Mutant):
        def vmap(self, func, in_dims=0, out_dims=0, randomness="error", *, chunk_size=None):
            return super().vmap(func, in_dims, 0, randomness, chunk_size=chunk_size)

    report = check_backend(NoOutDims(), raise_on_failure=False)
    assert statuses(report)["vmap_out_dims"] == "fail"
    assert statuses(report)["vmap_basic"] == "pass"


def test_kit_fails_a_claim_the_probe_refutes() -> None:
    report = check_backend(mutant(claims=("transforms",)), raise_on_failure=False)
    assert statuses(report)["claim:transforms"] == "fail"
    detail = next(r.detail for r in report.results if r.name == "claim:transforms")
    assert "loops instead of vectorising" in detail


def test_missing_capability_skips_its_checks_unless_claimed() -> None:
    class NoRandomness(Mutant):
        def vmap(self, func, in_dims=0, out_dims=0, randomness="error", *, chunk_size=None):
            randomness = "different" if randomness == "same" else randomness
            return super().vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)

    honest = check_backend(NoRandomness())
    result = next(r for r in honest.results if r.name == "vmap_randomness")
    assert result.status == "skip" and "lacks capability 'randomness'" in result.detail

    class Boasting(NoRandomness):
        claims = ("randomness",)

    report = check_backend(Boasting(), raise_on_failure=False)
    assert statuses(report)["vmap_randomness"] == "fail"
    assert statuses(report)["claim:randomness"] == "fail"


def test_limitations_can_only_waive_waivable_checks() -> None:
    with pytest.raises(ValueError, match="cannot be waived"):
        check_backend(mutant(limitations={"jacrev_basic": "approximate"}))
    # The same check, and the same exception type, as when the registry loads it.
    with pytest.raises(TypeError, match="unknown capabilities"):
        check_backend(mutant(claims=("telepathy",)))
    with pytest.raises(ValueError, match="pair"):
        check_backend(mutant(tolerance=1e-3))
    with pytest.raises(TypeError, match="Backend or a backend name"):
        check_backend(object())  # type: ignore[arg-type]


def test_declared_limitation_that_is_not_needed_still_passes() -> None:
    waived = mutant(limitations={"jacrev_inner_no_grad": "sees through no_grad"})
    report = check_backend(waived)
    result = next(r for r in report.results if r.name == "jacrev_inner_no_grad")
    assert result.status == "pass" and "declared a limitation, but passes" in result.detail
    assert set(WAIVABLE) <= set(CHECKS)


# -- the command line -------------------------------------------------------------------


def test_check_command_exit_status_and_json(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["check", "loop"]) == 0
    assert "PASSED" in capsys.readouterr().out

    adbackends.register("mutant-cli", mutant(claims=("transforms",), name=""))
    try:
        assert cli.main(["check", "mutant-cli", "--json"]) == 1
        data = json.loads(capsys.readouterr().out)
    finally:
        REGISTRY.unregister("mutant-cli")
    assert data["ok"] is False and data["backend"] == "mutant-cli"
    failed = [r["name"] for r in data["results"] if r["status"] == "fail"]
    assert failed == ["claim:transforms"]

    assert cli.main(["check", "no-such-backend"]) == 2
    assert "unknown autodiff backend" in capsys.readouterr().err


def test_python_dash_m_check_runs_in_a_fresh_process() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adbackends", "check", "loop"],
        env=env_without_backend(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "conformance of backend 'loop'" in out.stdout


def test_the_kit_leaves_no_trace() -> None:
    import torch

    rng = torch.random.get_rng_state()
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    check_backend("loop")
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert (torch.get_default_dtype(), torch.is_grad_enabled()) == (dtype, grad)


def test_importing_the_kit_is_cheap() -> None:
    code = "import sys, adbackends.testing; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env_without_backend(), capture_output=True, text=True
    )
    assert out.stdout.strip() == "False", out.stderr
