"""adbackends: a pluggable backend registry for PyTorch's autodiff transforms.

``jacrev``, ``vmap``, ``grad``, ``grad_and_value``, ``vjp``, ``jvp``,
``jacfwd``, ``hessian``, ``linearize``, ``fjacrev`` and ``fvmap`` have
torch.func's signatures and run on the active backend: ``torch.func``, ``functorch``, ``loop`` or an
installed plugin, chosen by :func:`using`, :func:`use`, the environment
variable ``TAD_AD_BACKEND`` or automatically from capability probes.

Importing this package is cheap: it imports neither torch.func nor functorch,
scans no entry points and runs no probe. All of that happens on first use.

The top level holds what programs that *use* backends need. What plugin
authors need (the contract version, the entry point group, the probes, the
registry, helpers for argument checks) is in :mod:`adbackends.plugin`.

Examples
--------
>>> import torch, adbackends
>>> x = torch.tensor([0.0, 1.0])
>>> adbackends.jacrev(torch.sin)(x)
tensor([[1.0000, 0.0000],
        [0.0000, 0.5403]])
"""

from __future__ import annotations

import warnings
from typing import Any, List

from ._memory import (
    ChunkChoice,
    MemoryWarning,
    chunk_choices,
    forget_chunks,
    max_memory,
    memory_limit,
    set_max_memory,
)
from ._version import __version__
from .backend import Backend
from .compiled import Compilation, compilations
from .errors import (
    BackendError,
    BackendUnavailableError,
    CapabilityError,
    PluginError,
    UnknownBackendError,
)
from .fallback import Fallback, FallbackWarning, fallbacks, forget_fallbacks
from .probes import Support
from .registry import REGISTRY as _REGISTRY
from .selection import Choice, current, explain, get, require, use, using
from .transforms import (
    fjacrev,
    fvmap,
    grad,
    grad_and_value,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    linearize,
    vjp,
    vmap,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "CapabilityError",
    "Choice",
    "ChunkChoice",
    "Compilation",
    "Fallback",
    "FallbackWarning",
    "MemoryWarning",
    "PluginError",
    "Support",
    "UnknownBackendError",
    "__version__",
    "available",
    "chunk_choices",
    "compilations",
    "current",
    "explain",
    "fallbacks",
    "fjacrev",
    "forget_chunks",
    "forget_fallbacks",
    "fvmap",
    "get",
    "grad",
    "grad_and_value",
    "hessian",
    "jacfwd",
    "jacrev",
    "jvp",
    "linearize",
    "max_memory",
    "memory_limit",
    "refresh",
    "register",
    "require",
    "set_max_memory",
    "unregister",
    "use",
    "using",
    "vjp",
    "vmap",
]


def available() -> List[str]:
    """Names of the backends that load here: built-ins, then plugins.

    Examples
    --------
    >>> import adbackends
    >>> "loop" in adbackends.available()
    True
    """
    return _REGISTRY.available()


def register(name: str, factory: object, *, replace: bool = False) -> None:
    """Register a backend from code, for programs that cannot ship entry points.

    Like a plugin, a registered backend is only used when selected by name.
    Every choice already made is re-derived on the next call, so
    ``replace=True`` takes effect at once, also for ``use(name)``.

    Parameters
    ----------
    name : str
        The name to select it by; built-in names and ``"auto"`` are refused.
    factory : Backend subclass, Backend instance, or callable
        Called with no arguments to make the backend (an instance is used as
        it is). It is checked when first loaded, like a plugin.
    replace : bool
        Allow replacing an earlier registration of the same name.

    Examples
    --------
    >>> import adbackends
    >>> from adbackends.backends.loop import LoopBackend
    >>> class Mine(LoopBackend):
    ...     name = "mine"
    >>> adbackends.register("mine", Mine)
    >>> adbackends.get("mine").name
    'mine'
    >>> adbackends.unregister("mine")
    """
    _REGISTRY.register(name, factory, replace=replace)


def unregister(name: str) -> None:
    """Remove a backend added by :func:`register`.

    A ``use(name)`` or ``using(name)`` still naming it then raises
    :class:`UnknownBackendError` on the next transform, naming where the
    name came from.
    """
    _REGISTRY.unregister(name)


def refresh() -> None:
    """Rescan installed plugins, forget every cached choice, and delete the
    probe results stored on disk (see "Probe results on disk").

    Call it after installing or removing a plugin while the program runs.
    Probe results of loaded backends are kept in memory.
    """
    from .probes import clear_probe_cache

    clear_probe_cache(forget_loaded=False)
    _REGISTRY.refresh()


# Names that lived here before 0.2, kept importable with a warning.
_MOVED = {
    "AUTO_ORDER": "adbackends.selection",
    "ENV_VAR": "adbackends.selection",
    "REQUIRED": "adbackends.selection",
    "CONTRACT_VERSION": "adbackends.plugin",
    "ENTRY_POINT_GROUP": "adbackends.plugin",
    "PROBES": "adbackends.plugin",
    "REGISTRY": "adbackends.plugin",
}


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module 'adbackends' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(home)
    if name == "REQUIRED":
        hint = "adbackends.require() (it returns them, and changes them)"
        value: Any = module.require()
    else:
        hint = f"{home}.{name}"
        value = getattr(module, name)
    warnings.warn(
        f"adbackends.{name} moved; use {hint}",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
