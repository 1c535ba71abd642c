"""The ``functorch`` backend: the standalone package or the copy bundled with torch.

functorch 0.1/0.2 (torch 1.11/1.12) is a separate PyPI package; torch 1.13
and later bundle it. Either way it is found by ``import functorch``, never by
version number, and what this copy can do is left to the capability probes.

Older copies lack arguments that newer ones have. This backend never drops
one that changes results or memory:

* ``jacrev(chunk_size=...)`` and ``vmap(chunk_size=...)`` are emulated on
  older copies (:mod:`adbackends.backends._functorch_chunks`);
* anything else missing (``randomness`` before functorch 0.2,
  ``_preallocate_and_copy``) raises :class:`adbackends.CapabilityError`
  naming the argument, the installed version and the backends that have it.

functorch before torch 2.0 refuses every ``autograd.Function`` under its
transforms, and torch >= 2.0 refuses ctx-style ones; that refusal is raised as
:class:`adbackends.CapabilityError` (a ``RuntimeError``) that names the
backend to use instead.

On torch >= 2.0, ``functorch.jacrev`` and ``functorch.vmap`` are deprecated
wrappers that warn on every call. This backend shows one FutureWarning per
process instead and calls the implementation behind the wrapper directly.

The rest of the family (``grad``, ``grad_and_value``, ``vjp``, ``jvp``,
``jacfwd``, ``hessian``, ``linearize``) is functorch's own where the installed
copy has it. functorch 0.2 and torch 1.13 have all but ``linearize``, which
only the torch >= 2.0 implementation behind the deprecated wrappers has;
``jacfwd(randomness=...)`` is missing from old copies. What is missing raises
:class:`adbackends.CapabilityError` naming it, the installed version and the
backends that have it. ``hessian`` follows the strategy of
:mod:`adbackends.backends._hessian` (reverse over reverse by default).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

from .. import _memory
from .._shared import NOTICES, ArgNums, external_stacklevel, normalize_argnums
from ..backend import Backend, Refusal
from ..errors import CapabilityError
from . import _functorch_guards as _guards
from . import _hessian
from ._functorch_chunks import check_chunk_size, chunked_jacrev, chunked_vmap
from ._native_refusals import function_capability, refusal_of, refuse

__all__ = ["FunctorchBackend"]


#: The rest of the family, and the probe whose backends are named as alternatives.
_FAMILY: Dict[str, str] = {
    "grad": "higher_order",
    "grad_and_value": "higher_order",
    "vjp": "higher_order",
    "jvp": "forward_mode",
    "jacfwd": "forward_mode",
    "hessian": "hessian",
    "linearize": "forward_mode",
}


class FunctorchBackend(Backend):
    """functorch's ``jacrev`` and ``vmap``, with the gaps of old copies filled or refused.

    Examples
    --------
    >>> import torch, adbackends
    >>> ft = adbackends.get("functorch")  # doctest: +SKIP
    >>> ft.jacrev(torch.sin, chunk_size=2)(torch.zeros(3))  # doctest: +SKIP
    tensor([[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])
    """

    name = "functorch"
    install_hint = (
        "torch >= 1.13 bundles functorch; for torch 1.12 install the matching "
        "standalone package: pip install functorch==0.2.1"
    )

    def load(self) -> None:
        with warnings.catch_warnings():
            # Importing the deprecated package may warn; the once-per-process
            # notice is given on first use instead.
            warnings.simplefilter("ignore")
            import functorch
        self._module = functorch
        self._jacrev, self._deprecated = _undeprecated(functorch.jacrev)
        self._vmap, _ = _undeprecated(functorch.vmap)
        self._vjp, _ = _undeprecated(functorch.vjp)
        self._jacrev_params = _parameters(self._jacrev)
        self._vmap_params = _parameters(self._vmap)
        self._family: Dict[str, Callable[..., Any]] = {}
        for api in _FAMILY:
            found = getattr(functorch, api, None)
            if found is not None:
                self._family[api] = _undeprecated(found)[0]
            elif self._deprecated:
                # torch >= 2.0: the implementation behind the deprecated
                # wrappers has it even where functorch does not export it.
                import torch.func

                native = getattr(torch.func, api, None)
                if native is not None:
                    self._family[api] = native
        self._family_params = {api: _parameters(fn) for api, fn in self._family.items()}
        # What this copy gets wrong, found out by trying (_functorch_guards).
        quirks = _guards.Quirks(self._jacrev, self._vmap, self._family.get("jvp"))
        self._complex_guard = quirks.takes_complex()
        self._integer_guard = quirks.takes_integers()
        self._none_out_dims_guard = quirks.refuses_none_out_dims()

    @property
    def version(self) -> str:
        version = getattr(self._module, "__version__", None)
        if version is None:
            import torch

            return f"bundled with torch {torch.__version__}"
        return str(version)

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
        if chunk_size == "auto":  # chosen within the memory limit: see adbackends._memory
            return _memory.auto_backend(self).jacrev(  # type: ignore[no-any-return]
                func, argnums, has_aux=has_aux
            )
        if self._deprecated:
            _warn_once()
        kwargs: Dict[str, Any] = {"has_aux": has_aux}
        func = self._real("jacrev", func, has_aux)
        if _preallocate_and_copy:
            self._require(self._jacrev_params, "jacrev", "_preallocate_and_copy", "chunk_size")
            kwargs["_preallocate_and_copy"] = True
        if chunk_size is not None:
            if not self._knows(self._jacrev_params, "chunk_size"):
                check_chunk_size(chunk_size, "jacrev: `chunk_size` should be greater than 0.")
                return self._refusing(
                    self._real_inputs(
                        "jacrev",
                        chunked_jacrev(self._vjp, self._vmap, func, argnums, has_aux, chunk_size),
                    )
                )
            kwargs["chunk_size"] = chunk_size
        if _negative(argnums):
            # functorch 0.2 silently returns zeros for a negative argnums;
            # count from the front once the number of arguments is known.
            native = self._jacrev

            @functools.wraps(func)
            def jacobian(*args: Any) -> Any:
                positions = normalize_argnums(argnums, len(args))
                nums = positions if isinstance(argnums, tuple) else positions[0]
                return native(func, nums, **kwargs)(*args)

            return self._refusing(self._real_inputs("jacrev", jacobian))
        return self._refusing(self._real_inputs("jacrev", self._jacrev(func, argnums, **kwargs)))

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        if chunk_size == "auto":  # chosen within the memory limit: see adbackends._memory
            return _memory.auto_backend(self).vmap(  # type: ignore[no-any-return]
                func, in_dims, out_dims, randomness
            )
        if self._deprecated:
            _warn_once()
        kwargs: Dict[str, Any] = {}
        if self._none_out_dims_guard and _guards.has_none(out_dims):
            raise self._refusal(
                "vmap_out_dims_none",
                f"functorch {self.version} has no vmap(out_dims=None) (it raises ValueError); "
                "the loop backend has it",
            )
        if _guards.moves_unbatched_outputs(out_dims):
            refuse = self._zero_batch_refusal("vmap_unbatched_out_dims")
            func = _guards.batched_outputs(func, out_dims, refuse)
        failure = self._vmap_failure(func, in_dims)
        if randomness != "error":
            self._require(self._vmap_params, "vmap", "randomness", "randomness")
        if self._knows(self._vmap_params, "randomness"):
            kwargs["randomness"] = randomness
        if chunk_size is not None:
            if not self._knows(self._vmap_params, "chunk_size"):
                check_chunk_size(
                    chunk_size,
                    f"vmap: chunk_size should be None or greater than 0. (got {chunk_size})",
                )
                vmap = functools.partial(self._vmap, **kwargs)
                return self._refusing(
                    chunked_vmap(vmap, func, in_dims, out_dims, randomness, chunk_size), failure
                )
            kwargs["chunk_size"] = chunk_size
        return self._refusing(self._vmap(func, in_dims, out_dims, **kwargs), failure)

    def grad(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        native = self._api("grad", has_aux=has_aux)
        return self._refusing(_counted(lambda f, n: native(f, n, has_aux=has_aux), func, argnums))

    def grad_and_value(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        native = self._api("grad_and_value", has_aux=has_aux)
        return self._refusing(_counted(lambda f, n: native(f, n, has_aux=has_aux), func, argnums))

    def vjp(self, func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
        native = self._api("vjp", has_aux=has_aux)
        kwargs = {"has_aux": True} if has_aux else {}
        return self._refusing(native)(func, *primals, **kwargs)

    def jvp(
        self,
        func: Callable[..., Any],
        primals: Any,
        tangents: Any,
        *,
        strict: bool = False,
        has_aux: bool = False,
    ) -> Any:
        native = self._api("jvp", strict=strict, has_aux=has_aux)
        kwargs = {"strict": True} if strict else {}
        if has_aux:
            kwargs["has_aux"] = True
        if self._integer_guard:  # functorch 0.2.1 computes with integer tensors
            _guards.check_floating("primal", primals)
            _guards.check_floating("tangent", tangents)
        return self._refusing(native)(func, primals, tangents, **kwargs)

    def jacfwd(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        has_aux: bool = False,
        *,
        randomness: str = "error",
    ) -> Callable[..., Any]:
        native = self._api("jacfwd", has_aux=has_aux)
        kwargs: Dict[str, Any] = {"has_aux": has_aux} if has_aux else {}
        if randomness != "error":
            self._require(self._family_params["jacfwd"], "jacfwd", "randomness", "randomness")
        if self._knows(self._family_params["jacfwd"], "randomness"):
            kwargs["randomness"] = randomness
        func = self._real("jacfwd", func, has_aux)
        built = _counted(lambda f, n: native(f, n, **kwargs), func, argnums)
        if self._integer_guard:
            built = _guards.guard_floating(argnums, built)
        return self._refusing(self._real_inputs("jacfwd", built))

    def hessian(self, func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
        forward = self._api("hessian")
        jacrev = self._jacrev
        name = self.name
        func = self._real("jacfwd", func)
        built = _counted(lambda f, n: _hessian.build(name, jacrev, forward, f, n), func, argnums)
        return self._refusing(self._real_inputs("jacfwd", built))

    def linearize(self, func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
        native = self._api("linearize")
        return self._refusing(native)(func, *primals)  # type: ignore[no-any-return]

    def _api(self, api: str, **flags: bool) -> Callable[..., Any]:
        """functorch's ``api``, or a CapabilityError naming what is missing."""
        if self._deprecated:
            _warn_once()
        native = self._family.get(api)
        if native is None:
            raise self._lacking(
                api, f"functorch {self.version} has no {api}", _FAMILY[api], f"functorch.{api}"
            )
        for flag, value in flags.items():
            if value:
                self._require(self._family_params[api], api, flag, _FAMILY[api])
        return native

    def cannot_transform(self, exc: BaseException) -> Optional[Refusal]:
        # This backend's own errors carry their refusal (see _lacking, _refusal
        # and _refusing); functorch's are read once, by refusal_of.
        return refusal_of(exc)

    # -- gaps -----------------------------------------------------------------

    @staticmethod
    def _knows(params: Optional[FrozenSet[str]], name: str) -> bool:
        return params is None or name in params

    def _require(
        self, params: Optional[FrozenSet[str]], api: str, name: str, capability: str
    ) -> None:
        """Refuse an argument this functorch does not have (never drop it)."""
        if self._knows(params, name):
            return
        raise self._lacking(
            capability,
            f"functorch {self.version} has no {api}({name}=...)",
            capability,
            f"{api}({name}=...)",
        )

    def _lacking(self, capability: str, reason: str, hint: str, detail: str) -> CapabilityError:
        """What this functorch lacks, as an error that is also a refusal (for chains)."""
        error = CapabilityError(self.name, capability, reason, self.hints(hint), detail=detail)
        refuse(error, Refusal(capability, reason, "use a backend that has it"))
        return error

    def _refusing(
        self,
        transformed: Callable[..., Any],
        failure: Optional[
            Callable[[BaseException, Tuple[Any, ...]], Optional[BaseException]]
        ] = None,
    ) -> Callable[..., Any]:
        """Turn functorch's refusal of an autograd.Function into a CapabilityError.

        ``failure(exc, args)``, where given, may replace any other error of
        the call (see :func:`_functorch_guards.vmap_failure`).
        """
        backend = self

        @functools.wraps(transformed)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return transformed(*args, **kwargs)
            except CapabilityError:
                raise
            except Exception as exc:
                refusal = refusal_of(exc) if isinstance(exc, RuntimeError) else None
                capability = function_capability(refusal)
                if capability is not None:
                    error = backend._function_error(capability, exc)
                    raise refuse(error, refusal) from exc
                other = failure(exc, args) if failure is not None else None
                if other is None:
                    raise
                raise other from exc

        return call

    # -- guards (adbackends.backends._functorch_guards) ----------------------------

    def _real(
        self, api: str, func: Callable[..., Any], has_aux: bool = False
    ) -> Callable[..., Any]:
        """``func``, raising torch.func's error for a complex output where this
        functorch differentiates one silently."""
        if not self._complex_guard:
            return func
        return _guards.real_outputs(api, func, has_aux)

    def _real_inputs(self, api: str, built: Callable[..., Any]) -> Callable[..., Any]:
        """``built``, raising torch.func's error for a complex input where this
        functorch differentiates one silently."""
        if not self._complex_guard:
            return built
        return functools.wraps(built)(_guards.guard_real(api, built))

    def _refusal(self, capability: str, reason: str) -> CapabilityError:
        """A refusal ``cannot_transform`` recognises: a chain runs the call on its fallback."""
        error = CapabilityError(self.name, capability, reason)
        refuse(error, Refusal(capability, reason, "use the loop backend, which computes it"))
        return error

    def _zero_batch_refusal(self, capability: str) -> Callable[[str], BaseException]:
        def refuse(what: str) -> BaseException:
            return self._refusal(
                capability,
                f"functorch {self.version} cannot {what} (it fails inside, or gives a wrong "
                "shape); the loop backend can",
            )

        return refuse

    def _vmap_failure(
        self, func: Callable[..., Any], in_dims: Any
    ) -> Callable[[BaseException, Tuple[Any, ...]], Optional[BaseException]]:
        refuse = self._zero_batch_refusal("vmap_zero_batch")

        def failure(exc: BaseException, args: Tuple[Any, ...]) -> Optional[BaseException]:
            return _guards.vmap_failure(exc, func, in_dims, args, refuse)

        return failure

    def _function_error(self, capability: str, exc: BaseException) -> CapabilityError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        import torch

        torch_note = (
            "" if self.version == str(torch.__version__) else f" (torch {torch.__version__})"
        )
        what = (
            "a ctx-style autograd.Function (forward(ctx, ...)) under a transform"
            if capability == "legacy_function"
            else "any autograd.Function under a transform"
        )
        return CapabilityError(
            self.name,
            capability,
            f"functorch {self.version}{torch_note} refuses {what}: {first}",
            # Only cached probe results: this runs inside the user's
            # transforms, where a new probe must not run.
            self.hints(capability, probe=False),
        )


# -- argnums ---------------------------------------------------------------------


def _counted(
    build: Callable[[Callable[..., Any], ArgNums], Callable[..., Any]],
    func: Callable[..., Any],
    argnums: ArgNums,
) -> Callable[..., Any]:
    """``build(func, argnums)``, with negative ``argnums`` counted from the front.

    functorch 0.2 silently returns zeros for a negative argnums; the
    positions are made non-negative once the number of arguments is known.
    """
    if not _negative(argnums):
        return build(func, argnums)

    @functools.wraps(func)
    def transformed(*args: Any, **kwargs: Any) -> Any:
        positions = normalize_argnums(argnums, len(args))
        nums = positions if isinstance(argnums, tuple) else positions[0]
        return build(func, nums)(*args, **kwargs)

    return transformed


def _negative(argnums: Any) -> bool:
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    return any(isinstance(n, int) and n < 0 for n in nums)


# -- plumbing ---------------------------------------------------------------------


def _undeprecated(api: Callable[..., Any]) -> Tuple[Callable[..., Any], bool]:
    """The function behind functorch's deprecation wrapper, and whether it was one.

    torch >= 2.0 exposes ``functorch.<api>`` as a wrapper in
    ``torch._functorch.deprecated`` that warns and calls the torch.func
    implementation; every other copy exposes the implementation itself.
    """
    if getattr(api, "__module__", "") != "torch._functorch.deprecated":
        return api, False
    import torch.func

    name = api.__name__
    target = getattr(torch.func, name, None)
    if callable(target) and getattr(target, "__module__", "") != api.__module__:
        return target, True
    return api, True


def _parameters(api: Callable[..., Any]) -> Optional[FrozenSet[str]]:
    try:
        return frozenset(inspect.signature(api).parameters)
    except (TypeError, ValueError):  # a C function or an unusual wrapper
        return None


def _warn_once() -> None:
    if "functorch deprecated" in NOTICES:
        return
    from ..probes import probing

    if probing():  # a probe hides its warnings: keep the notice for the user
        return
    if not NOTICES.first("functorch deprecated"):
        return
    warnings.warn(
        "functorch is deprecated since torch 2.0 and will be removed from a "
        "future torch; the 'functorch' backend still works, but 'torch.func' "
        "offers the same transforms: adbackends.use('torch.func') or "
        "TAD_AD_BACKEND=torch.func",
        FutureWarning,
        stacklevel=external_stacklevel(),
    )
