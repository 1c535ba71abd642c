"""The ``loop`` backend: reverse-mode autograd and Python loops.

Every derivative is a reverse pass of ``torch.autograd.grad``; nothing uses
torch.func, functorch or forward-mode autograd. Where ``torch.autograd.grad``
would only pass its arguments on, small passes call the engine entry behind
it directly, on checked torch releases only
(:mod:`adbackends.backends._torch_compat`, off with
``ADBACKENDS_LOOP_ENGINE=public``). The loop page of the docs lists all it
takes from torch.

It runs any differentiable code, including legacy (ctx-style) custom
autograd Functions and code that vmap cannot batch, on every torch. It
reproduces torch.func's results, shapes, pytree structures, differentiability
and exception types; it is simply slower for large batches, since it handles
one Jacobian row or one batch element at a time.

``jacrev`` lives in :mod:`adbackends.backends._loop_jacrev`, ``vmap`` in
:mod:`adbackends.backends._loop_vmap` and the rest of the family (``grad``,
``grad_and_value``, ``vjp``, ``jvp``, ``jacfwd``, ``hessian``,
``linearize``) in :mod:`adbackends.backends._loop_family`, from reverse mode
only; this module is the backend object.

Where a loop cannot behave exactly like torch.func:

* ``vmap`` runs the function once per sample, so code that torch.func
  refuses (``.item()``, data-dependent control flow, Functions without a vmap
  rule) runs here.
* ``out_dims=None`` refuses an output computed from the batched inputs, as
  torch.func does; see the loop page for the few cases still judged by values.
* ``randomness="error"`` watches the default CPU and CUDA generators; draws
  from a private ``torch.Generator`` go unnoticed.
* While a loop ``vmap`` runs, ``torch.autograd.grad`` names a wrapper
  (process-wide) that keeps the graph on every sample but the last for calls
  from the map's own thread, so that a function taking the gradient of a
  graph built outside the map works as under torch.func (which runs that
  backward once); calls from other threads pass through unchanged. Code that
  bound ``grad`` by ``from torch.autograd import grad`` before the call is
  not covered.
* ``jacrev`` returns exactly torch.func's values, shapes, structures and
  ``requires_grad``; it is slower for large outputs (one backward pass per
  row) and close to a hand-written ``autograd.grad`` loop in cost.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from .. import _memory
from .._shared import ArgNums
from ..backend import Backend
from . import _loop_family as family
from ._loop_family import grad, grad_and_value, hessian, jacfwd, jvp, linearize, vjp
from ._loop_jacrev import jacrev
from ._loop_vmap import vmap

__all__ = [
    "LoopBackend",
    "grad",
    "grad_and_value",
    "hessian",
    "jacfwd",
    "jacrev",
    "jvp",
    "linearize",
    "vjp",
    "vmap",
]


class LoopBackend(Backend):
    """Jacobians row by row with ``torch.autograd.grad``; vmap as a loop.

    Examples
    --------
    >>> import torch, adbackends
    >>> loop = adbackends.get("loop")
    >>> x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    >>> loop.vmap(loop.jacrev(lambda t: t**2))(x)
    tensor([[[0., 0.],
             [0., 2.]],
    <BLANKLINE>
            [[4., 0.],
             [0., 6.]]])
    """

    name = "loop"
    #: It calls nothing but autograd, which runs every autograd.Function.
    by_construction = ("custom_function", "legacy_function")

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
        return jacrev(
            func,
            argnums,
            has_aux=has_aux,
            chunk_size=chunk_size,
            _preallocate_and_copy=_preallocate_and_copy,
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
        if chunk_size == "auto":  # chosen within the memory limit: see adbackends._memory
            return _memory.auto_backend(self).vmap(  # type: ignore[no-any-return]
                func, in_dims, out_dims, randomness
            )
        return vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)

    def grad(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        return family.grad(func, argnums, has_aux)

    def grad_and_value(
        self, func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
    ) -> Callable[..., Any]:
        return family.grad_and_value(func, argnums, has_aux)

    def vjp(self, func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
        return family.vjp(func, *primals, has_aux=has_aux)

    def jvp(
        self,
        func: Callable[..., Any],
        primals: Any,
        tangents: Any,
        *,
        strict: bool = False,
        has_aux: bool = False,
    ) -> Any:
        return family.jvp(func, primals, tangents, strict=strict, has_aux=has_aux)

    def jacfwd(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        has_aux: bool = False,
        *,
        randomness: str = "error",
    ) -> Callable[..., Any]:
        return family.jacfwd(func, argnums, has_aux, randomness=randomness)

    def hessian(self, func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
        return family.hessian(func, argnums)

    def linearize(self, func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
        return family.linearize(func, *primals)
