"""The :class:`Backend` base class: what every autodiff backend provides.

A backend is an object with a name, a version, the two transforms ``jacrev``
and ``vmap`` with torch.func's exact signatures, and capabilities that are
probed rather than declared. Built-in backends and plugins subclass it alike.

A backend knows nothing about other backends. ``fjacrev``/``fvmap`` of a
backend without native transforms are served by another one; which one is
decided by :mod:`adbackends.selection`, which installs itself here as the
resolver (:func:`set_native_resolver`) when it is imported.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Tuple

from ._shared import ArgNums, native_call
from .errors import CapabilityError
from .probes import PROBES, Support, run_probe

__all__ = ["CONTRACT_VERSION", "Backend", "Refusal", "set_native_resolver"]

#: The version of the backend contract documented in "Writing a plugin".
#: A plugin declares the contract it was written for as ``Backend.contract``;
#: the registry refuses one whose major contract differs.
CONTRACT_VERSION = 1

_native_resolver: Optional[Callable[[Backend], Backend]] = None


class Refusal(NamedTuple):
    """A backend's word that it cannot transform a function (not that the function is wrong).

    Returned by :meth:`~adbackends.Backend.cannot_transform`; a fallback chain then runs
    the call on its fallback backend and tells the user ``reason`` and ``fix``.

    Attributes
    ----------
    kind : str
        A short stable name for the class of failure (``"item"``,
        ``"control_flow"``, ``"legacy_function"``, ...).
    reason : str
        What the backend said, in one line.
    fix : str
        What would let the backend transform the function.
    """

    kind: str
    reason: str
    fix: str


def set_native_resolver(resolver: Optional[Callable[[Backend], Backend]]) -> None:
    """Install the function that picks the backend serving ``fjacrev``/``fvmap``.

    :mod:`adbackends.selection` installs its own when imported; this hook
    keeps this module free of any knowledge of other backends.
    """
    global _native_resolver
    _native_resolver = resolver


def _native_only(transformed: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``transformed`` marked as serving fjacrev/fvmap (for error hints)."""

    @functools.wraps(transformed)
    def call(*args: Any, **kwargs: Any) -> Any:
        with native_call():
            return transformed(*args, **kwargs)

    return call


class Backend:
    """An autodiff backend.

    Subclasses set :attr:`name` (for plugins, the entry point's name is used
    when it is left empty), implement :meth:`jacrev` and :meth:`vmap`, and may
    override :meth:`load` to import what they need and :attr:`version`.

    Capabilities are never taken on trust: :meth:`supports` runs the named
    probe (once per process) against this backend's own transforms.

    Examples
    --------
    >>> import torch, adbackends
    >>> loop = adbackends.get("loop")
    >>> loop.name
    'loop'
    >>> x = torch.tensor([0.0, 1.0])
    >>> loop.jacrev(torch.sin)(x)
    tensor([[1.0000, 0.0000],
            [0.0000, 0.5403]])
    >>> bool(loop.supports("custom_function"))
    True
    """

    #: The backend's name, as used by ``use``, ``using`` and ``TAD_AD_BACKEND``.
    name: str = ""
    #: The backend contract this class was written for.
    contract: ClassVar[int] = CONTRACT_VERSION
    #: What to install when :meth:`load` fails; shown in error messages.
    install_hint: ClassVar[str] = ""
    #: Capabilities the backend is meant to have. Each is verified by its
    #: probe, never trusted: a refuted claim is reported and fails the
    #: conformance kit.
    claims: ClassVar[Tuple[str, ...]] = ()
    #: ``(rtol, atol)`` for an approximate backend; the conformance kit
    #: compares with these tolerances instead of its defaults.
    tolerance: ClassVar[Optional[Tuple[float, float]]] = None
    #: Conformance checks the backend cannot honour by design: ``{check: reason}``.
    limitations: ClassVar[Dict[str, str]] = {}
    #: Where the backend comes from: ``"built-in"``, or set by the registry
    #: to ``"plugin"`` for entry points and ``"registered"`` for
    #: :func:`adbackends.register`.
    origin: str = "built-in"
    #: The distribution that provides a plugin backend (``None`` for built-ins).
    distribution: Optional[str] = None

    def load(self) -> None:
        """Import what the backend needs. Raise ``ImportError`` if it cannot load.

        Called once, by the registry, before the backend is first handed out.
        """

    @property
    def version(self) -> str:
        """The version of the library that implements the transforms."""
        import torch

        return str(torch.__version__)

    # -- the transforms -------------------------------------------------------

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        """Jacobian of ``func`` by reverse-mode autodiff, as ``torch.func.jacrev``."""
        raise NotImplementedError(f"backend {self.name!r} does not implement jacrev")

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        """Map ``func`` over a batch dimension, as ``torch.func.vmap``."""
        raise NotImplementedError(f"backend {self.name!r} does not implement vmap")

    def fjacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        """The functorch-style ``jacrev``: native composable transforms.

        This backend's own ``jacrev`` when it passes the ``transforms`` probe,
        otherwise that of the best backend here that does.
        """
        with native_call():
            transformed = self.native().jacrev(
                func,
                argnums,
                has_aux=has_aux,
                chunk_size=chunk_size,
                _preallocate_and_copy=_preallocate_and_copy,
            )
        return _native_only(transformed)

    def fvmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        """The functorch-style ``vmap``; resolved like :meth:`fjacrev`."""
        with native_call():
            transformed = self.native().vmap(
                func, in_dims, out_dims, randomness, chunk_size=chunk_size
            )
        return _native_only(transformed)

    def native(self) -> Backend:
        """The backend that serves :meth:`fjacrev` and :meth:`fvmap`.

        Raises
        ------
        adbackends.BackendUnavailableError
            When no backend here has native composable transforms.
        adbackends.CapabilityError
            When this backend has none and no resolver is installed (only
            possible if :mod:`adbackends.selection` was never imported).
        """
        resolver = _native_resolver
        if resolver is not None:
            return resolver(self)
        support = self.supports("transforms")
        if support:
            return self
        raise CapabilityError(self.name, "transforms", str(support.reason))

    # -- failures -------------------------------------------------------------

    def cannot_transform(self, exc: BaseException) -> Optional[Refusal]:
        """Whether ``exc``, raised by one of this backend's transforms, means it
        cannot transform the function (a :class:`~adbackends.backend.Refusal`), rather than an
        error in the function itself (``None``).

        A fallback chain (``use("torch.func", fallback="loop")``) retries a
        call on its fallback only when this returns a :class:`Refusal`.
        Override it to let a plugin take part; the default refuses nothing,
        so every error is raised as it is.
        """
        return None

    # -- capabilities ---------------------------------------------------------

    def supports(self, capability: str) -> Support:
        """Whether the backend passes the probe named ``capability``.

        The result is truthy or falsy like a ``bool`` and carries the reason
        for a failure as ``.reason``. Probes run lazily, once per process.

        Raises
        ------
        ValueError
            For a capability name that has no probe.
        """
        return run_probe(self, capability)

    def capabilities(self) -> Dict[str, Support]:
        """Every probe's result for this backend, in a fixed order."""
        return {cap: self.supports(cap) for cap in PROBES}

    def __repr__(self) -> str:
        return f"<adbackends backend {self.name!r} ({self.origin}, version {self.version})>"
