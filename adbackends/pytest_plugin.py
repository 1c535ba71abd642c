"""A pytest plugin: run any test suite under a chosen autodiff backend.

Installed with adbackends (entry point group ``pytest11``), it adds one
option::

    pytest --ad-backend loop
    pytest --ad-backend autograd.functional

At the start of the session the backend is chosen with
:func:`adbackends.use` and ``TAD_AD_BACKEND`` is set to the same name, so
code under test and the subprocesses it starts use it; both are put back when
the session ends. The backend, its origin and version appear in the report
header, with the transforms of the family that the backend derives or
lacks (see :meth:`adbackends.Backend.transforms`): ``adbackends.grad``,
``hessian``, ``jvp`` and the rest run on the chosen backend like ``jacrev``
and ``vmap``. The ``ad_backend`` fixture gives the backend object to tests.

Without the option the plugin does nothing: it imports neither torch nor
any backend.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, List, Optional

import pytest

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["ad_backend"]

_STASH_KEY = "_adbackends_env_before"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("adbackends", "autodiff backend (adbackends)")
    group.addoption(
        "--ad-backend",
        action="store",
        dest="ad_backend",
        default=None,
        metavar="NAME",
        help=(
            "run the tests with this adbackends backend (a built-in such as "
            "'torch.func', 'functorch' or 'loop', a plugin's name, or 'auto'); "
            "it is chosen with adbackends.use() and TAD_AD_BACKEND"
        ),
    )


def _requested(config: pytest.Config) -> Optional[str]:
    name = config.getoption("ad_backend", default=None)
    return name.strip() if isinstance(name, str) and name.strip() else None


def pytest_configure(config: pytest.Config) -> None:
    name = _requested(config)
    if name is None:
        return
    import adbackends
    from adbackends.selection import ENV_VAR

    try:
        adbackends.use(name)
    except adbackends.UnknownBackendError as exc:
        # Say where the name came from: this option, not a use() in the code.
        err = adbackends.UnknownBackendError(exc.name, exc.valid, "--ad-backend")
        raise pytest.UsageError(str(err)) from exc
    except adbackends.BackendError as exc:
        raise pytest.UsageError(f"--ad-backend {name}: {exc}") from exc
    setattr(config, _STASH_KEY, os.environ.get(ENV_VAR))
    os.environ[ENV_VAR] = name


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, _STASH_KEY):
        return
    import adbackends
    from adbackends.selection import ENV_VAR

    before = getattr(config, _STASH_KEY)
    delattr(config, _STASH_KEY)
    if before is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = before
    adbackends.use(None)


def pytest_report_header(config: pytest.Config) -> List[str]:
    name = _requested(config)
    if name is None:
        return []
    import adbackends

    backend = adbackends.get(name)
    where = backend.origin
    if backend.distribution:
        where += f" from {backend.distribution}"
    lines = [
        f"adbackends: backend {backend.name!r} ({where}, version {backend.version}), "
        f"chosen by --ad-backend {name}"
    ]
    # Transforms the backend does not implement itself: derived, or raising.
    other = {t: how for t, how in backend.transforms().items() if how != "own"}
    if other:
        lines.append(
            f"adbackends: contract {backend.contract}; "
            + ", ".join(f"{t}: {how}" for t, how in other.items())
        )
    return lines


@pytest.fixture
def ad_backend() -> Backend:
    """The backend the transforms use in this test (``--ad-backend``'s, or the active one)."""
    import adbackends

    return adbackends.current()
