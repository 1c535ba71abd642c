"""An adbackends backend that differentiates by central finite differences.

Select it by name once the distribution is installed::

    import adbackends
    adbackends.use("finite-difference")

``jacrev`` evaluates the function at ``x + h e_j`` and ``x - h e_j`` for every
input element and takes ``(f(x + h e_j) - f(x - h e_j)) / 2h`` as column
``j``, in float64 whatever the input's dtype. It needs nothing from autograd,
so it differentiates black-box code and checks hand-written backward passes,
but it is approximate: about 1e-9 relative error for smooth functions, more
for nested (second-order) use. The backend states this as
``tolerance = (rtol, atol)``, which the conformance kit uses, and it declares
its one semantic limitation: ``torch.no_grad`` and ``detach`` inside the
function do not stop a finite difference. ``vmap`` is the loop backend's.

It is written for backend contract 1 (``jacrev`` and ``vmap``) and declares
so. adbackends derives the rest from its ``jacrev``: ``grad``,
``grad_and_value``, ``jacfwd`` and ``hessian`` (as ``jacrev(jacrev)``) are
finite differences too, with the same tolerance; ``vjp``, ``jvp`` and
``linearize`` raise :class:`adbackends.CapabilityError`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Union

from adbackends import Backend
from adbackends.backends import loop
from adbackends.plugin import normalize_argnums

__all__ = ["FiniteDifferenceBackend", "__version__", "jacrev", "step_size"]

__version__ = "0.1.0"

ArgNums = Union[int, Tuple[int, ...]]


class FiniteDifferenceBackend(Backend):
    """Central differences for ``jacrev``; the loop backend's ``vmap``.

    Examples
    --------
    >>> import torch, adbackends
    >>> fd = adbackends.get("finite-difference")
    >>> x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> torch.allclose(fd.jacrev(torch.sin)(x), torch.diag(x.cos()), rtol=1e-8)
    True
    """

    name = "finite-difference"
    #: Written for contract 1: jacrev and vmap; the rest is derived or missing.
    contract: ClassVar[int] = 1
    #: How close its derivatives come to exact ones (rtol, atol), nested use
    #: (hessian, jacrev(jacrev)) included: a second difference of a difference
    #: is off by about 1e-5 absolute where the exact answer is 0.
    tolerance: ClassVar[Tuple[float, float]] = (1e-5, 1e-4)
    #: Checks of the conformance kit it cannot pass, and why.
    limitations: ClassVar[Dict[str, str]] = {
        "jacrev_inner_no_grad": (
            "finite differences evaluate the function, so torch.no_grad and detach "
            "inside it do not stop differentiation"
        ),
    }

    @property
    def version(self) -> str:
        return __version__

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


def step_size(x: Any) -> Any:
    """The central-difference step for each element of ``x`` (float64).

    ``eps ** (1/3)`` balances the truncation error (``h**2``) against rounding
    (``eps / h``); it grows with ``|x|`` so that ``x + h`` differs from ``x``.
    """
    import torch

    eps = torch.finfo(torch.float64).eps
    return eps ** (1.0 / 3.0) * x.detach().abs().clamp(min=1.0)


def _check_argnums(argnums: Any, num_args: int) -> Tuple[Tuple[int, ...], bool]:
    """The argument positions to differentiate, validated as torch.func does."""
    return normalize_argnums(argnums, num_args), isinstance(argnums, tuple)


def jacrev(
    func: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
    """``torch.func.jacrev``'s interface, computed by central differences.

    ``chunk_size`` is validated and otherwise has no effect: columns are
    computed one at a time anyway.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError("jacrev: `chunk_size` should be greater than 0.")

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
                if not leaf.is_floating_point():
                    raise RuntimeError(
                        "only Tensors of floating point dtype can require gradients"
                        + (" (and finite differences need real ones)" if leaf.is_complex() else "")
                    )
            specs.append((spec, len(leaves), len(arg_leaves)))
            leaves.extend(arg_leaves)

        def evaluate(values: List[Any]) -> Tuple[List[Any], Any, Any]:
            full = list(args)
            for pos, (spec, start, count) in zip(positions, specs):
                full[pos] = tree_unflatten(values[start : start + count], spec)
            result = func(*full, **kwargs)
            aux = None
            if has_aux:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        "jacrev(f, ...)(*args): output of function f should be a tuple: "
                        "(output, aux) if has_aux is True"
                    )
                result, aux = result
            outs, spec = tree_flatten(result)
            for out in outs:
                if not isinstance(out, torch.Tensor):
                    raise RuntimeError(
                        "jacrev(f, ...)(*args): expected f(*args) to return only tensors, "
                        f"got unsupported type {type(out)}"
                    )
            return outs, spec, aux

        base, out_spec, aux = evaluate(leaves)
        wide = [leaf.to(torch.float64) for leaf in leaves]
        # blocks[i][k]: d out_i / d input k, as out_i.numel() x input_k.numel()
        columns: List[List[List[Any]]] = [[[] for _ in leaves] for _ in base]
        for k, leaf in enumerate(wide):
            steps = step_size(leaf).reshape(-1)
            for j in range(leaf.numel()):
                h = steps[j]
                bump = torch.zeros_like(leaf).reshape(-1)
                bump[j] = h
                bump = bump.reshape(leaf.shape)
                plus, minus = list(wide), list(wide)
                plus[k], minus[k] = leaf + bump, leaf - bump
                up, _, _ = evaluate(plus)
                down, _, _ = evaluate(minus)
                for i, (u, d) in enumerate(zip(up, down)):
                    col = (u.to(torch.float64) - d.to(torch.float64)) / (2 * h)
                    columns[i][k].append(col.reshape(-1))
        jac_leaves = []
        for i, out in enumerate(base):
            row = []
            for k, leaf in enumerate(leaves):
                shape = tuple(out.shape) + tuple(leaf.shape)
                if columns[i][k]:
                    block = torch.stack(columns[i][k], dim=-1).reshape(shape)
                else:
                    block = torch.zeros(shape, dtype=torch.float64)
                row.append(block.to(out.dtype))
            per_arg = [
                tree_unflatten(row[start : start + count], spec) for spec, start, count in specs
            ]
            jac_leaves.append(tuple(per_arg) if as_tuple else per_arg[0])
        jac = tree_unflatten(jac_leaves, out_spec)
        return (jac, aux) if has_aux else jac

    return wrapper
