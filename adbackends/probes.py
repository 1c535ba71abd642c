"""Capability probes: tiny real computations checked against analytic answers.

A probe answers one question about one backend ("can it take the Jacobian of a
custom autograd.Function?") by doing exactly that on a few numbers and
comparing with the closed-form result. Nothing is taken from a version number
or from what a backend says about itself.

Probes run lazily, at most once per backend and process (thread-safe), and are
cached with the reason for a failure. Every answer lives in one
:class:`ProbeStore` (:data:`STORE`), which also keeps where each came from
(run here, or read from the disk cache of :mod:`adbackends._probe_cache`) and
the key that identifies a backend's code on disk, handed to it by whoever
loaded the backend (:meth:`ProbeStore.identify`; the registry does).

A probe leaves no trace: the RNG state, grad mode, default dtype,
deterministic-algorithms mode and warning filters are as they were before,
and warnings raised inside a probe are not shown.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

from ._shared import RngState, summarize_exception
from .errors import CapabilityError

if TYPE_CHECKING:
    from .backend import Backend

__all__ = [
    "PROBES",
    "PROBES_VERSION",
    "STORE",
    "ProbeStore",
    "Support",
    "cached_support",
    "clear_probe_cache",
    "describe",
    "probe_origin",
    "probing",
    "run_probe",
    "tolerance_of",
]

#: The version of the probe set. Bump it whenever a probe changes what it
#: checks: answers stored on disk under another version are not reused.
PROBES_VERSION = 2


class Support(NamedTuple):
    """The outcome of one probe; truthy when the capability is present.

    Attributes
    ----------
    capability : str
        The probe's name.
    ok : bool
        Whether the probe passed.
    reason : str or None
        Why it failed (``None`` when it passed).
    """

    capability: str
    ok: bool
    reason: Optional[str] = None

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        if self.ok:
            return f"Support({self.capability!r}: yes)"
        return f"Support({self.capability!r}: no, {self.reason})"


class _Probe(NamedTuple):
    description: str
    check: Callable[[Backend], None]


class _Answers:
    """One backend's record in the store."""

    __slots__ = ("disk", "identity", "keys", "memory", "origin")

    def __init__(self) -> None:
        self.memory: Dict[str, Support] = {}  # capability -> answer
        self.origin: Dict[str, str] = {}  # capability -> "run" | "cache"
        self.disk: Optional[Dict[str, Any]] = None  # answers read from the file
        # Works out what identifies the backend's code, for the file.
        self.identity: Optional[Callable[[], Optional[Dict[str, Any]]]] = None
        self.keys: Optional[Tuple[int, Any]] = None  # memo of the file's keys


class _Activity(threading.local):
    depth = 0  # probes running in this thread


class ProbeStore:
    """Every probe answer in this process: one record per backend, one lock, one reset.

    A record lives as long as its backend (weakly keyed). :data:`STORE` is
    the process's store; ``run_probe``, ``cached_support``,
    :func:`probe_origin` and ``probing`` are its doors.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._records: weakref.WeakKeyDictionary[Any, _Answers] = weakref.WeakKeyDictionary()
        # Backends that take no weak reference keep their records here.
        self._pinned: Dict[int, Tuple[Any, _Answers]] = {}
        self._activity = _Activity()

    def record(self, backend: Backend) -> _Answers:
        found = self.peek(backend)
        if found is not None:
            return found
        with self.lock:
            found = self.peek(backend)
            if found is None:
                found = _Answers()
                try:
                    self._records[backend] = found
                except TypeError:
                    self._pinned[id(backend)] = (backend, found)
            return found

    def peek(self, backend: Backend) -> Optional[_Answers]:
        try:
            return self._records.get(backend)
        except TypeError:
            pinned = self._pinned.get(id(backend))
            return None if pinned is None else pinned[1]

    def identify(
        self, backend: Backend, identity: Optional[Callable[[], Optional[Dict[str, Any]]]]
    ) -> None:
        """Say how to tell what identifies ``backend``'s code, so its answers may be kept on disk.

        ``identity`` is called when the disk cache is first used for the
        backend (and again after :meth:`forget`); it returns a JSON-able
        dict, or ``None`` for code that cannot be identified. ``None`` here
        (the default for any backend) keeps the answers in memory only.
        """
        record = self.record(backend)
        record.identity = identity
        record.keys = None

    def run(self, backend: Backend, capability: str) -> Support:
        """Run (or recall) the probe ``capability`` for ``backend``."""
        record = self.record(backend)
        found = record.memory.get(capability)
        if found is not None:
            return found
        if capability not in PROBES:
            valid = ", ".join(repr(c) for c in PROBES)
            raise ValueError(f"unknown capability {capability!r}; valid capabilities: {valid}")
        from . import _probe_cache

        stored = _probe_cache.recall(record, backend.name, capability, PROBES_VERSION)
        with self.lock:
            if capability not in record.memory:
                if stored is None:
                    self._activity.depth += 1
                    try:
                        support = _run_uncached(backend, capability)
                    finally:
                        self._activity.depth -= 1
                    _probe_cache.remember(record, backend.name, support, PROBES_VERSION)
                else:
                    support = Support(capability, *stored)
                record.memory[capability] = support
            return record.memory[capability]

    def cached(self, backend: Backend, capability: str) -> Optional[Support]:
        """The probe's answer if it has run for ``backend`` already; runs nothing."""
        record = self.peek(backend)
        return None if record is None else record.memory.get(capability)

    def origin(self, backend: Backend, capability: Optional[str] = None) -> Optional[str]:
        record = self.peek(backend)
        origins = {} if record is None else record.origin
        if capability is not None:
            return origins.get(capability)
        if not origins:
            return None
        return "run" if "run" in origins.values() else "cache"

    def probing(self) -> bool:
        return self._activity.depth > 0

    def forget(self, backend: Optional[Backend] = None) -> None:
        """Forget answers in memory (of one backend, or all); identities are kept."""
        with self.lock:
            records = [self.peek(backend)] if backend is not None else self._all()
            for record in records:
                if record is not None:
                    record.memory = {}
                    record.origin = {}
                    record.disk = None
                    record.keys = None

    def _all(self) -> list:
        return list(self._records.values()) + [pair[1] for pair in self._pinned.values()]


#: The process's probe answers.
STORE = ProbeStore()


def probing() -> bool:
    """Whether a probe is running in this thread.

    Backends use it to keep one-time notices (such as functorch's deprecation
    warning) for the user's own first call instead of spending them on a probe,
    whose warnings are hidden.
    """
    return STORE.probing()


def run_probe(backend: Backend, capability: str) -> Support:
    """Run (or recall) the probe ``capability`` for ``backend``."""
    return STORE.run(backend, capability)


def cached_support(backend: Backend, capability: str) -> Optional[Support]:
    """The probe's answer if it has run for ``backend`` already; runs nothing."""
    return STORE.cached(backend, capability)


def probe_origin(backend: Backend, capability: Optional[str] = None) -> Optional[str]:
    """Where ``backend``'s probe answers in this process came from.

    Parameters
    ----------
    backend : Backend
        The backend.
    capability : str, optional
        One probe; by default all of those answered so far.

    Returns
    -------
    str or None
        ``"cache"`` when every answer was read from the disk cache, ``"run"``
        when at least one probe ran in this process, ``None`` when no answer
        has been asked for yet.

    Examples
    --------
    >>> import adbackends
    >>> from adbackends.probes import probe_origin
    >>> probe_origin(adbackends.Backend()) is None
    True
    """
    return STORE.origin(backend, capability)


def clear_probe_cache(*, forget_loaded: bool = True) -> None:
    """Delete the probe cache file (and temporary files a crash left behind).

    Parameters
    ----------
    forget_loaded : bool
        Also forget the answers held in this process, so that probes run
        again when next needed. With ``False`` they are kept (and not
        written back to disk).

    Examples
    --------
    >>> import os, tempfile, adbackends
    >>> from adbackends._probe_cache import cache_file
    >>> from adbackends.probes import clear_probe_cache
    >>> names = ("ADBACKENDS_CACHE_DIR", "ADBACKENDS_NO_CACHE")
    >>> saved = {k: os.environ.pop(k, None) for k in names}
    >>> os.environ["ADBACKENDS_CACHE_DIR"] = tempfile.mkdtemp()
    >>> _ = adbackends.get("loop").supports("transforms")
    >>> clear_probe_cache()
    >>> os.path.exists(cache_file())
    False
    >>> del os.environ["ADBACKENDS_CACHE_DIR"]
    >>> os.environ.update({k: v for k, v in saved.items() if v is not None})
    """
    from . import _probe_cache

    _probe_cache.delete_files()
    if forget_loaded:
        STORE.forget()


def describe(capability: str) -> str:
    """One line saying what the probe ``capability`` checks."""
    return PROBES[capability].description


def _run_uncached(backend: Backend, capability: str) -> Support:
    import logging

    log = logging.getLogger("adbackends")
    try:
        with _pristine():
            PROBES[capability].check(backend)
    except Exception as exc:  # a failing probe is a result, not an error
        # A CapabilityError's own reason says what failed; its prefix names
        # whichever capability the backend attributed it to, which may not be
        # the one probed here.
        inner = getattr(exc, "reason", None)
        if isinstance(exc, CapabilityError) and inner:
            reason = str(inner)
        else:
            reason = summarize_exception(exc)
        log.debug("probe %s on backend %r failed: %s", capability, backend.name, reason)
        return Support(capability, False, reason)
    log.debug("probe %s on backend %r passed", capability, backend.name)
    return Support(capability, True, None)


@contextlib.contextmanager
def _pristine() -> Iterator[None]:
    """Run a probe in a fixed state and put every global setting back after."""
    import torch

    rng = RngState()
    grad = torch.is_grad_enabled()
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only_fn = getattr(torch, "is_deterministic_algorithms_warn_only_enabled", None)
    warn_only = warn_only_fn() if warn_only_fn is not None else False
    try:
        # catch_warnings restores the filters and keeps probe warnings (such
        # as functorch's deprecation notice) away from the user.
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("ignore")
            with torch.inference_mode(False):
                torch.set_grad_enabled(True)
                yield
    finally:
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        if warn_only_fn is not None:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        else:
            torch.use_deterministic_algorithms(deterministic)
        rng.restore()


# -- the probes ----------------------------------------------------------------


#: (rtol, atol) for a backend that states no ``tolerance``: exact up to rounding.
EXACT_TOLERANCE = (1e-10, 1e-12)

_TOLERANCE = threading.local()


def tolerance_of(backend: Any) -> Any:
    """The (rtol, atol) probes and the conformance kit compare ``backend`` with.

    Its stated ``Backend.tolerance`` for a backend approximate by design,
    else ``EXACT_TOLERANCE`` (1e-10, 1e-12); never tighter than that.
    """
    stated = getattr(backend, "tolerance", None)
    if stated is None:
        return EXACT_TOLERANCE
    return (max(float(stated[0]), EXACT_TOLERANCE[0]), max(float(stated[1]), EXACT_TOLERANCE[1]))


def _with_tolerance(check: Callable[[Backend], None]) -> Callable[[Backend], None]:
    """Run a probe with the backend's own tolerance in force for :func:`_close`."""

    def run(backend: Backend) -> None:
        before = getattr(_TOLERANCE, "value", None)
        _TOLERANCE.value = tolerance_of(backend)
        try:
            check(backend)
        finally:
            _TOLERANCE.value = before

    run.__name__ = getattr(check, "__name__", "probe")
    return run


def _close(actual: Any, expected: Any, what: str) -> None:
    import torch

    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}"
        )
    rtol, atol = getattr(_TOLERANCE, "value", None) or EXACT_TOLERANCE
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        within = "" if (rtol, atol) == EXACT_TOLERANCE else f" (rtol={rtol:g}, atol={atol:g})"
        raise AssertionError(f"{what}: wrong values{within}")


def _inputs() -> Any:
    import torch

    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    xs = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -3.0]], dtype=torch.float64)
    return x, xs


_FUNCTIONS: Dict[str, Any] = {}


def _cube_functions() -> Dict[str, Any]:
    """x**3 as custom autograd Functions, built once for the installed torch."""
    if _FUNCTIONS:
        return _FUNCTIONS
    import torch

    class LegacyCube(torch.autograd.Function):
        """ctx-style: ``forward(ctx, x)``."""

        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:  # type: ignore[override]
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return grad * 3 * x**2

    _FUNCTIONS["legacy"] = LegacyCube.apply

    if hasattr(torch.autograd.Function, "setup_context"):

        class Cube(torch.autograd.Function):
            """setup_context style with an explicit vmap rule (torch >= 2.0)."""

            @staticmethod
            def forward(x: Any) -> Any:  # type: ignore[override]
                return x**3

            @staticmethod
            def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
                ctx.save_for_backward(inputs[0])

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
                (x,) = ctx.saved_tensors
                return grad * 3 * x**2

            @staticmethod
            def vmap(info: Any, in_dims: Any, x: Any) -> Any:
                return Cube.apply(x), in_dims[0]

        _FUNCTIONS["modern"] = Cube.apply
    else:
        # Before torch 2.0 the ctx style is the only way to write a Function.
        _FUNCTIONS["modern"] = LegacyCube.apply
    return _FUNCTIONS


def _check_cube(backend: Backend, cube: Callable[[Any], Any]) -> None:
    import torch

    x, xs = _inputs()
    _close(backend.jacrev(cube)(x), torch.diag(3 * x**2), "jacrev")
    _close(backend.vmap(cube)(xs), xs**3, "vmap")
    _close(
        backend.vmap(backend.jacrev(cube))(xs),
        torch.diag_embed(3 * xs**2),
        "vmap(jacrev)",
    )


def _probe_custom_function(backend: Backend) -> None:
    _check_cube(backend, _cube_functions()["modern"])


def _probe_legacy_function(backend: Backend) -> None:
    _check_cube(backend, _cube_functions()["legacy"])


def _probe_transforms(backend: Backend) -> None:
    import torch

    _, xs = _inputs()
    calls: list = []

    def f(x: Any) -> Any:
        calls.append(None)
        return x.sin()

    _close(backend.vmap(f)(xs), xs.sin(), "vmap")
    if len(calls) != 1:
        raise AssertionError(
            f"vmap called the function {len(calls)} times for a batch of "
            f"{xs.shape[0]}: it loops instead of vectorising"
        )
    _close(backend.vmap(backend.jacrev(torch.sin))(xs), torch.diag_embed(xs.cos()), "vmap(jacrev)")


def _probe_higher_order(backend: Backend) -> None:
    import torch

    x, _ = _inputs()
    hessian = backend.jacrev(backend.jacrev(lambda t: t.sin().sum()))(x)
    _close(hessian, torch.diag(-x.sin()), "jacrev(jacrev)")
    # An inner transform over a closure of the outer variable must not
    # differentiate through it (perturbation confusion): d/dx [x] = I.
    nested = backend.jacrev(lambda u: backend.jacrev(lambda v: (u * v).sum())(u))(x)
    _close(nested, torch.eye(3, dtype=x.dtype), "nested jacrev over a closure")


def _probe_chunk_size(backend: Backend) -> None:
    import torch

    x, xs = _inputs()
    _close(backend.jacrev(torch.sin, chunk_size=1)(x), torch.diag(x.cos()), "jacrev(chunk_size=1)")
    _close(backend.jacrev(torch.sin, chunk_size=2)(x), torch.diag(x.cos()), "jacrev(chunk_size=2)")
    _close(backend.vmap(torch.sin, chunk_size=1)(xs), xs.sin(), "vmap(chunk_size=1)")


def _probe_randomness(backend: Backend) -> None:
    import torch

    base = torch.zeros(4, dtype=torch.float64)

    def noisy(x: Any) -> Any:
        return x + torch.rand((), dtype=torch.float64)

    same = backend.vmap(noisy, randomness="same")(base)
    if not bool((same == same[0]).all()):
        raise AssertionError("randomness='same' gave different draws per sample")
    different = backend.vmap(noisy, randomness="different")(base)
    if len(set(different.tolist())) != len(different):
        raise AssertionError("randomness='different' repeated a draw")
    try:
        backend.vmap(noisy, randomness="error")(base)
    except RuntimeError:
        pass
    else:
        raise AssertionError("randomness='error' did not raise on a random operation")


_FORWARD: Dict[str, Any] = {}


def _forward_cube() -> Any:
    """x**3 as a custom Function with a jvp rule (and backward, and a vmap rule).

    setup_context style on torch >= 2.0; before that, ctx style, the only
    style that torch has (forward-mode rules for it arrived in torch 1.11).
    """
    if _FORWARD:
        return _FORWARD["cube"]
    import torch

    if hasattr(torch.autograd.Function, "setup_context"):

        class ForwardCube(torch.autograd.Function):
            @staticmethod
            def forward(x: Any) -> Any:  # type: ignore[override]
                return x**3

            @staticmethod
            def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
                ctx.save_for_backward(inputs[0])
                ctx.save_for_forward(inputs[0])

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
                (x,) = ctx.saved_tensors
                return grad * 3 * x**2

            @staticmethod
            def jvp(ctx: Any, tangent: Any) -> Any:
                (x,) = ctx.saved_tensors
                return tangent * 3 * x**2

            @staticmethod
            def vmap(info: Any, in_dims: Any, x: Any) -> Any:
                return ForwardCube.apply(x), in_dims[0]

        _FORWARD["cube"] = ForwardCube.apply
    else:

        class LegacyForwardCube(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any) -> Any:  # type: ignore[override]
                ctx.save_for_backward(x)
                ctx.save_for_forward(x)
                return x**3

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:  # type: ignore[override]
                (x,) = ctx.saved_tensors
                return grad * 3 * x**2

            @staticmethod
            def jvp(ctx: Any, tangent: Any) -> Any:
                (x,) = ctx.saved_tensors
                return tangent * 3 * x**2

        _FORWARD["cube"] = LegacyForwardCube.apply
    return _FORWARD["cube"]


def _probe_forward_mode(backend: Backend) -> None:
    import torch

    x, _ = _inputs()
    v = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    out, tangent = backend.jvp(torch.sin, (x,), (v,))
    _close(out, x.sin(), "jvp(sin) output")
    _close(tangent, x.cos() * v, "jvp(sin)")
    _close(backend.jacfwd(torch.sin)(x), torch.diag(x.cos()), "jacfwd(sin)")
    cube = _forward_cube()
    out, tangent = backend.jvp(cube, (x,), (v,))
    _close(out, x**3, "jvp output of a Function with a jvp rule")
    _close(tangent, 3 * x**2 * v, "jvp through a Function with a jvp rule")
    _close(backend.jacfwd(cube)(x), torch.diag(3 * x**2), "jacfwd through a Function")


def _probe_hessian(backend: Backend) -> None:
    import torch

    x, _ = _inputs()
    y = torch.tensor([1.5, -0.5], dtype=torch.float64)
    _close(backend.hessian(lambda t: t.sin().sum())(x), torch.diag(-x.sin()), "hessian")
    # f(a, b) = sum(a**2) * sum(b): blocks [[2 sum(b) I, 2a 1^T], [2 1 a^T, 0]].
    blocks = backend.hessian(lambda a, b: (a**2).sum() * b.sum(), argnums=(0, 1))(x, y)
    expected = (
        (2 * y.sum() * torch.eye(3, dtype=x.dtype), (2 * x)[:, None].expand(3, 2)),
        ((2 * x)[None, :].expand(2, 3), torch.zeros(2, 2, dtype=x.dtype)),
    )
    if not (isinstance(blocks, tuple) and all(isinstance(row, tuple) for row in blocks)):
        raise AssertionError(
            f"hessian(argnums=(0, 1)): expected a tuple of tuples, got {type(blocks).__name__}"
        )
    if [len(row) for row in blocks] != [2, 2]:
        raise AssertionError("hessian(argnums=(0, 1)): expected 2 x 2 blocks")
    for i in range(2):
        for j in range(2):
            _close(blocks[i][j], expected[i][j], f"hessian(argnums=(0, 1))[{i}][{j}]")


#: Every probe, in report order: name -> what it checks.
PROBES: Dict[str, _Probe] = {
    "custom_function": _Probe(
        "a setup_context-style autograd.Function with a vmap rule (ctx style "
        "before torch 2.0) under jacrev, vmap and vmap(jacrev)",
        _with_tolerance(_probe_custom_function),
    ),
    "legacy_function": _Probe(
        "a ctx-style autograd.Function (forward(ctx, x)) under jacrev, vmap and vmap(jacrev)",
        _with_tolerance(_probe_legacy_function),
    ),
    "transforms": _Probe(
        "native composable transforms: vmap calls the function once for a "
        "whole batch, and vmap(jacrev) works",
        _with_tolerance(_probe_transforms),
    ),
    "higher_order": _Probe(
        "jacrev(jacrev(f)) gives the Hessian, without perturbation confusion",
        _with_tolerance(_probe_higher_order),
    ),
    "chunk_size": _Probe(
        "jacrev and vmap accept chunk_size and give identical results",
        _with_tolerance(_probe_chunk_size),
    ),
    "randomness": _Probe(
        "vmap honours randomness='same', 'different' and 'error'",
        _with_tolerance(_probe_randomness),
    ),
    "forward_mode": _Probe(
        "jvp and jacfwd of sin, and through a custom autograd.Function with a jvp rule "
        "(setup_context style; ctx style before torch 2.0)",
        _with_tolerance(_probe_forward_mode),
    ),
    "hessian": _Probe(
        "hessian(f) gives the analytic Hessian, nested [i][j] for tuple argnums",
        _with_tolerance(_probe_hessian),
    ),
}
