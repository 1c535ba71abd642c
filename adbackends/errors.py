"""The exceptions adbackends raises.

Every error this library raises on its own account derives from
:class:`BackendError`, so ``except adbackends.BackendError`` catches them all.
Each subclass also derives from the built-in exception a user would reach for
first (``ValueError`` for a bad name, ``ImportError`` for a backend that does
not load, ``RuntimeError`` for a missing capability), so existing ``except``
clauses keep working.

Errors raised by the transforms themselves (a bad ``argnums``, mismatched
batch sizes, ...) are not wrapped: they have the exception types torch.func
uses.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "CapabilityError",
    "PluginError",
    "UnknownBackendError",
]


class BackendError(Exception):
    """Base class of every error raised by adbackends itself."""


class UnknownBackendError(BackendError, ValueError):
    """A backend name that no built-in backend or installed plugin provides.

    Attributes
    ----------
    name : str
        The name that was asked for.
    valid : tuple of str
        The names that would have been accepted.
    suggestion : str or None
        The closest valid name, if any is close.
    source : str
        Where the name came from (``"use()"``, ``"TAD_AD_BACKEND"``, ...).
    """

    def __init__(self, name: str, valid: Iterable[str], source: str = "") -> None:
        self.name = name
        self.valid = tuple(valid)
        self.source = source
        close = difflib.get_close_matches(name, self.valid, n=1, cutoff=0.5)
        if not close:
            # "torch_func", "TORCH.FUNC", "func" ...: compare case-insensitively
            # and without punctuation before giving up.
            squash = {_squash(v): v for v in self.valid}
            hit = difflib.get_close_matches(_squash(name), list(squash), n=1, cutoff=0.5)
            close = [squash[h] for h in hit]
        self.suggestion = close[0] if close else None
        where = f" (from {source})" if source else ""
        msg = f"unknown autodiff backend {name!r}{where}."
        if self.suggestion is not None:
            msg += f" Did you mean {self.suggestion!r}?"
        msg += " Valid names: " + ", ".join(repr(v) for v in self.valid) + "."
        super().__init__(msg)


def _squash(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


class BackendUnavailableError(BackendError, ImportError):
    """A known backend that cannot be loaded in this environment.

    Attributes
    ----------
    name : str
        The backend's name.
    reason : str
        Why it did not load.
    hint : str
        What to install or change so that it loads.
    """

    def __init__(self, name: str, reason: str, hint: str = "") -> None:
        self.name = name
        self.reason = reason
        self.hint = hint
        msg = f"autodiff backend {name!r} is not available: {reason}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class PluginError(BackendUnavailableError):
    """A third-party backend whose entry point is broken.

    Attributes
    ----------
    distribution : str
        The distribution that declared the entry point.
    """

    def __init__(self, name: str, reason: str, distribution: str, hint: str = "") -> None:
        self.distribution = distribution
        super().__init__(name, f"{reason} (plugin from distribution {distribution!r})", hint)


class CapabilityError(BackendError, RuntimeError):
    """A backend was asked for something its capability probe says it cannot do.

    Attributes
    ----------
    backend : str
        The backend's name.
    capability : str
        The probe that failed.
    reason : str
        The probe's reason.
    alternatives : tuple of str
        Backends here that do pass this probe.
    """

    def __init__(
        self,
        backend: str,
        capability: str,
        reason: str,
        alternatives: Sequence[str] = (),
        detail: str = "",
    ) -> None:
        self.backend = backend
        self.capability = capability
        self.reason = reason
        self.alternatives = tuple(alternatives)
        msg = f"autodiff backend {backend!r} lacks capability {capability!r}"
        if detail:
            msg += f" ({detail})"
        msg += f": {reason}"
        if self.alternatives:
            alts = ", ".join(repr(a) for a in self.alternatives)
            msg += f". Backends here that have it: {alts}"
        super().__init__(msg)
