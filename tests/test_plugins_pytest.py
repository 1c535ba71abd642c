"""The pytest plugin: ``pytest --ad-backend NAME`` runs a suite under that backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest

from adbackends.registry import REGISTRY

from .conftest import env_without_backend

SUITE = """
import os
import sys

import adbackends


def test_runs_under_the_chosen_backend(ad_backend):
    assert ad_backend.name == {name!r}
    assert adbackends.current().name == {name!r}
    assert adbackends.explain().source == "use"
    assert os.environ["TAD_AD_BACKEND"] == {name!r}


def test_the_family_runs_on_the_chosen_backend(ad_backend):
    import torch

    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    hess = adbackends.hessian(lambda t: (t**3).sum())(x)
    assert torch.allclose(hess, torch.diag(6 * x), rtol=1e-4, atol=1e-4)
    assert torch.allclose(adbackends.grad(lambda t: (t**2).sum())(x), 2 * x, rtol=1e-4)
"""

UNTOUCHED = """
import os
import sys


def test_nothing_is_chosen_or_imported():
    assert "TAD_AD_BACKEND" not in os.environ
    assert "torch" not in sys.modules
"""


def _registered_by_entry_point() -> bool:
    import importlib.metadata

    eps = importlib.metadata.entry_points()
    group = eps.select(group="pytest11") if hasattr(eps, "select") else eps.get("pytest11", [])
    return any(ep.value == "adbackends.pytest_plugin" for ep in group)


def run_pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_downstream.py").write_text(textwrap.dedent(source), encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    plugin: List[str] = [] if _registered_by_entry_point() else ["-p", "adbackends.pytest_plugin"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *plugin, "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env_without_backend(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", ["loop", "autograd.functional", "finite-difference"])
def test_ad_backend_option_runs_the_suite_under_the_backend(tmp_path: Path, name: str) -> None:
    if name not in REGISTRY.names():
        pytest.skip(f"{name} is not installed here")
    failure = REGISTRY.failure(name)
    if failure is not None:
        pytest.skip(f"{name} does not load here: {failure.reason}")
    origin = REGISTRY.entry(name).origin
    out = run_pytest(tmp_path, SUITE.format(name=name), "--ad-backend", name)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"adbackends: backend {name!r} ({origin}" in out.stdout
    assert f"chosen by --ad-backend {name}" in out.stdout
    assert "2 passed" in out.stdout


def test_header_says_what_a_plugin_derives(tmp_path: Path) -> None:
    name = "finite-difference"
    if name not in REGISTRY.names() or REGISTRY.failure(name) is not None:
        pytest.skip(f"{name} is not installed here")
    out = run_pytest(tmp_path, SUITE.format(name=name), "--ad-backend", name)
    assert "adbackends: contract 1; grad: derived from jacrev" in out.stdout
    assert "vjp: missing" in out.stdout


def test_unknown_backend_is_a_usage_error_with_a_suggestion(tmp_path: Path) -> None:
    out = run_pytest(tmp_path, SUITE.format(name="loop"), "--ad-backend", "lopp")
    assert out.returncode == 4, out.stdout + out.stderr  # pytest's usage-error status
    assert "unknown autodiff backend 'lopp' (from --ad-backend)" in out.stderr
    assert "Did you mean 'loop'?" in out.stderr


def test_without_the_option_the_plugin_does_nothing(tmp_path: Path) -> None:
    out = run_pytest(tmp_path, UNTOUCHED)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "adbackends:" not in out.stdout


def test_loaded_through_a_pytest11_entry_point(tmp_path: Path) -> None:
    """The declaration adbackends ships (pytest11: adbackends = adbackends.pytest_plugin)."""
    if _registered_by_entry_point():
        site = None
    else:
        site = tmp_path / "site"
        info = site / "adbackends_pytest_probe-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: adbackends-pytest-probe\nVersion: 1.0\n",
            encoding="utf-8",
        )
        (info / "entry_points.txt").write_text(
            "[pytest11]\nadbackends = adbackends.pytest_plugin\n", encoding="utf-8"
        )
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_downstream.py").write_text(
        textwrap.dedent(SUITE.format(name="loop")), encoding="utf-8"
    )
    (suite / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    env = env_without_backend()
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--ad-backend", "loop"],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "adbackends: backend 'loop'" in out.stdout
