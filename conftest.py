"""Fixtures for every test in the repository (tests/ and plugins/*/tests/)."""

from __future__ import annotations

from typing import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _no_user_probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Probe answers stay in memory: the user's cache on disk is never read or written.

    tests/test_probe_cache.py turns the disk cache on in directories of its own.
    Session-scoped, because module-scoped fixtures may probe before any
    function-scoped fixture runs; subprocesses inherit the variables.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADBACKENDS_CACHE_DIR", str(tmp_path_factory.mktemp("adbackends-cache")))
        mp.setenv("ADBACKENDS_NO_CACHE", "1")
        yield
