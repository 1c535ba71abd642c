"""Shared fixtures: one fixture runs a test on every backend that loads here."""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import pytest

import adbackends
from adbackends import selection
from adbackends.registry import REGISTRY
from adbackends.selection import AUTO_ORDER


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts with no use(), no TAD_AD_BACKEND and fresh choice caches."""
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    selection._reset()
    yield
    selection._reset()


def _loadable(name: str) -> bool:
    return REGISTRY.failure(name) is None


@pytest.fixture(params=list(AUTO_ORDER))
def backend(request: pytest.FixtureRequest) -> adbackends.Backend:
    """Each built-in backend that loads here (the others are skipped, with the reason)."""
    name = request.param
    failure = REGISTRY.failure(name)
    if failure is not None:
        pytest.skip(f"{name} does not load here: {failure.reason}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return REGISTRY.get(name)


@pytest.fixture
def reference() -> adbackends.Backend:
    """torch.func, the ground truth for differential tests."""
    failure = REGISTRY.failure("torch.func")
    if failure is not None:
        pytest.skip(f"torch.func does not load here: {failure.reason}")
    return REGISTRY.get("torch.func")


def require(backend: adbackends.Backend, *capabilities: str) -> None:
    """Skip unless ``backend`` passes every probe named, giving the probe's reason."""
    for cap in capabilities:
        support = backend.supports(cap)
        if not support:
            pytest.skip(f"{backend.name} lacks {cap}: {support.reason}")


def env_without_backend() -> dict:
    env = dict(os.environ)
    env.pop(selection.ENV_VAR, None)
    return env
