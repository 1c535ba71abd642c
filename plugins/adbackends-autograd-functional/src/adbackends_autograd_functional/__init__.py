"""An adbackends backend built on ``torch.autograd.functional.jacobian``.

Select it by name once the distribution is installed::

    import adbackends
    adbackends.use("autograd.functional")

``jacrev`` hands the whole Jacobian to :func:`torch.autograd.functional.jacobian`,
vectorised (``vectorize=True``, one batched backward pass) where the function's
backward allows it and row by row where it does not. ``vmap`` is the loop
backend's, so any code that runs once runs batched.

It implements backend contract 2: ``vjp``, ``jvp`` and ``linearize`` are the
loop backend's (reverse mode only, like ``torch.autograd.functional.vjp``
and its double-backward ``jvp``); ``grad``, ``grad_and_value``, ``jacfwd``
and ``hessian`` are derived by adbackends from this backend's ``jacrev``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, List, Optional, Sequence, Tuple, Union

from adbackends import Backend
from adbackends.backends import loop
from adbackends.plugin import normalize_argnums

__all__ = ["AutogradFunctionalBackend", "__version__", "jacrev"]

__version__ = "0.1.0"

ArgNums = Union[int, Tuple[int, ...]]


class AutogradFunctionalBackend(Backend):
    """Jacobians from ``torch.autograd.functional.jacobian``; vmap from the loop backend.

    Examples
    --------
    >>> import torch, adbackends
    >>> backend = adbackends.get("autograd.functional")
    >>> x = torch.tensor([0.0, 1.0])
    >>> backend.jacrev(torch.sin)(x)
    tensor([[1.0000, 0.0000],
            [0.0000, 0.5403]])
    """

    name = "autograd.functional"
    contract: ClassVar[int] = 2
    claims = (
        "custom_function",
        "legacy_function",
        "higher_order",
        "chunk_size",
        "randomness",
        "forward_mode",
        "hessian",
    )

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
        return jacrev(func, argnums, has_aux=has_aux, chunk_size=chunk_size)

    def vmap(
        self,
        func: Callable[..., Any],
        in_dims: Any = 0,
        out_dims: Any = 0,
        randomness: str = "error",
        *,
        chunk_size: Optional[int] = None,
    ) -> Callable[..., Any]:
        return loop.vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)

    # grad, grad_and_value, jacfwd and hessian: derived from jacrev by adbackends.

    def vjp(self, func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
        return loop.vjp(func, *primals, has_aux=has_aux)

    def jvp(
        self,
        func: Callable[..., Any],
        primals: Any,
        tangents: Any,
        *,
        strict: bool = False,
        has_aux: bool = False,
    ) -> Any:
        return loop.jvp(func, primals, tangents, strict=strict, has_aux=has_aux)

    def linearize(self, func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
        return loop.linearize(func, *primals)


def _check_argnums(argnums: Any, num_args: int) -> Tuple[Tuple[int, ...], bool]:
    """The argument positions to differentiate, validated as torch.func does."""
    return normalize_argnums(argnums, num_args), isinstance(argnums, tuple)


def _reaches_outside(outputs: Sequence[Any], own: Sequence[Any]) -> bool:
    """Whether ``outputs`` depend on a requires-grad tensor other than ``own``.

    If they do, an enclosing computation (an outer transform, or parameters
    the function closes over) needs the Jacobian to stay differentiable.
    """
    own_ids = {id(t) for t in own}
    todo = [out.grad_fn for out in outputs if out.grad_fn is not None]
    seen = set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if variable is not None and id(variable) not in own_ids:
            return True
        todo.extend(parent for parent, _ in node.next_functions)
    return False


def jacrev(
    func: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
    """``torch.func.jacrev`` semantics on top of ``torch.autograd.functional.jacobian``.

    ``chunk_size=1`` computes the Jacobian row by row (``vectorize=False``);
    any other size uses one vectorised backward pass, falling back to rows
    when the function's backward cannot be vectorised.
    """
    import torch
    from torch.autograd.functional import jacobian
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError("jacrev: `chunk_size` should be greater than 0.")
    # Whether a vectorised backward works is a property of the function.
    vectorize = [chunk_size != 1]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        positions, as_tuple = _check_argnums(argnums, len(args))
        specs = []
        leaves: List[Any] = []
        for pos in positions:
            arg_leaves, spec = tree_flatten(args[pos])
            for leaf in arg_leaves:
                if not isinstance(leaf, torch.Tensor):
                    raise RuntimeError(
                        f"jacrev: Expected f to be a function that has Tensor-like inputs "
                        f"at argnums, got {type(leaf).__name__}"
                    )
                if not (leaf.is_floating_point() or leaf.is_complex()):
                    raise RuntimeError("only Tensors of floating point dtype can require gradients")
            specs.append((spec, len(leaves), len(arg_leaves)))
            leaves.extend(arg_leaves)

        state: dict = {}

        def flat(*inputs: Any) -> Tuple[Any, ...]:
            full = list(args)
            for pos, (spec, start, count) in zip(positions, specs):
                full[pos] = tree_unflatten(list(inputs[start : start + count]), spec)
            state["called"] = True
            result = func(*full, **kwargs)
            if has_aux:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        "jacrev(f, ...)(*args): output of function f should be a tuple: "
                        "(output, aux) if has_aux is True"
                    )
                result, state["aux"] = result
            outs, state["spec"] = tree_flatten(result)
            for out in outs:
                if not isinstance(out, torch.Tensor):
                    raise RuntimeError(
                        "jacrev(f, ...)(*args): expected f(*args) to return only tensors, "
                        f"got unsupported type {type(out)}"
                    )
            state["outer"] = _reaches_outside(outs, inputs)
            state["finished"] = True
            return tuple(outs)

        # With grad mode on (outside, or inside an enclosing transform) the
        # result may have to stay differentiable; whether it must is only
        # known once the function has run, so the graph is kept and dropped
        # afterwards when nothing outside needs it.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            try:
                blocks = jacobian(
                    flat, tuple(leaves), create_graph=create_graph, vectorize=vectorize[0]
                )
            except RuntimeError:
                if not (vectorize[0] and state.get("finished")):
                    raise
                # The function ran; its backward could not be batched (for
                # example a custom Function without a vmap rule): go row by row.
                vectorize[0] = False
                state.clear()
                blocks = jacobian(flat, tuple(leaves), create_graph=create_graph)
        keep = create_graph and state["outer"]
        jac_leaves = []
        for row in blocks:
            row = [b if keep else b.detach() for b in row]
            per_arg = [
                tree_unflatten(row[start : start + count], spec) for spec, start, count in specs
            ]
            jac_leaves.append(tuple(per_arg) if as_tuple else per_arg[0])
        jac = tree_unflatten(jac_leaves, state["spec"])
        if not has_aux:
            return jac
        aux = state["aux"]
        if not keep:
            aux = _detach(aux)
        return jac, aux

    return wrapper


def _detach(tree: Any) -> Any:
    import torch
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)
