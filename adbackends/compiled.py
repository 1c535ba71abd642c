"""The compiled tier: ``torch.compile`` over a native transform, checked before it is trusted.

Selected as the head of a chain, ``torch.compile>torch.func>loop``
(``use("torch.func", fallback="loop", compile=True)`` is the same), a
:class:`CompiledBackend` builds each transform twice: the *eager* one, on
the rest of the chain (``torch.func>loop``, with its per-call fallback), and
the *target*, the next backend's own transform (``torch.func.jacrev(f)``),
which it hands to ``torch.compile(..., fullgraph=True)``.

Per built transform it keeps *variants*, one per call signature (shapes,
dtypes, devices and ``requires_grad`` of the tensor arguments, the other
arguments' values, grad mode). A variant runs eagerly for its first
:data:`settings.threshold <Settings.threshold>` calls, timing them; the next
call compiles it (once, whatever the number of threads calling), runs both
and compares the results (structure, shapes, dtypes, devices,
``requires_grad``, values within the tolerance). The next
:data:`settings.trials <Settings.trials>` calls run compiled and are timed;
the variant stays compiled only if it is faster than eager by
:data:`settings.margin <Settings.margin>`, else it runs eagerly for good.

An exception while compiling or running compiled code (a graph break under
``fullgraph=True`` among them), a result that differs from eager, or a result
that carries an autograd graph (it would be differentiated through compiled
code) makes the *function* eager for good: it is recorded as a fallback
(:func:`adbackends.fallbacks` lists it, one :class:`~adbackends.FallbackWarning`
says why) and the call that found it returns the eager result.

Some calls are never compiled and run the eager transform at once: inside
another transform (a chain's native call, a ``torch.func`` transform, code
being compiled), in grad mode with an argument that requires grad (the result
would be differentiated again), where this torch or machine cannot compile
(:func:`support`), and the patterns that upstream PyTorch gets wrong
(:data:`UPSTREAM`). :func:`adbackends.compilations` lists every variant and its state.

Nothing here runs at ``import adbackends``; ``torch._dynamo`` is imported at
the first compilation. No global dynamo or inductor setting is changed: each
compilation passes its options to ``torch.compile``.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
import types
from types import FunctionType
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from . import fallback as _fallback
from ._shared import ArgNums, RngState, summarize_exception
from .backend import Backend, Refusal

__all__ = [
    "COMPILE",
    "UPSTREAM",
    "Compilation",
    "CompiledBackend",
    "Settings",
    "compilations",
    "settings",
    "support",
]

log = logging.getLogger("adbackends")

#: The name of the compiled tier as a chain head.
COMPILE = "torch.compile"

#: The upstream PyTorch reports behind each pattern this tier never compiles,
#: and what happens instead. Checked on torch 2.13 (docs/compiled.rst).
UPSTREAM: Dict[str, str] = {
    "double_backward": (
        "differentiating through compiled code again is not supported "
        "(pytorch#91469, #181581, #183603)"
    ),
    "inside_transform": (
        "transforming compiled code is not supported, only compiling a transform "
        "(pytorch#100320, #128736, #138422)"
    ),
    "hessian_of_hessian": "compile(hessian(hessian(f))) fails (pytorch#154284)",
    "vmap_of_hessian": (
        "compile(vmap(hessian(f))) fails (pytorch#183015); compiled as "
        "vmap(jacrev(jacrev(f))) instead"
    ),
    "vmap_of_jacfwd": (
        "compile(vmap(jacfwd(f))) failed (pytorch#151196); it works on torch 2.13, so it "
        "is tried, and a failure is caught by the check"
    ),
    "vmap_of_aux": (
        "compile(vmap(g)) with jacrev(has_aux=True) in g changed shapes (pytorch#154036); "
        "not reproduced on torch 2.13 without a compile inside the vmap, so it is tried: "
        "a shape is the same for every call of a signature, and the check compares it"
    ),
    "trace": (
        "compiled second derivatives of a function calling torch.trace add a constant "
        "to every entry (pytorch#190855)"
    ),
}


class Settings:
    """The knobs of the compiled tier (process-wide; read at each decision).

    Attributes
    ----------
    threshold : int
        Eager calls with one signature before it is compiled (default 3).
    trials : int
        Compiled calls timed before the variant is kept or given up (default 3).
    margin : float
        A variant is kept when its fastest compiled call takes at most
        ``margin`` times the fastest eager one (default 0.95).
    max_variants : int
        Signatures compiled per function; later ones run eagerly (default 8).
    backend : str
        ``torch.compile``'s backend (default ``"inductor"``).
    mode : str or None
        ``torch.compile``'s mode (default ``None``).
    tolerance : tuple of float or None
        ``(rtol, atol)`` for the check; ``None`` picks one by dtype.
    """

    def __init__(self) -> None:
        self.threshold = 3
        self.trials = 3
        self.margin = 0.95
        self.max_variants = 8
        self.backend: Any = "inductor"
        self.mode: Optional[str] = None
        self.tolerance: Optional[Tuple[float, float]] = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"Settings({fields})"


#: The process-wide settings of the compiled tier.
settings = Settings()


class Compilation(NamedTuple):
    """One variant of a compiled transform, as :func:`adbackends.compilations` lists it.

    Attributes
    ----------
    function : str
        The transform and function (``"jacrev(jacrev(energy))"``).
    signature : str
        The argument shapes and dtypes of the variant.
    state : str
        ``"counting"`` (eager, not yet called often enough), ``"trial"``
        (compiled, being timed), ``"compiled"``, or ``"eager"`` (given up).
    reason : str
        Why the state is what it is.
    calls : int
        Calls of this variant so far.
    compile_s : float
        Seconds spent compiling it (0 where it was not compiled).
    eager_us, compiled_us : float
        The fastest timed eager and compiled calls, in microseconds (0 where
        none was timed).
    """

    function: str
    signature: str
    state: str
    reason: str
    calls: int
    compile_s: float
    eager_us: float
    compiled_us: float


# -- can this process compile at all -----------------------------------------------------

_support_lock = threading.Lock()
_support: Optional[Tuple[bool, str]] = None


def support() -> Tuple[bool, str]:
    """Whether ``torch.compile`` can be used here, and why (cached per process).

    Cheap: the torch version (>= 2.1) and, for inductor on CPU, a C++
    compiler on the ``PATH``. The first real compilation is the rest of the
    check: if it fails for want of a working toolchain, compilation is
    switched off for the process (see :func:`adbackends.compilations`).
    """
    global _support
    found = _support
    if found is not None:
        return found
    with _support_lock:
        if _support is None:
            _support = _check_support()
        return _support


def _check_support() -> Tuple[bool, str]:
    import torch

    version = tuple(int(p) for p in _leading_digits(torch.__version__).split(".")[:2])
    if version < (2, 1):
        return (
            False,
            f"torch {torch.__version__} is older than 2.1: compiling torch.func transforms "
            "needs torch >= 2.1",
        )
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile"
    if settings.backend == "inductor":
        compilers = ("g++", "c++", "clang++", "cl")
        found = next((c for c in compilers if shutil.which(c)), None)
        if found is None:
            return False, (
                "no C++ compiler on the PATH (inductor needs one on CPU: g++, c++ or "
                "clang++); install one or set adbackends.compiled.settings.backend"
            )
        return True, f"torch {torch.__version__}, inductor with {found}"
    return True, f"torch {torch.__version__}, backend {settings.backend!r}"


def _leading_digits(version: str) -> str:
    out = []
    for ch in version:
        if ch.isdigit() or ch == ".":
            out.append(ch)
        else:
            break
    return "".join(out) or "0"


def _switch_off(reason: str) -> None:
    global _support
    with _support_lock:
        _support = (False, reason)
    log.warning("adbackends: torch.compile switched off for this process: %s", reason)


def _reset_support() -> None:
    global _support
    with _support_lock:
        _support = None


def reset() -> None:
    """Forget what the tier knows in this process: the support check, every
    variant of every transform built (each is counted, compiled and checked
    again), the builds kept for callables without a ``__dict__``, and the
    settings."""
    global _side_weak
    _reset_support()
    with _registry_lock:
        for ref in _transforms:
            state = ref()
            if state is not None:
                with state.lock:
                    state.variants = {}
                    state.failed = False
                    state.per_call = {}
    with _side_lock:
        _side_weak = None
        _side_strong.clear()
    settings.__init__()  # type: ignore[misc]


# -- per-call conditions -------------------------------------------------------------------

_interpreter_stack: Any = None


def _inside_transform() -> bool:
    """Inside a torch.func transform or code being compiled."""
    global _interpreter_stack
    peek = _interpreter_stack
    if peek is None:
        import torch

        functorch = getattr(torch._C, "_functorch", None)
        peek = getattr(functorch, "peek_interpreter_stack", None) or (lambda: None)
        _interpreter_stack = peek
    if peek() is not None:
        return True
    import torch

    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _leaves(tree: Any) -> Tuple[List[Any], Any]:
    from torch.utils._pytree import tree_flatten

    return tree_flatten(tree)  # type: ignore[no-any-return]


def _signature(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Optional[Any], bool]:
    """``(signature, grad_needed)`` of a call; ``signature`` ``None`` where it cannot be keyed."""
    import torch

    tensor = torch.Tensor
    grad_on = torch.is_grad_enabled()
    # Global modes that change what a call computes or how it is traced.
    parts: List[Any] = [(grad_on, torch.is_inference_mode_enabled(), torch.get_default_dtype())]
    needs = False
    if not kwargs and all(type(a) is tensor for a in args):
        for a in args:
            rg = a.requires_grad
            needs = needs or rg
            parts.append((a.shape, a.dtype, a.device, rg))
        return tuple(parts), grad_on and needs
    leaves, spec = _leaves((args, kwargs))
    parts.append(spec)
    for leaf in leaves:
        if isinstance(leaf, tensor):
            if type(leaf) is not tensor:  # a subclass: its own dispatch, not compiled
                return None, False
            rg = leaf.requires_grad
            needs = needs or rg
            parts.append((leaf.shape, leaf.dtype, leaf.device, rg))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None, False
            parts.append((type(leaf), leaf))
    return tuple(parts), grad_on and needs


def _describe(signature: Any) -> str:
    out = []
    for part in signature[1:]:
        if isinstance(part, tuple) and len(part) == 4:
            shape, dtype, device, rg = part
            text = f"{str(dtype).replace('torch.', '')}{list(shape)}"
            if device.type != "cpu":
                text += f"@{device}"
            out.append(text + ("*" if rg else ""))
        elif isinstance(part, tuple) and len(part) == 2:
            out.append(repr(part[1]))
    return ", ".join(out)


# -- the check -------------------------------------------------------------------------------


def _tolerance(dtype: Any) -> Tuple[float, float]:
    import torch

    if settings.tolerance is not None:
        return settings.tolerance
    if dtype in (torch.float64, torch.complex128):
        return 1e-7, 1e-9
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2, 1e-3
    return 1.3e-5, 1e-6


def _difference(eager: Any, compiled: Any) -> Optional[str]:
    """Why ``compiled`` is not ``eager`` (``None`` when it is, within the tolerance)."""
    import torch

    le, se = _leaves(eager)
    lc, sc = _leaves(compiled)
    if se != sc:
        return f"the result's structure differs: {sc} instead of {se}"
    for i, (a, b) in enumerate(zip(le, lc)):
        where = f"output {i}"
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"{where} is a {type(b).__name__} instead of a {type(a).__name__}"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return f"{where} is {b!r} instead of {a!r}"
            continue
        for what in ("shape", "dtype", "device", "requires_grad"):
            if getattr(a, what) != getattr(b, what):
                return f"{where} has {what} {getattr(b, what)} instead of {getattr(a, what)}"
        if (a.grad_fn is None) != (b.grad_fn is None):
            return f"{where} {'has' if b.grad_fn is not None else 'lacks'} a grad_fn, unlike eager"
        rtol, atol = _tolerance(a.dtype)
        x, y = a.detach(), b.detach()
        if x.is_floating_point() or x.is_complex():
            same = bool(torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True))
        else:
            same = bool(torch.equal(x, y))
        if not same:
            worst = float((x - y).abs().max()) if x.numel() else 0.0
            return f"{where} differs from eager by up to {worst:.3g} (rtol={rtol}, atol={atol})"
    return None


def _carries_graph(result: Any) -> bool:
    import torch

    leaves, _ = _leaves(result)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)


# -- compiling -----------------------------------------------------------------------------

_trampoline_lock = threading.Lock()
_trampolines = 0


def _trampoline(target: Callable[..., Any]) -> Callable[..., Any]:
    """``target`` behind a function with code of its own.

    Dynamo keeps its compiled code, and counts recompilations, per code
    object. Every ``torch.func.jacrev(f)`` shares one wrapper code object,
    so compiling them directly would pile every function's variants onto it
    and reach dynamo's recompile limit. A fresh code object per variant
    keeps each one separate.
    """
    global _trampolines

    def entry(*args: Any, **kwargs: Any) -> Any:
        return target(*args, **kwargs)

    with _trampoline_lock:
        _trampolines += 1
        number = _trampolines
    code = entry.__code__.replace(co_name=f"adbackends_compiled_{number}")
    fresh = types.FunctionType(
        code, entry.__globals__, code.co_name, entry.__defaults__, entry.__closure__
    )
    return fresh


def _compile(target: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(target)`` with this tier's options (a seam for tests)."""
    import torch

    kwargs: Dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": settings.backend}
    if settings.mode is not None:
        kwargs["mode"] = settings.mode
    return torch.compile(_trampoline(target), **kwargs)  # type: ignore[no-any-return]


def _toolchain_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(
        word in text
        for word in ("CppCompileError", "InvalidCxxCompiler", "C++ compile error", "cannot find -l")
    )


# -- the variants -----------------------------------------------------------------------

COUNTING, READY, TRIAL, COMPILED, EAGER = "counting", "ready", "trial", "compiled", "eager"


class _Variant:
    __slots__ = (
        "calls",
        "compile_s",
        "compiled",
        "compiled_times",
        "eager_times",
        "lock",
        "reason",
        "signature",
        "state",
    )

    def __init__(self, signature: Any, state: str = COUNTING, reason: str = "") -> None:
        self.signature = signature
        self.state = state
        self.reason = reason or f"eager until {settings.threshold} calls with this signature"
        self.calls = 0
        self.compile_s = 0.0
        self.compiled: Optional[Callable[..., Any]] = None
        self.eager_times: List[float] = []
        self.compiled_times: List[float] = []
        self.lock = threading.Lock()


class _Transform:
    """The state of one built transform: its variants, and whether it failed."""

    __slots__ = ("__weakref__", "failed", "func", "label", "lock", "per_call", "variants")

    def __init__(self, label: str, func: Any) -> None:
        self.label = label
        self.func = func
        self.variants: Dict[Any, _Variant] = {}
        self.lock = threading.Lock()
        self.failed = False
        self.per_call: Dict[str, int] = {}


_registry_lock = threading.Lock()
_transforms: List[Any] = []  # weak references to every _Transform


def compilations(transform: Optional[Callable[..., Any]] = None) -> List[Compilation]:
    """Every variant of every compiled transform in this process, and its state.

    Calls that were never compiled for a per-call reason (inside another
    transform, grad-requiring arguments) are listed as one ``"eager"`` row
    per reason, with signature ``"*"``.

    Parameters
    ----------
    transform : callable, optional
        A transform built under the compiled tier (``adbackends.jacrev(f)``):
        list its variants only.

    Examples
    --------
    >>> import adbackends
    >>> isinstance(adbackends.compilations(), list)
    True
    """
    if transform is not None:
        alive = [getattr(transform, "__adbackends_state__", None)]
    else:
        with _registry_lock:
            alive = [ref() for ref in _transforms]
            _transforms[:] = [ref for ref, t in zip(list(_transforms), alive) if t is not None]
    rows: List[Compilation] = []
    for t in alive:
        if t is None:
            continue
        with t.lock:
            variants = list(t.variants.values())
            per_call = dict(t.per_call)
        for v in variants:
            rows.append(
                Compilation(
                    t.label,
                    _describe(v.signature) if v.signature is not None else "*",
                    COUNTING if v.state == READY else v.state,
                    v.reason,
                    v.calls,
                    round(v.compile_s, 3),
                    round(min(v.eager_times) * 1e6, 1) if v.eager_times else 0.0,
                    round(min(v.compiled_times) * 1e6, 1) if v.compiled_times else 0.0,
                )
            )
        for reason, calls in per_call.items():
            rows.append(Compilation(t.label, "*", EAGER, reason, calls, 0.0, 0.0, 0.0))
    return rows


_prune_at = 1024


def _track(t: _Transform) -> None:
    """Remember ``t`` for :func:`compilations`, weakly; dead entries are pruned as it grows.

    A transform built anew on every call (of a lambda defined in a loop) adds
    one entry per call: the list is pruned whenever it has doubled.
    """
    global _prune_at
    import weakref

    with _registry_lock:
        _transforms.append(weakref.ref(t))
        if len(_transforms) >= _prune_at:
            _transforms[:] = [ref for ref in _transforms if ref() is not None]
            _prune_at = max(1024, 2 * len(_transforms))


# -- the backend ------------------------------------------------------------------------

_MARK = "__adbackends_compiled__"
_BUILT = "__adbackends_compiled_built__"
_BUILT_MAX = 32


class _Info(NamedTuple):
    transform: str
    func: Any
    args: Tuple[Any, ...]
    target: Callable[..., Any]  # the native transform this wrapper would compile


#: How many derivatives each transform takes (for the torch.trace pattern).
_DERIVATIVES = {"jacrev": 1, "jacfwd": 1, "grad": 1, "grad_and_value": 1, "hessian": 2}


class CompiledBackend(_fallback.LinkedBackend):
    """``torch.compile`` over ``native``'s transforms, with ``rest`` as the eager path.

    ``rest`` is the rest of the chain (``torch.func>loop``); ``native`` the
    backend whose transforms are compiled (its first link, ``torch.func``).
    """

    origin = "chain"

    def __init__(self, native: Backend, rest: Backend) -> None:
        self.native_backend = native
        self.fallback_backend = rest
        self.name = f"{COMPILE}>{rest.name}"
        self._names = (COMPILE, rest.name)

    def relinked(self, native: Backend, fallback: Backend) -> CompiledBackend:
        return CompiledBackend(native, fallback)

    @property
    def version(self) -> str:
        import torch

        return f"torch.compile {torch.__version__} > {self.fallback_backend.version}"

    def __repr__(self) -> str:
        return f"<adbackends compiled tier {self.name!r}: then {self.fallback_backend!r}>"

    def explain_compiled(self) -> str:
        """What :func:`adbackends.explain` adds: what this tier compiles, and whether it can."""
        ok, why = support()
        rows = compilations()
        kept = sum(1 for r in rows if r.state == "compiled")
        if not ok:
            rest = self.fallback_backend.name
            return f"torch.compile is not usable here ({why}): every call runs {rest}"
        return (
            f"torch.compile over {self.native_backend.name}'s transforms ({why}) after "
            f"{settings.threshold} calls with one signature, kept where checked and faster "
            f"({kept} variant(s) compiled so far; adbackends.compilations() lists each and why), "
            f"{self.fallback_backend.name} eagerly otherwise"
        )

    # -- the transforms -----------------------------------------------------------------

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        def make(backend: Backend, f: Callable[..., Any]) -> Callable[..., Any]:
            return backend.jacrev(
                f,
                argnums,
                has_aux=has_aux,
                chunk_size=chunk_size,
                _preallocate_and_copy=_preallocate_and_copy,
            )

        return self._tier(
            "jacrev", func, make, (argnums, has_aux, chunk_size, _preallocate_and_copy)
        )

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        def make(backend: Backend, f: Callable[..., Any]) -> Callable[..., Any]:
            return backend.vmap(f, in_dims, out_dims, randomness, chunk_size=chunk_size)

        refused = None
        if randomness != "error":
            refused = "vmap with randomness: compiled code draws other random numbers"
        return self._tier("vmap", func, make, (in_dims, out_dims, randomness, chunk_size), refused)

    def grad(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        def make(backend: Backend, f: Callable[..., Any]) -> Callable[..., Any]:
            return backend.grad(f, argnums, has_aux)

        return self._tier("grad", func, make, (argnums, has_aux))

    def grad_and_value(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        def make(backend: Backend, f: Callable[..., Any]) -> Callable[..., Any]:
            return backend.grad_and_value(f, argnums, has_aux)

        return self._tier("grad_and_value", func, make, (argnums, has_aux))

    def jacfwd(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        has_aux: bool = False,
        *,
        randomness: str = "error",
    ) -> Callable[..., Any]:
        def make(backend: Backend, f: Callable[..., Any]) -> Callable[..., Any]:
            return backend.jacfwd(f, argnums, has_aux, randomness=randomness)

        refused = None
        if randomness != "error":
            refused = "jacfwd with randomness: compiled code draws other random numbers"
        return self._tier("jacfwd", func, make, (argnums, has_aux, randomness), refused)

    def hessian(self, func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
        def make(backend: Backend, f: Callable[..., Any]) -> Callable[..., Any]:
            if backend is self.native_backend:
                # Reverse over reverse: the safe form under compile (pytorch#183015),
                # whatever the Hessian strategy; the values are the same.
                return backend.jacrev(backend.jacrev(f, argnums), argnums)
            return backend.hessian(f, argnums)

        return self._tier("hessian", func, make, (argnums,))

    # vjp, jvp and linearize compute at once: there is no transform to reuse
    # across calls, so they run eagerly on the rest of the chain.

    def vjp(self, func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
        return self.fallback_backend.vjp(_eager_of(func), *primals, has_aux=has_aux)

    def jvp(
        self,
        func: Callable[..., Any],
        primals: Any,
        tangents: Any,
        *,
        strict: bool = False,
        has_aux: bool = False,
    ) -> Any:
        return self.fallback_backend.jvp(
            _eager_of(func), primals, tangents, strict=strict, has_aux=has_aux
        )

    def linearize(self, func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
        return self.fallback_backend.linearize(_eager_of(func), *primals)

    # -- the mechanism -------------------------------------------------------------

    def _static_refusal(self, transform: str, func: Any) -> Optional[str]:
        """The upstream pattern that rules out compiling ``transform(func)``, if any."""
        info: Optional[_Info] = getattr(func, _MARK, None)
        if info is not None:
            inner = info.transform
            if transform == "hessian" and inner == "hessian":
                return UPSTREAM["hessian_of_hessian"]
        # Second (or higher) derivatives of a function whose code calls torch.trace.
        order = _DERIVATIVES.get(transform, 0)
        innermost = func
        while info is not None:
            order += _DERIVATIVES.get(info.transform, 0)
            innermost = info.func
            info = getattr(innermost, _MARK, None)
        if order >= 2 and _uses(innermost, "trace"):
            return UPSTREAM["trace"]
        return None

    def _tier(
        self,
        transform: str,
        func: Callable[..., Any],
        make: Callable[[Backend, Callable[..., Any]], Callable[..., Any]],
        args: Tuple[Any, ...],
        refused: Optional[str] = None,
    ) -> Callable[..., Any]:
        build_key: Any = None
        built: Optional[Dict[Any, Any]] = None
        if type(func) is FunctionType or _side_store(func) is not None:
            # func is in the key: functools.wraps copies a function's __dict__, so
            # torch.func.jacrev(f) shares f's dict of builds.
            build_key = (self, transform, func, args)
            built = _built_of(func, create=False)
            if built is not None:
                try:
                    found = built.get(build_key)
                except TypeError:  # unhashable arguments
                    build_key = None
                else:
                    if found is not None:
                        return found  # type: ignore[no-any-return]
        eager = make(self.fallback_backend, _eager_of(func))
        info: Optional[_Info] = getattr(func, _MARK, None)
        inner = info.target if info is not None else func
        if refused is None:
            refused = self._static_refusal(transform, func)
        if (
            refused is None
            and transform == "vmap"
            and info is not None
            and info.transform == "hessian"
        ):
            log.debug("compiled tier: %s", UPSTREAM["vmap_of_hessian"])
        target = make(self.native_backend, inner)
        from .fallback import _identity, _label

        key = (self._names, transform, _identity(func))
        label = f"{transform}({_label(func)})"
        state = _Transform(label, func)
        tier = self

        if refused is not None:
            state.variants[None] = _Variant(None, EAGER, refused)
            _track(state)

            def never(*a: Any, **k: Any) -> Any:
                return eager(*a, **k)

            call = never
        else:
            _track(state)

            def call(*a: Any, **k: Any) -> Any:
                return tier._call(state, key, eager, target, a, k)

        # Name and docstring of func, not its __dict__ (that holds func's own builds).
        functools.update_wrapper(call, func, updated=())
        call.__adbackends_state__ = state  # type: ignore[attr-defined]
        call.__adbackends_chain__ = (key, transform, func)  # type: ignore[attr-defined]
        setattr(call, _MARK, _Info(transform, func, args, target))
        call.__adbackends_eager__ = eager  # type: ignore[attr-defined]
        if build_key is not None:
            try:
                if built is None:
                    built = _built_of(func, create=True)
                if built is not None and len(built) < _BUILT_MAX:
                    built[build_key] = call
            except TypeError:
                pass
        return call

    def _call(
        self,
        state: _Transform,
        key: Any,
        eager: Callable[..., Any],
        target: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Any:
        if state.failed:
            if key in _fallback.LOG.records:
                return eager(*args, **kwargs)
            self._forget(state)  # forget_fallbacks() since: try again
        if _fallback.LOG.running.depth or _inside_transform():
            return self._per_call(state, eager, args, kwargs, UPSTREAM["inside_transform"])
        signature, grad_needed = _signature(args, kwargs)
        if grad_needed:
            return self._per_call(state, eager, args, kwargs, UPSTREAM["double_backward"])
        if signature is None:
            return self._per_call(
                state,
                eager,
                args,
                kwargs,
                "arguments that cannot be keyed (a tensor subclass, unhashable values)",
            )
        variant = state.variants.get(signature)
        if variant is None:
            variant = self._new_variant(state, signature)
        variant.calls += 1
        now = variant.state
        if now == COMPILED:
            try:
                return variant.compiled(*args, **kwargs)  # type: ignore[misc]
            except Exception as exc:
                return self._late_failure(state, key, variant, eager, args, kwargs, exc)
        if now == EAGER:
            return eager(*args, **kwargs)
        if now == COUNTING:
            start = time.perf_counter()
            result = eager(*args, **kwargs)
            variant.eager_times.append(time.perf_counter() - start)
            if len(variant.eager_times) >= settings.threshold:
                variant.state = READY
            return result
        if now == TRIAL:
            start = time.perf_counter()
            try:
                result = variant.compiled(*args, **kwargs)  # type: ignore[misc]
            except Exception as exc:
                return self._late_failure(state, key, variant, eager, args, kwargs, exc)
            variant.compiled_times.append(time.perf_counter() - start)
            if len(variant.compiled_times) >= settings.trials:
                self._decide(variant)
            return result
        # READY: one thread compiles; the others run eagerly meanwhile.
        if not variant.lock.acquire(blocking=False):
            return eager(*args, **kwargs)
        try:
            if variant.state != READY:
                return self._call(state, key, eager, target, args, kwargs)
            return self._compile_and_check(state, key, variant, eager, target, args, kwargs)
        finally:
            variant.lock.release()

    def _late_failure(
        self,
        state: _Transform,
        key: Any,
        variant: _Variant,
        eager: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        exc: Exception,
    ) -> Any:
        """Checked compiled code raised on a later call (a recompilation that failed, say).

        The eager transform answers the call; an error of its own is the
        caller's. Only when eager succeeds is the compiled code given up.
        """
        result = eager(*args, **kwargs)
        self._fail(
            state,
            key,
            variant,
            Refusal(
                "compile_error",
                f"compiled code raised on a later call: {summarize_exception(exc)}",
                "select the chain without torch.compile for it",
            ),
        )
        return result

    def _per_call(
        self,
        state: _Transform,
        eager: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        reason: str,
    ) -> Any:
        counts = state.per_call
        counts[reason] = counts.get(reason, 0) + 1
        return eager(*args, **kwargs)

    def _new_variant(self, state: _Transform, signature: Any) -> _Variant:
        with state.lock:
            variant = state.variants.get(signature)
            if variant is not None:
                return variant
            ok, why = support()
            live = sum(1 for v in state.variants.values() if v.state != EAGER)
            if not ok:
                variant = _Variant(signature, EAGER, f"torch.compile is not usable here: {why}")
            elif live >= settings.max_variants:
                variant = _Variant(
                    signature,
                    EAGER,
                    f"recompile limit: {settings.max_variants} signatures of this function "
                    "are compiled already (adbackends.compiled.settings.max_variants)",
                )
                log.info("compiled tier: %s: %s", state.label, variant.reason)
            else:
                variant = _Variant(signature)
            state.variants[signature] = variant
            return variant

    def _compile_and_check(
        self,
        state: _Transform,
        key: Any,
        variant: _Variant,
        eager: Callable[..., Any],
        target: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Any:
        before = RngState()
        start = time.perf_counter()
        expected = eager(*args, **kwargs)
        variant.eager_times.append(time.perf_counter() - start)
        after = RngState()
        if self._rest_fell_back(key):
            self._give_up(variant, "the rest of the chain falls back for it: nothing to compile")
            return expected
        if _carries_graph(expected):
            self._fail(
                state,
                key,
                variant,
                Refusal(
                    "grad_graph",
                    "its result carries an autograd graph (a closed-over tensor requires grad): "
                    + UPSTREAM["double_backward"],
                    "detach the tensors it closes over, or pass them as arguments",
                ),
            )
            return expected
        before.restore()
        start = time.perf_counter()
        try:
            compiled = _compile(target)
            got = compiled(*args, **kwargs)
        except Exception as exc:  # any failure of compiled code: eager for good
            after.restore()
            variant.compile_s = time.perf_counter() - start
            text = summarize_exception(exc)
            if _toolchain_failure(exc):
                _switch_off(f"the first compilation failed: {text}")
            kind = "graph_break" if "Unsupported" in type(exc).__name__ else "compile_error"
            self._fail(
                state,
                key,
                variant,
                Refusal(
                    kind,
                    f"torch.compile(fullgraph=True) failed: {text}",
                    "remove the graph break or unsupported operation "
                    "(torch._dynamo.explain shows it), or select the chain without torch.compile",
                ),
            )
            return expected
        variant.compile_s = time.perf_counter() - start
        after.restore()
        difference = _difference(expected, got)
        if difference is not None:
            self._fail(
                state,
                key,
                variant,
                Refusal(
                    "mismatch",
                    f"its compiled result is not the eager one: {difference}",
                    "report it to PyTorch with the function; the eager result is used",
                ),
            )
            return expected
        variant.compiled = compiled
        variant.state = TRIAL
        variant.reason = "compiled and checked; being timed against eager"
        log.info(
            "compiled tier: %s [%s] compiled in %.2f s and checked",
            state.label,
            _describe(variant.signature),
            variant.compile_s,
        )
        return expected

    def _decide(self, variant: _Variant) -> None:
        eager = min(variant.eager_times[1:] or variant.eager_times)
        compiled = min(variant.compiled_times)
        if compiled <= settings.margin * eager:
            variant.state = COMPILED
            variant.reason = (
                f"compiled: {compiled * 1e6:.1f} us against {eager * 1e6:.1f} us eager "
                f"({compiled / eager:.2f}x)"
            )
        else:
            self._give_up(
                variant,
                f"not faster: {compiled * 1e6:.1f} us compiled against {eager * 1e6:.1f} us "
                f"eager ({compiled / eager:.2f}x); eager kept",
            )

    def _give_up(self, variant: _Variant, reason: str) -> None:
        variant.state = EAGER
        variant.compiled = None
        variant.reason = reason
        log.info("compiled tier: %s", reason)

    def _fail(self, state: _Transform, key: Any, variant: _Variant, refusal: Refusal) -> None:
        self._give_up(variant, refusal.reason)
        state.failed = True
        _fallback.record_fallback(_fallback.LOG, key, key[1], state.func, self._names, refusal)

    def _forget(self, state: _Transform) -> None:
        with state.lock:
            state.failed = False
            state.variants = {s: v for s, v in state.variants.items() if v.state != EAGER}

    def _rest_fell_back(self, key: Any) -> bool:
        rest = self.fallback_backend
        names = getattr(rest, "_names", None)
        return names is not None and (names, key[1], key[2]) in _fallback.LOG.records


_side_lock = threading.Lock()
_side_weak: Any = None  # WeakKeyDictionary: callables that take weak references
_side_strong: Dict[Any, Dict[Any, Any]] = {}  # builtins (torch.sin): they live for good
_SIDE_MAX = 256


def _side_store(func: Any) -> Optional[Dict[Any, Any]]:
    """Where the builds for a callable without a ``__dict__`` of its own are kept."""
    global _side_weak
    if isinstance(func, types.BuiltinFunctionType):
        return _side_strong
    if type(func) is FunctionType:
        return None
    try:
        hash(func)
        import weakref

        weakref.ref(func)
    except TypeError:
        return None
    if _side_weak is None:
        import weakref

        with _side_lock:
            if _side_weak is None:
                _side_weak = weakref.WeakKeyDictionary()
    return _side_weak  # type: ignore[no-any-return]


def _built_of(func: Any, create: bool) -> Optional[Dict[Any, Any]]:
    if type(func) is FunctionType:
        if create:
            return func.__dict__.setdefault(_BUILT, {})  # type: ignore[no-any-return]
        return func.__dict__.get(_BUILT)  # type: ignore[no-any-return]
    store = _side_store(func)
    if store is None:
        return None
    with _side_lock:
        found = store.get(func)
        if found is None and create and len(store) < _SIDE_MAX:
            found = store[func] = {}
        return found


def _eager_of(func: Any) -> Any:
    """The eager transform a compiled-tier wrapper stands for, so it is not traced again."""
    return getattr(func, "__adbackends_eager__", func)


def _uses(func: Any, name: str) -> bool:
    code = getattr(func, "__code__", None)
    return code is not None and name in code.co_names


# -- selection ----------------------------------------------------------------------------


def head_only(spec: str, source: str) -> ValueError:
    """The error for ``torch.compile`` named alone: it compiles the next link."""
    return ValueError(
        f"{source}: {spec!r} is not a backend of its own but the head of a chain: it "
        "compiles the next backend's transforms, so name them after it, such as "
        "'torch.compile>torch.func>loop' or use('torch.func', fallback='loop', compile=True)"
    )


def compiled_chain(
    names: Tuple[str, ...],
    source: str,
    chain: Callable[[Tuple[str, ...], str], Backend],
    get: Callable[[str, str], Backend],
) -> Backend:
    """The backend for a chain ``torch.compile>native[>fallback...]``.

    ``chain`` builds a chain of plain backends and ``get`` looks one up (the
    selection module's own), so this module keeps no selection state.
    """
    if names[0] != COMPILE or COMPILE in names[1:]:
        raise ValueError(
            f"{source}: {'>'.join(names)!r}: 'torch.compile' can only be the first link of "
            "a chain, once, such as 'torch.compile>torch.func>loop'"
        )
    native = get(names[1], source)
    if type(native).jacrev is Backend.jacrev or not native.supports("transforms"):
        raise ValueError(
            f"{source}: {'>'.join(names)!r}: torch.compile compiles native transforms; "
            f"{names[1]!r} has none to compile. Name torch.func (or functorch) after it"
        )
    rest = native if len(names) == 2 else chain(names[1:], source)
    return CompiledBackend(native, rest)


# -- the report ---------------------------------------------------------------------------


def report_section() -> Dict[str, Any]:
    """What ``python -m adbackends`` shows about the compiled tier (plain data)."""
    ok, why = support()
    return {
        "usable": ok,
        "reason": why,
        "settings": {k: v for k, v in vars(settings).items() if k != "tolerance"},
        "variants": [row._asdict() for row in compilations()],
    }


def report_lines(section: Dict[str, Any]) -> List[str]:
    """The report's lines for :func:`report_section`'s data."""
    s = section["settings"]
    head = "usable" if section["usable"] else "not usable"
    lines = [
        f"Compiled tier ({COMPILE}>torch.func>loop, opt-in): {head}: {section['reason']}",
        f"  compiles after {s['threshold']} calls with one signature; kept when at most "
        f"{s['margin']}x eager over {s['trials']} timed calls; backend {s['backend']!r}",
    ]
    for row in section["variants"]:
        lines.append(f"  {row['function']} [{row['signature']}]: {row['state']}: {row['reason']}")
    return lines
