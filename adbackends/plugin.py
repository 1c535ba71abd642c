"""Everything a plugin author needs, in one documented module.

A plugin is a :class:`Backend` subclass declared in the entry point group
:data:`ENTRY_POINT_GROUP`, written for backend contract
:data:`CONTRACT_VERSION`. Its capabilities are established by the probes in
:data:`PROBES`, never by what it says; :func:`describe` says what each probe
checks.

The helpers are those the built-in backends use themselves, so a plugin
raises what they raise:

* :func:`normalize_argnums` checks ``argnums`` with torch.func's exception
  type and messages;
* :func:`summarize_exception` turns an exception into one line;
* :class:`RngState` and :func:`preserved_rng` snapshot and restore the
  default random number generators (CPU, and CUDA once initialised);
* :func:`check_capability_names` checks a collection of capability names
  (``Backend.claims``) and raises ``TypeError`` naming the valid ones.

:data:`REGISTRY` is the process-wide registry (most programs need only
:func:`adbackends.register`, :func:`adbackends.unregister` and
:func:`adbackends.refresh`, which go through it).

Examples
--------
>>> from adbackends.plugin import CONTRACT_VERSION, ENTRY_POINT_GROUP, describe
>>> ENTRY_POINT_GROUP
'adbackends.backends'
>>> describe("higher_order")
'jacrev(jacrev(f)) gives the Hessian, without perturbation confusion'
"""

from __future__ import annotations

from ._shared import (
    ArgNums,
    RngState,
    check_capability_names,
    normalize_argnums,
    preserved_rng,
    summarize_exception,
)
from .backend import CONTRACT_VERSION, CONTRACTS, TRANSFORMS, Backend
from .probes import PROBES, PROBES_VERSION, Support, describe, tolerance_of
from .registry import ENTRY_POINT_GROUP, REGISTRY, Registry

__all__ = [
    "CONTRACTS",
    "CONTRACT_VERSION",
    "ENTRY_POINT_GROUP",
    "PROBES",
    "PROBES_VERSION",
    "REGISTRY",
    "TRANSFORMS",
    "ArgNums",
    "Backend",
    "Registry",
    "RngState",
    "Support",
    "check_capability_names",
    "describe",
    "normalize_argnums",
    "preserved_rng",
    "summarize_exception",
    "tolerance_of",
]
