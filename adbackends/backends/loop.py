"""The ``loop`` backend: ``torch.autograd.grad`` and Python loops, nothing else.

It runs any differentiable code, including legacy (ctx-style) custom
autograd Functions and code that vmap cannot batch, on every torch. It
reproduces torch.func's results, shapes and pytree structures; it is simply
slower for large batches, since it handles one Jacobian row or one batch
element at a time.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..backend import ArgNums, Backend

__all__ = ["LoopBackend", "jacrev", "vmap"]


class LoopBackend(Backend):
    """Jacobians row by row with ``torch.autograd.grad``; vmap as a loop."""

    name = "loop"

    def jacrev(
        self,
        func: Callable[..., Any],
        argnums: ArgNums = 0,
        *,
        has_aux: bool = False,
        chunk_size: Optional[int] = None,
        _preallocate_and_copy: bool = False,
    ) -> Callable[..., Any]:
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
        return vmap(func, in_dims, out_dims, randomness, chunk_size=chunk_size)


# -- jacrev --------------------------------------------------------------------


def _check_chunk_size(chunk_size: Optional[int], api: str) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{api}: `chunk_size` should be greater than 0.")


def _normalize_argnums(argnums: ArgNums, num_args: int) -> Tuple[Tuple[int, ...], bool]:
    """Check ``argnums`` as torch.func does; return (positions, was_tuple)."""
    if isinstance(argnums, tuple):
        if len(argnums) == 0:
            raise RuntimeError("argnums must be non-empty")
        nums = argnums
        as_tuple = True
    elif isinstance(argnums, int):
        nums = (argnums,)
        as_tuple = False
    else:
        raise RuntimeError(
            f"argnums must be int or Tuple[int, ...], got: {type(argnums)}"
        )
    out = []
    for num in nums:
        if not isinstance(num, int):
            raise RuntimeError(f"argnums must be int or Tuple[int, ...], got: {type(argnums)}")
        if not -num_args <= num < num_args:
            raise RuntimeError(
                f"Got argnums={num}, but only {num_args} positional inputs"
            )
        out.append(num % num_args)
    if len(set(out)) != len(out):
        raise RuntimeError(f"argnums elements must be unique, got {argnums}")
    return tuple(out), as_tuple


def _fresh(value: Any) -> Any:
    """A new differentiable handle on ``value`` for this level of nesting."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise RuntimeError(
            f"jacrev: Expected f to be a function that has Tensor-like inputs at "
            f"argnums, got {type(value).__name__}"
        )
    if not (value.is_floating_point() or value.is_complex()):
        raise RuntimeError(
            "only Tensors of floating point dtype can require gradients"
        )
    if value.requires_grad:
        # Stay attached to the outer graph, but differentiate a new node so
        # that an outer level's variable is never confused with this one.
        return value.view_as(value)
    return value.detach().requires_grad_(True)


def _depends_on_other(outputs: Sequence[Any], own: Sequence[Any]) -> bool:
    """Whether ``outputs`` reach a requires-grad tensor other than ``own``.

    That is the case exactly when an outer level (a nested transform, or a
    model parameter the function closes over) needs this level's result to be
    differentiable, so the Jacobian must be computed with ``create_graph``.
    """
    own_nodes = {id(t.grad_fn) for t in own if t.grad_fn is not None}
    own_leaves = {id(t) for t in own if t.grad_fn is None}
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in own_nodes:
            # A fresh view of an outer tensor: the outer graph needs us.
            return True
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in own_leaves:
            return True
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return False


def jacrev(
    func: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    _preallocate_and_copy: bool = False,
) -> Callable[..., Any]:
    """Jacobian of ``func`` row by row, with torch.func.jacrev's semantics."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    _check_chunk_size(chunk_size, "jacrev")

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nums, as_tuple = _normalize_argnums(argnums, len(args))
        with torch.enable_grad():
            primals = list(args)
            in_specs = []
            in_leaves: List[Any] = []
            for num in nums:
                leaves, spec = tree_flatten(args[num])
                fresh = [_fresh(leaf) for leaf in leaves]
                primals[num] = tree_unflatten(fresh, spec)
                in_specs.append((spec, len(in_leaves), len(fresh)))
                in_leaves.extend(fresh)
            result = func(*primals, **kwargs)
            if has_aux:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        "jacrev(f, ...)(*args): output of function f should be a tuple: "
                        "(output, aux) if has_aux is True"
                    )
                result, aux = result
            out_leaves, out_spec = tree_flatten(result)
            for out in out_leaves:
                if not isinstance(out, torch.Tensor):
                    raise RuntimeError(
                        "jacrev(f, ...)(*args): expected f(*args) to return only tensors, "
                        f"got unsupported type {type(out)}"
                    )
            keep_graph = _depends_on_other(out_leaves, in_leaves)
            blocks = [
                _jacobian_of(out, in_leaves, keep_graph) for out in out_leaves
            ]
        jac_leaves = []
        for out_blocks in blocks:
            per_arg = [
                tree_unflatten(out_blocks[start : start + count], spec)
                for spec, start, count in in_specs
            ]
            jac_leaves.append(tuple(per_arg) if as_tuple else per_arg[0])
        jac = tree_unflatten(jac_leaves, out_spec)
        if not has_aux:
            return jac
        if not keep_graph:
            aux = _detach_tree(aux)
        return jac, aux

    return wrapper


def _jacobian_of(out: Any, inputs: Sequence[Any], keep_graph: bool) -> List[Any]:
    """d out / d input for each input, each of shape out.shape + input.shape."""
    import torch

    flat = out.reshape(-1)
    rows: List[List[Any]] = [[] for _ in inputs]
    for j in range(flat.numel()):
        seed = torch.zeros_like(flat)
        seed[j] = 1
        grads = torch.autograd.grad(
            flat,
            inputs,
            grad_outputs=seed,
            retain_graph=True,
            create_graph=keep_graph,
            allow_unused=True,
        )
        for k, (grad, inp) in enumerate(zip(grads, inputs)):
            rows[k].append(torch.zeros_like(inp) if grad is None else grad)
    blocks = []
    for inp, inp_rows in zip(inputs, rows):
        shape = tuple(out.shape) + tuple(inp.shape)
        if inp_rows:
            block = torch.stack(inp_rows).reshape(shape)
        else:
            block = inp.new_zeros(shape)
        blocks.append(block if keep_graph else block.detach())
    return blocks


def _detach_tree(tree: Any) -> Any:
    import torch
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


# -- vmap ----------------------------------------------------------------------


def _broadcast(prefix: Any, tree: Any, path: str) -> List[Any]:
    """Expand an in_dims prefix to one entry per leaf of ``tree``."""
    from torch.utils._pytree import tree_flatten

    if prefix is None or isinstance(prefix, int):
        leaves, _ = tree_flatten(tree)
        return [prefix] * len(leaves)
    p_children, p_spec = _children(prefix)
    t_children, t_spec = _children(tree)
    if p_spec != t_spec:
        raise ValueError(
            f"vmap: in_dims is not compatible with the structure of `inputs` at {path}"
        )
    out: List[Any] = []
    for key, (p, t) in enumerate(zip(p_children, t_children)):
        out.extend(_broadcast(p, t, f"{path}[{key}]"))
    return out


def _children(node: Any) -> Tuple[List[Any], Any]:
    if isinstance(node, dict):
        keys = sorted(node, key=repr)
        return [node[k] for k in keys], (dict, tuple(keys))
    if isinstance(node, (list, tuple)):
        return list(node), (type(node), len(node))
    return [], ("leaf", None)


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
    """Map ``func`` over a batch dimension with a Python loop."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    if randomness not in ("error", "different", "same"):
        raise RuntimeError(
            f"Only allowed values for randomness are 'error', 'different', or 'same'. "
            f"Got {randomness}"
        )
    _check_chunk_size(chunk_size, "vmap")

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not isinstance(in_dims, (int, tuple)) and in_dims is not None:
            raise ValueError(
                f"vmap(f, in_dims={in_dims}, ...): expected `in_dims` to be int or a "
                f"(potentially nested) tuple matching the structure of inputs, got: "
                f"{type(in_dims)}."
            )
        if isinstance(in_dims, tuple) and len(in_dims) != len(args):
            raise ValueError(
                f"vmap(f, in_dims={in_dims}, ...)(<inputs>): in_dims is not compatible "
                f"with the structure of `inputs`. in_dims has structure "
                f"{len(in_dims)} but inputs has {len(args)} elements."
            )
        leaves, spec = tree_flatten(args)
        dims = _broadcast(in_dims, args, "inputs")
        sizes = []
        for leaf, dim in zip(leaves, dims):
            if dim is None:
                continue
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(
                    f"vmap(f, in_dims={in_dims}, ...)(<inputs>): Got in_dim={dim} for an "
                    f"input but the input is of type {type(leaf)}. We cannot vmap over "
                    f"non-Tensor arguments, please use None as the respective in_dim"
                )
            if not -leaf.dim() <= dim < leaf.dim():
                raise ValueError(
                    f"vmap(f, in_dims={in_dims}, ...)(<inputs>): Got in_dim={dim} for some "
                    f"input, but that input is a Tensor of dimensionality {leaf.dim()} so "
                    f"expected in_dim to satisfy -{leaf.dim()} <= in_dim < {leaf.dim()}."
                )
            sizes.append(leaf.shape[dim])
        if not sizes:
            raise ValueError("vmap: Expected at least one Tensor to vmap over")
        if len(set(sizes)) != 1:
            raise ValueError(
                "vmap: Expected all tensors to have the same size in the mapped "
                f"dimension, got sizes {sizes} for the mapped dimension"
            )
        batch = sizes[0]
        results = []
        rng = torch.random.get_rng_state() if randomness != "different" else None
        for i in range(batch):
            if randomness == "same":
                torch.random.set_rng_state(rng)
            sliced = [
                leaf if dim is None else leaf.select(dim, i) for leaf, dim in zip(leaves, dims)
            ]
            out = func(*tree_unflatten(sliced, spec), **kwargs)
            if randomness == "error" and not torch.equal(torch.random.get_rng_state(), rng):
                torch.random.set_rng_state(rng)
                raise RuntimeError(
                    "vmap: called random operation while in randomness error mode. Please "
                    "either use the 'same' or 'different' randomness flags on vmap or "
                    "perform the randomness operation out of vmap"
                )
            results.append(out)
        out_leaves_per = [tree_flatten(r) for r in results]
        out_spec = out_leaves_per[0][1]
        n_out = len(out_leaves_per[0][0])
        odims = _out_dims(out_dims, results[0], n_out)
        stacked = []
        for k in range(n_out):
            column = [leaves_k[k] for leaves_k, _ in out_leaves_per]
            if not all(isinstance(c, torch.Tensor) for c in column):
                raise ValueError(
                    "vmap(f, ...): `f` must only return Tensors, got type "
                    f"{type(column[0])}. Did you mean to set out_dims= to None for output?"
                )
            dim = odims[k]
            if dim is None:
                stacked.append(column[0])
                continue
            stacked.append(torch.stack(column, dim=dim))
        return tree_unflatten(stacked, out_spec)

    return wrapper


def _out_dims(out_dims: Any, example: Any, n_out: int) -> List[Any]:
    if out_dims is None or isinstance(out_dims, int):
        return [out_dims] * n_out
    return _broadcast(out_dims, example, "outputs")
