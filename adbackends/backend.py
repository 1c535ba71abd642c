"""The :class:`Backend` base class: what every autodiff backend provides.

A backend is an object with a name, a version, torch.func's transforms with
their exact signatures, and capabilities that are probed rather than declared.
Built-in backends and plugins subclass it alike.

Contract 2 (this version) has the whole family: ``jacrev``, ``vmap``,
``grad``, ``grad_and_value``, ``vjp``, ``jvp``, ``jacfwd``, ``hessian`` and
``linearize``. Only ``jacrev`` and ``vmap`` are required. What a backend does
not implement, this base class derives where the derivation is exact:

* ``grad`` and ``grad_and_value`` from ``jacrev`` (the Jacobian of a scalar
  output is the gradient);
* ``hessian`` as ``jacrev(jacrev(func, argnums), argnums)``;
* ``jacfwd`` from ``jacrev`` (the same Jacobian, computed by rows);
* ``linearize`` from ``jvp``, when the backend implements ``jvp``.

``vjp``, ``jvp`` (and ``linearize`` without ``jvp``) cannot be had from
``jacrev`` and ``vmap`` without building whole Jacobians, so they raise
:class:`~adbackends.CapabilityError` naming what the backend would need.
:meth:`Backend.transforms` says which is which for a backend.

A backend knows nothing about other backends. What it needs to know about
them is handed to it by whoever loads it, as :attr:`Backend.peers` (the
registry, for every backend it loads): which backend serves ``fjacrev``/
``fvmap`` for a backend without native transforms, and which backends an
error message may suggest.
"""

from __future__ import annotations

import functools
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)

from ._shared import ArgNums, native_call
from .errors import CapabilityError
from .probes import PROBES, Support, run_probe

__all__ = [
    "CONTRACTS",
    "CONTRACT_VERSION",
    "TRANSFORMS",
    "Backend",
    "Peers",
    "Refusal",
]

#: The version of the backend contract documented in "Writing a plugin".
#: A plugin declares the contract it was written for as ``Backend.contract``.
CONTRACT_VERSION = 2

#: Every contract this adbackends implements; the registry refuses others.
#: Contract 1 had ``jacrev`` and ``vmap`` only; such a backend keeps working,
#: with the rest of the family derived (see :meth:`Backend.transforms`).
CONTRACTS: Tuple[int, ...] = (1, 2)

#: The transforms of the contract, in documentation order.
TRANSFORMS: Tuple[str, ...] = (
    "jacrev",
    "vmap",
    "grad",
    "grad_and_value",
    "vjp",
    "jvp",
    "jacfwd",
    "hessian",
    "linearize",
)

#: How the base class provides a transform the backend does not implement.
_DERIVATIONS: Dict[str, str] = {
    "grad": "derived from jacrev",
    "grad_and_value": "derived from jacrev",
    "jacfwd": "derived from jacrev",
    "hessian": "derived from jacrev (jacrev(jacrev))",
}

_GRAD = "grad_and_value(f)(*args)"


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


class Peers(Protocol):
    """The backends beside a backend, as it may ask about them.

    The registry is one (:class:`~adbackends.registry.Registry`), and hands
    itself to every backend it loads as :attr:`adbackends.Backend.peers`.
    """

    def native_for(self, backend: Backend) -> Backend:
        """The backend serving ``backend``'s ``fjacrev``/``fvmap``."""
        ...

    def alternatives(
        self,
        capability: str,
        exclude: Sequence[str] = (),
        *,
        native: Optional[bool] = None,
        probe: bool = True,
    ) -> List[str]:
        """Names of backends here that have ``capability``, best first, for error hints."""
        ...


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
    override :meth:`load` to import what they need and :attr:`version`. They
    may implement any other transform of the family; the base class derives
    the rest where it can (see :meth:`transforms`).

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

    #: Capabilities the backend has by its construction (the loop backend runs
    #: every autograd.Function, since it calls nothing but autograd). Named in
    #: error hints where no probe may run; never a substitute for the probes.
    by_construction: ClassVar[Tuple[str, ...]] = ()

    #: The backends beside this one, set by the registry that loads it
    #: (``None`` for a backend made by hand): see :class:`Peers`.
    peers: Optional[Peers] = None

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

    # The rest of the family. Each default below is the base class's
    # derivation from jacrev (or jvp); a backend overrides what it has natively.

    def grad(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """Gradient of a scalar ``func``, as ``torch.func.grad``.

        Derived from :meth:`jacrev` unless the backend implements it.
        """
        both = self.grad_and_value(func, argnums, has_aux)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            gradient, value = both(*args, **kwargs)
            if has_aux:
                return gradient, value[1]
            return gradient

        return wrapper

    def grad_and_value(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        """Gradient and value of a scalar ``func``, as ``torch.func.grad_and_value``.

        Derived from :meth:`jacrev` unless the backend implements it: the
        value (and ``aux``) travel as ``jacrev``'s ``aux``.
        """
        jacrev = self.jacrev

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            def scalar(*inner: Any) -> Any:
                return _scalar_and_aux(func(*inner, **kwargs), has_aux)

            return jacrev(scalar, argnums, has_aux=True)(*args)

        return wrapper

    def vjp(self, func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
        """Output of ``func`` and a function for vector-Jacobian products, as ``torch.func.vjp``.

        Not derived: a backend without its own ``vjp`` raises
        :class:`~adbackends.CapabilityError`.
        """
        raise self._missing("vjp", "vjp(func, *primals, has_aux=False) returning (output, vjp_fn)")

    def jvp(
        self,
        func: Callable[..., Any],
        primals: Any,
        tangents: Any,
        *,
        strict: bool = False,
        has_aux: bool = False,
    ) -> Any:
        """Output of ``func`` and its Jacobian-vector product, as ``torch.func.jvp``.

        Not derived: a backend without its own ``jvp`` raises
        :class:`~adbackends.CapabilityError`.
        """
        raise self._missing(
            "jvp",
            "forward-mode products: jvp(func, primals, tangents, *, strict=False, has_aux=False)",
        )

    def jacfwd(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        has_aux: bool = False,
        *,
        randomness: str = "error",
    ) -> Callable[..., Any]:
        """Jacobian of ``func`` by forward-mode autodiff, as ``torch.func.jacfwd``.

        Derived from :meth:`jacrev` (the same Jacobian) unless the backend
        implements it; the derivation has no ``randomness`` other than
        ``"error"``, which it does not enforce.
        """
        if randomness not in ("error", "different", "same"):
            raise RuntimeError(
                "Only allowed values for randomness are 'error', 'different', or 'same'. "
                f"Got {randomness}"
            )
        if randomness != "error":
            raise CapabilityError(
                self.name,
                "jacfwd",
                f"backend {self.name!r} derives jacfwd from jacrev, which has no randomness; "
                f"randomness={randomness!r} needs the backend to implement jacfwd(..., "
                "randomness=...)",
                detail=f"jacfwd(randomness={randomness!r})",
            )
        return self.jacrev(func, argnums, has_aux=has_aux)

    def hessian(self, func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
        """Hessian of ``func``, as ``torch.func.hessian``.

        Derived as ``jacrev(jacrev(func, argnums), argnums)`` unless the
        backend implements it; the result has torch.func's structure.
        """
        return self.jacrev(self.jacrev(func, argnums), argnums)

    def linearize(self, func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
        """Output of ``func`` and a function for its JVPs, as ``torch.func.linearize``.

        Derived from :meth:`jvp` when the backend implements ``jvp``
        (``func`` then runs once now and once per product); otherwise
        :class:`~adbackends.CapabilityError`.
        """
        if type(self).jvp is Backend.jvp:
            raise self._missing("linearize", "linearize(func, *primals), or jvp to derive it from")
        output = func(*primals)
        jvp = self.jvp

        def jvp_fn(*tangents: Any) -> Any:
            return jvp(func, primals, tangents)[1]

        return output, jvp_fn

    def transforms(self) -> Dict[str, str]:
        """How this backend provides each transform of the contract.

        ``"own"`` for what the backend implements, ``"derived from ..."`` for
        what the base class derives, ``"missing"`` for what raises
        :class:`~adbackends.CapabilityError`.

        Examples
        --------
        >>> import adbackends
        >>> adbackends.get("loop").transforms()["hessian"]
        'own'
        """
        cls = type(self)
        out: Dict[str, str] = {}
        for name in TRANSFORMS:
            if getattr(cls, name) is not getattr(Backend, name):
                out[name] = "own"
            elif name == "linearize" and cls.jvp is not Backend.jvp:
                out[name] = "derived from jvp"
            else:
                out[name] = _DERIVATIONS.get(name, "missing")
        return out

    def _missing(self, transform: str, need: str) -> CapabilityError:
        own = [name for name, how in self.transforms().items() if how == "own"]
        return CapabilityError(
            self.name,
            transform,
            f"backend {self.name!r} (contract {self.contract}) implements "
            f"{', '.join(own) or 'nothing'}; {transform} cannot be derived from those "
            f"exactly. It would need {need}. The built-in backends have it",
        )

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
            When this backend has none and has no :attr:`peers` to ask (a
            backend made by hand, not loaded by the registry).
        """
        peers = self.peers
        if peers is not None:
            return peers.native_for(self)
        support = self.supports("transforms")
        if support:
            return self
        raise CapabilityError(self.name, "transforms", str(support.reason))

    def hints(self, capability: str, *, probe: bool = True) -> List[str]:
        """Other backends here that have ``capability``, for an error message.

        Asks :attr:`peers`; empty for a backend made by hand. ``probe=False``
        runs no probe (for hints built inside a running transform).
        """
        peers = self.peers
        if peers is None:
            return []
        return peers.alternatives(capability, (self.name,), probe=probe)

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


def _scalar_and_aux(result: Any, has_aux: bool) -> Tuple[Any, Any]:
    """``(output, value)`` or ``(output, (value, aux))`` for a derived grad_and_value.

    Checks ``func``'s result as ``torch.func.grad_and_value`` does, with its
    exception types and messages.
    """
    import torch

    aux = None
    if has_aux:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise RuntimeError(
                f"{_GRAD}: output of function f should be a tuple: (output, aux) if has_aux is True"
            )
        result, aux = result
    if not isinstance(result, torch.Tensor):
        raise RuntimeError(f"{_GRAD}: Expected f(*args) to return a Tensor, got {type(result)}")
    if result.dim() != 0:
        raise RuntimeError(
            f"{_GRAD}: Expected f(*args) to return a scalar Tensor, got tensor with "
            f"{result.dim()} dims. Maybe you wanted to use the vjp or jacrev APIs instead?"
        )
    return result, ((result, aux) if has_aux else result)
