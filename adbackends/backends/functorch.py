"""The ``functorch`` backend: the standalone package or the copy bundled with torch.

functorch 0.1/0.2 (torch 1.11/1.12) is a separate PyPI package; torch 1.13
and later bundle it. Either way it is found by ``import functorch``, never by
version number. What this copy can do is left to the capability probes.

On torch >= 2.0, ``functorch.jacrev`` and ``functorch.vmap`` are deprecated
wrappers that warn on every call. This backend shows that FutureWarning once
per process and then calls the implementation behind the wrapper directly.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from typing import Any, Callable, Optional

from ..backend import ArgNums, Backend
from ..errors import CapabilityError

__all__ = ["FunctorchBackend"]

_warned = False
_warn_lock = threading.Lock()


class FunctorchBackend(Backend):
    """functorch's ``jacrev`` and ``vmap``."""

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
        self._jacrev, self._jacrev_deprecated = _undeprecated(functorch.jacrev, "_impl", "jacrev")
        self._vmap, self._vmap_deprecated = _undeprecated(functorch.vmap, "apis", "vmap")
        self._jacrev_params = _parameters(self._jacrev)
        self._vmap_params = _parameters(self._vmap)

    @property
    def version(self) -> str:
        return str(getattr(self._module, "__version__", "unknown"))

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        kwargs = {"has_aux": has_aux}
        self._optional(kwargs, self._jacrev_params, "jacrev", "chunk_size", chunk_size, None)
        self._optional(
            kwargs,
            self._jacrev_params,
            "jacrev",
            "_preallocate_and_copy",
            _preallocate_and_copy,
            False,
        )
        if self._jacrev_deprecated:
            _warn_once()
        return self._jacrev(func, argnums, **kwargs)

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        kwargs: dict = {}
        self._optional(kwargs, self._vmap_params, "vmap", "randomness", randomness, "error")
        self._optional(kwargs, self._vmap_params, "vmap", "chunk_size", chunk_size, None)
        if self._vmap_deprecated:
            _warn_once()
        return self._vmap(func, in_dims, out_dims, **kwargs)

    def _optional(
        self,
        kwargs: dict,
        params: Optional[frozenset],
        api: str,
        name: str,
        value: Any,
        default: Any,
    ) -> None:
        """Pass ``name`` on if this functorch knows it; refuse a non-default otherwise.

        An argument that changes results or memory is never dropped silently.
        """
        if params is None or name in params:
            kwargs[name] = value
            return
        if value is default or value == default:
            return
        from ..selection import alternatives_for

        raise CapabilityError(
            self.name,
            name if name != "_preallocate_and_copy" else "chunk_size",
            f"functorch {self.version} has no {api}({name}=...)",
            alternatives_for(name if name in ("chunk_size", "randomness") else "chunk_size"),
            detail=f"{api}({name}={value!r})",
        )


def _undeprecated(api: Callable[..., Any], impl_module: str, attr: str) -> Any:
    """The function behind functorch's deprecation wrapper, if it is one."""
    if getattr(api, "__module__", "") != "torch._functorch.deprecated":
        return api, False
    module = inspect.getmodule(api)
    target = getattr(getattr(module, impl_module, None), attr, None)
    if callable(target):
        return target, True
    return api, False


def _parameters(api: Callable[..., Any]) -> Optional[frozenset]:
    try:
        return frozenset(inspect.signature(api).parameters)
    except (TypeError, ValueError):  # a C function or an unusual wrapper
        return None


def _warn_once() -> None:
    global _warned
    if _warned:
        return
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(
        "functorch is deprecated since torch 2.0 and will be removed from a "
        "future torch; the 'functorch' backend still works, but 'torch.func' "
        "offers the same transforms: adbackends.use('torch.func') or "
        "TAD_AD_BACKEND=torch.func",
        FutureWarning,
        stacklevel=3,
    )
