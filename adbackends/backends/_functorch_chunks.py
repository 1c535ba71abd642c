"""``chunk_size`` for functorch copies that lack it (torch 1.12 and 1.13).

``jacrev(chunk_size=...)`` and ``vmap(chunk_size=...)`` arrived in functorch
with torch 2.0. On older copies they are emulated here from the plain
transforms, the way newer copies compute them, so results and output
structures agree (on torch 2 the emulation is bitwise equal to native
chunking).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List

from .._shared import ArgNums, basis_rows, batch_size, normalize_argnums

__all__ = ["check_chunk_size", "chunked_jacrev", "chunked_vmap"]


def check_chunk_size(chunk_size: Any, message: str) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(message)


def chunked_jacrev(
    vjp: Callable[..., Any],
    vmap: Callable[..., Any],
    func: Callable[..., Any],
    argnums: ArgNums,
    has_aux: bool,
    chunk_size: int,
) -> Callable[..., Any]:
    """``jacrev(func, argnums, has_aux=..., chunk_size=...)`` from ``vjp`` and ``vmap``.

    The Jacobian is built ``chunk_size`` rows at a time: one ``vjp`` of
    ``func``, then ``vmap(vjp_fn)`` over each chunk of standard-basis rows
    (with ``chunk_size=1``, plain calls of ``vjp_fn``, so vmap's limits do not
    apply), and the chunks are concatenated. This is how functorch >= 1.13
    computes it, so results and output structure agree.

    Parameters
    ----------
    vjp, vmap : callable
        functorch's ``vjp`` and ``vmap``.
    func, argnums, has_aux, chunk_size
        As for ``torch.func.jacrev``; ``chunk_size`` must be a positive int.

    Returns
    -------
    callable
        The Jacobian function.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    @functools.wraps(func)
    def wrapper(*args: Any) -> Any:
        positions = normalize_argnums(argnums, len(args))

        def partial(*primals: Any) -> Any:
            full = list(args)
            for pos, value in zip(positions, primals):
                full[pos] = value
            return func(*full)

        primals = tuple(args[pos] for pos in positions)
        if has_aux:
            output, vjp_fn, aux = vjp(partial, *primals, has_aux=True)
        else:
            output, vjp_fn = vjp(partial, *primals)
        flat_output, output_spec = tree_flatten(output)
        flat_primals, primals_spec = tree_flatten(primals)
        numels = [out.numel() for out in flat_output]
        total = sum(numels)

        chunks: List[List[Any]] = []
        for start in range(0, max(total, 1), chunk_size):
            stop = min(start + chunk_size, total)
            basis = basis_rows(flat_output, start, stop)
            if stop - start == 1 and chunk_size == 1:
                rows = vjp_fn(tree_unflatten([b[0] for b in basis], output_spec))
                chunks.append([r.unsqueeze(0) for r in tree_flatten(rows)[0]])
            else:
                rows = vmap(vjp_fn)(tree_unflatten(basis, output_spec))
                chunks.append(tree_flatten(rows)[0])
        if len(chunks) == 1:
            flat_rows = chunks[0]
        else:
            flat_rows = [torch.cat(parts, 0) for parts in zip(*chunks)]

        # One (total, *primal.shape) block per primal leaf: split it by output.
        per_primal = [
            [
                part.view(tuple(out.shape) + tuple(primal.shape))
                for part, out in zip(rows.split(numels, dim=0), flat_output)
            ]
            for rows, primal in zip(flat_rows, flat_primals)
        ]
        per_output = [tree_unflatten(list(blocks), primals_spec) for blocks in zip(*per_primal)]
        if not isinstance(argnums, tuple):
            per_output = [jac[0] for jac in per_output]
        jacobian = tree_unflatten(per_output, output_spec)
        return (jacobian, aux) if has_aux else jacobian

    return wrapper


def chunked_vmap(
    vmap: Callable[..., Any],
    func: Callable[..., Any],
    in_dims: Any,
    out_dims: Any,
    randomness: str,
    chunk_size: int,
) -> Callable[..., Any]:
    """``vmap(func, in_dims, out_dims, randomness, chunk_size=...)`` from a plain ``vmap``.

    The batch is cut into chunks of ``chunk_size`` samples, each chunk is
    mapped with ``vmap``, and the outputs are concatenated along their
    ``out_dims``. As in torch.func, ``randomness="same"`` restarts the random
    number generator at the same state for every chunk. Anything vmap itself
    would reject (bad ``in_dims``, mismatched batch sizes) is passed to
    ``vmap`` unchunked, so the error is vmap's own.

    Parameters
    ----------
    vmap : callable
        ``vmap(func, in_dims, out_dims)`` without ``chunk_size`` (with the
        ``randomness`` already bound).
    func, in_dims, out_dims, randomness, chunk_size
        As for ``torch.func.vmap``; ``chunk_size`` must be a positive int.

    Returns
    -------
    callable
        The mapped function.
    """
    import torch
    from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten, tree_unflatten

    whole = vmap(func, in_dims, out_dims)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flat_args, args_spec = tree_flatten(args)
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        if not isinstance(in_dims, (int, tuple)) and in_dims is not None:
            return whole(*args, **kwargs)
        flat_dims = _broadcast_to_and_flatten(dims, args_spec) if args else None
        if flat_dims is None:
            return whole(*args, **kwargs)
        batch = batch_size(flat_args, flat_dims)
        if batch is None:
            return whole(*args, **kwargs)  # no batched input, mismatched sizes, bad dims

        state = torch.get_rng_state() if randomness == "same" else None
        outputs = []
        for start in range(0, batch, chunk_size):
            rows = min(chunk_size, batch - start)
            chunk = [
                arg if dim is None else arg.narrow(dim, start, rows)
                for arg, dim in zip(flat_args, flat_dims)
            ]
            if state is not None:
                torch.set_rng_state(state)
            outputs.append(whole(*tree_unflatten(chunk, args_spec), **kwargs))
        if not outputs:  # an empty batch: let vmap say what it does with it
            return whole(*args, **kwargs)

        flat_outputs = [tree_flatten(out) for out in outputs]
        out_spec = flat_outputs[0][1]
        flat_out_dims = _broadcast_to_and_flatten(out_dims, out_spec)
        if flat_out_dims is None:
            raise ValueError(
                f"vmap: out_dims is not compatible with the structure of the outputs: "
                f"out_dims={out_dims}"
            )
        joined = [
            torch.cat([leaves[i] for leaves, _ in flat_outputs], dim=dim)
            for i, dim in enumerate(flat_out_dims)
        ]
        return tree_unflatten(joined, out_spec)

    return wrapper
