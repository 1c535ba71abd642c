"""adbackends: a pluggable backend registry for PyTorch's autodiff transforms.

``jacrev``, ``vmap``, ``fjacrev`` and ``fvmap`` have torch.func's signatures
and run on the active backend: ``torch.func``, ``functorch``, ``loop`` or an
installed plugin, chosen by :func:`using`, :func:`use`, the environment
variable ``TAD_AD_BACKEND`` or automatically from capability probes.

Importing this package is cheap: it imports neither torch.func nor functorch,
scans no entry points and runs no probe. All of that happens on first use.

Examples
--------
>>> import torch, adbackends
>>> x = torch.tensor([0.0, 1.0])
>>> adbackends.jacrev(torch.sin)(x)
tensor([[1.0000, 0.0000],
        [0.0000, 0.5403]])
"""

from __future__ import annotations

from typing import List

from ._version import __version__
from .backend import CONTRACT_VERSION, Backend
from .errors import (
    BackendError,
    BackendUnavailableError,
    CapabilityError,
    PluginError,
    UnknownBackendError,
)
from .probes import PROBES, Support
from .registry import AUTO_ORDER, ENTRY_POINT_GROUP, REGISTRY
from .selection import ENV_VAR, REQUIRED, Choice, current, get, use, using
from .transforms import fjacrev, fvmap, jacrev, vmap

__all__ = [
    "AUTO_ORDER",
    "CONTRACT_VERSION",
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "PROBES",
    "REQUIRED",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "CapabilityError",
    "Choice",
    "PluginError",
    "Support",
    "UnknownBackendError",
    "__version__",
    "available",
    "current",
    "fjacrev",
    "fvmap",
    "get",
    "jacrev",
    "refresh",
    "register",
    "use",
    "using",
    "vmap",
]


def available() -> List[str]:
    """Names of the backends that load here: built-ins in auto order, then plugins.

    Examples
    --------
    >>> import adbackends
    >>> "loop" in adbackends.available()
    True
    """
    return REGISTRY.available()


def register(name: str, factory: object, *, replace: bool = False) -> None:
    """Register a backend from code, for programs that cannot ship entry points.

    See :meth:`adbackends.registry.Registry.register`. Like a plugin, a
    registered backend is only used when selected by name.
    """
    from .selection import _forget_caches

    REGISTRY.register(name, factory, replace=replace)
    _forget_caches()


def refresh() -> None:
    """Rescan installed plugins and forget cached automatic choices.

    Call it after installing or removing a plugin while the program runs.
    Probe results of loaded backends are kept.
    """
    from .selection import _forget_caches

    REGISTRY.refresh()
    _forget_caches()
