"""``vmap`` for the loop backend: call the function once per sample.

Inputs are checked exactly as torch.func checks them (same exception types,
messages that start the same way), sliced along their ``in_dims``, passed to
the function one sample at a time, and the per-sample outputs are stacked
along ``out_dims``.

Two things a loop must do that a vectorising vmap gets for free:

* Randomness. ``"error"`` compares the random number generators' states
  around each sample and raises if the function drew from them;
  ``"same"`` rewinds them before each sample, so every sample sees the draw
  a single call would see; ``"different"`` lets the samples draw in turn.
* Graphs freed by ``torch.autograd.grad``. A function that calls
  ``torch.autograd.grad`` on a graph built outside the vmap (the vjp-of-a-
  closure pattern) runs that backward once per sample, so the graph must
  survive until the last sample. While a loop vmap runs, calls to
  ``torch.autograd.grad`` from the same thread retain the graph on every
  sample but the last.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, List, Optional, Tuple, cast

from .._shared import RngState

__all__ = ["vmap"]


def _func_name(func: Any) -> str:
    if hasattr(func, "__name__"):
        return str(func.__name__)
    if isinstance(func, functools.partial):
        return f"functools.partial({_func_name(func.func)}, ...)"
    return repr(func)


# -- keeping a closed-over graph alive across samples --------------------------


_LOCAL = threading.local()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0


def _pending() -> int:
    return getattr(_LOCAL, "pending", 0)


def _make_retaining_grad(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def grad(*args: Any, **kwargs: Any) -> Any:
        if getattr(_LOCAL, "pending", 0):
            # Another sample of an enclosing loop vmap will need this graph.
            if len(args) > 3:
                args = (*args[:3], True, *args[4:])
            else:
                kwargs["retain_graph"] = True
        return original(*args, **kwargs)

    grad.__adbackends_original__ = original  # type: ignore[attr-defined]
    return grad


def _install() -> None:
    global _PATCH_USERS
    import torch

    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            current = torch.autograd.grad
            if not hasattr(current, "__adbackends_original__"):
                torch.autograd.grad = _make_retaining_grad(current)
        _PATCH_USERS += 1


def _uninstall() -> None:
    global _PATCH_USERS
    import torch

    with _PATCH_LOCK:
        _PATCH_USERS -= 1
        if _PATCH_USERS == 0:
            original = getattr(torch.autograd.grad, "__adbackends_original__", None)
            if original is not None:
                torch.autograd.grad = original


# -- checking the arguments -----------------------------------------------------


def _check_out_dims(out_dims: Any, func: Any) -> None:
    from torch.utils._pytree import tree_flatten

    if isinstance(out_dims, int):
        return
    for leaf in tree_flatten(out_dims)[0]:
        if leaf is not None and not isinstance(leaf, int):
            raise ValueError(
                f"vmap({_func_name(func)}, ..., out_dims={out_dims}): `out_dims` must be an "
                "int, None or a python collection of ints representing where in the "
                "outputs the vmapped dimension should appear."
            )


def _process_inputs(
    in_dims: Any, args: Tuple[Any, ...], func: Any
) -> Tuple[int, List[Optional[int]], List[Any], Any]:
    import torch
    from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten

    name = _func_name(func)
    if not isinstance(in_dims, (int, tuple)):
        raise ValueError(
            f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): expected `in_dims` to be int "
            "or a (potentially nested) tuple matching the structure of inputs, got: "
            f"{type(in_dims)}."
        )
    if len(args) == 0:
        raise ValueError(
            f"vmap({name})(<inputs>): got no inputs. Maybe you forgot to add inputs, or "
            "you are trying to vmap over a function with no inputs. The latter is "
            "unsupported."
        )
    flat_args, args_spec = tree_flatten(args)
    flat_in_dims = _broadcast_to_and_flatten(in_dims, args_spec)
    if flat_in_dims is None:
        raise ValueError(
            f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): in_dims is not compatible "
            f"with the structure of `inputs`. in_dims has structure "
            f"{tree_flatten(in_dims)[1]} but inputs has structure {args_spec}."
        )
    for i, (arg, in_dim) in enumerate(zip(flat_args, flat_in_dims)):
        if in_dim is not None and not isinstance(in_dim, int):
            raise ValueError(
                f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): Got in_dim={in_dim} for "
                "an input but in_dim must be either an integer dimension or None."
            )
        if in_dim is None:
            continue
        if not isinstance(arg, torch.Tensor):
            raise ValueError(
                f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): Got in_dim={in_dim} for "
                f"an input but the input is of type {type(arg)}. We cannot vmap over "
                "non-Tensor arguments, please use None as the respective in_dim"
            )
        ndim = arg.dim()
        if in_dim < -ndim or in_dim >= ndim:
            raise ValueError(
                f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): Got in_dim={in_dim} for "
                f"some input, but that input is a Tensor of dimensionality {ndim} so "
                f"expected in_dim to satisfy -{ndim} <= in_dim < {ndim}."
            )
        flat_in_dims[i] = in_dim % ndim
    sizes = [arg.shape[d] for arg, d in zip(flat_args, flat_in_dims) if d is not None]
    if not sizes:
        raise ValueError("vmap: Expected at least one Tensor to vmap over")
    if any(size != sizes[0] for size in sizes):
        raise ValueError(
            "vmap: Expected all tensors to have the same size in the mapped dimension, "
            f"got sizes {sizes} for the mapped dimension"
        )
    return sizes[0], flat_in_dims, flat_args, args_spec


def _flat_out_dims(out_dims: Any, output: Any, spec: Any, func: Any) -> List[Any]:
    import torch
    from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten

    def incompatible() -> ValueError:
        return ValueError(
            f"vmap({_func_name(func)}, ..., out_dims={out_dims})(<inputs>): out_dims is "
            "not compatible with the structure of `outputs`. out_dims has structure "
            f"{tree_flatten(out_dims)[1]} but outputs has structure {spec}."
        )

    if isinstance(output, torch.Tensor):
        # A lone tensor output takes an int, None or a 1-tuple.
        if out_dims is None or isinstance(out_dims, int):
            return [out_dims]
        if isinstance(out_dims, tuple) and len(out_dims) == 1:
            return list(out_dims)
        raise incompatible()
    flat = _broadcast_to_and_flatten(out_dims, spec)
    if flat is None:
        raise incompatible()
    return list(flat)


# -- the map -------------------------------------------------------------------


_RANDOM_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use "
    "the 'same' or 'different' randomness flags on vmap or perform the randomness "
    "operation out of vmap"
)


def _sample_args(flat_args: List[Any], flat_in_dims: List[Optional[int]], i: int) -> List[Any]:
    return [arg if d is None else arg.select(d, i) for arg, d in zip(flat_args, flat_in_dims)]


def _empty_sample_args(flat_args: List[Any], flat_in_dims: List[Optional[int]]) -> List[Any]:
    """Stand-ins for a sample of an empty batch: zeros of a sample's shape."""
    out = []
    for arg, d in zip(flat_args, flat_in_dims):
        if d is None:
            out.append(arg)
        else:
            shape = arg.shape[:d] + arg.shape[d + 1 :]
            out.append(arg.new_zeros(shape))
    return out


def _varies(column: List[Any]) -> bool:
    """Whether per-sample outputs differ, i.e. the output depends on the sample."""
    import torch

    first = column[0]
    for other in column[1:]:
        if other is first:
            continue
        if not isinstance(first, torch.Tensor) or not isinstance(other, torch.Tensor):
            if type(other) is not type(first) or other != first:
                return True
            continue
        if other.shape != first.shape or other.dtype != first.dtype:
            return True
        if torch.equal(other, first):
            continue
        # NaN != NaN: floating outputs are equal when their NaNs and the
        # remaining values agree.
        if not first.is_floating_point() or not torch.equal(first.isnan(), other.isnan()):
            return True
        if not torch.equal(torch.nan_to_num(first), torch.nan_to_num(other)):
            return True
    return False


def _run(
    func: Callable[..., Any],
    in_dims: Any,
    out_dims: Any,
    randomness: str,
    chunk_size: Optional[int],
    args: Tuple[Any, ...],
    kwargs: Any,
) -> Any:
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from ._loop_jacrev import check_chunk_size_type

    _check_out_dims(out_dims, func)
    batch, flat_in_dims, flat_args, args_spec = _process_inputs(in_dims, args, func)
    check_chunk_size_type(chunk_size, "vmap")
    name = _func_name(func)

    rng = RngState() if randomness != "different" else None
    outputs: List[List[Any]] = []
    out_spec = None
    first_output: Any = None
    # Every sample but the last keeps graphs that torch.autograd.grad frees.
    retain = batch > 1
    pending = retain
    if retain:
        _install()
        _LOCAL.pending = _pending() + 1
    try:
        for i in range(max(batch, 1)):
            if pending and i == batch - 1:
                _LOCAL.pending -= 1
                pending = False
            if randomness == "same" and i:
                rng.restore()  # type: ignore[union-attr]
            if batch == 0:
                sample = _empty_sample_args(flat_args, flat_in_dims)
            else:
                sample = _sample_args(flat_args, flat_in_dims, i)
            output = func(*tree_unflatten(sample, args_spec), **kwargs)
            leaves, spec = tree_flatten(output)
            if out_spec is None:
                out_spec, first_output = spec, output
            elif spec != out_spec:
                raise ValueError(
                    f"vmap({name}, ...): `{name}` returned outputs of different structures "
                    f"for different samples: {out_spec} and {spec}. The loop backend "
                    "stacks per-sample outputs, so they must have one structure."
                )
            outputs.append(leaves)
        # One comparison for the whole batch: a random operation in any sample
        # leaves the default generators moved on.
        if randomness == "error" and not rng.unchanged():  # type: ignore[union-attr]
            rng.restore()  # type: ignore[union-attr]
            raise RuntimeError(_RANDOM_ERROR)
    finally:
        if pending:
            _LOCAL.pending -= 1
        if retain:
            _uninstall()

    flat_dims = _flat_out_dims(out_dims, first_output, out_spec, func)
    result = []
    for k, dim in enumerate(flat_dims):
        column = [leaves[k] for leaves in outputs]
        if dim is None:
            if isinstance(column[0], torch.Tensor) and _varies(column):
                raise ValueError(
                    f"vmap({name}, ...): `{name}` can not return a BatchedTensor when "
                    "out_dim is None"
                )
            result.append(column[0])
            continue
        for value in column:
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"vmap({name}, ...): `{name}` must only return Tensors, got type "
                    f"{type(value)}. Did you mean to set out_dims= to None for output?"
                )
        if batch == 0:
            result.append(column[0].unsqueeze(dim).narrow(dim, 0, 0))
        else:
            # Batch-first, then moved: the same memory layout as torch.func's.
            result.append(torch.stack(column).movedim(0, dim))
        column.clear()
        for leaves in outputs:
            leaves[k] = None
    # The loop above ran at least once, so the structure is known.
    return tree_unflatten(result, cast(Any, out_spec))


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
    """Map ``func`` over a dimension of its inputs, one sample at a time.

    Same contract as ``torch.func.vmap``.

    Parameters
    ----------
    func : callable
        Takes the per-sample arguments; returns a tensor or a pytree of them
        (non-tensors where the matching ``out_dims`` is ``None``).
    in_dims : int or tuple
        Where each argument is batched: an int for all, or a tuple with one
        entry per positional argument, itself a pytree prefix of that argument
        (``None`` for unbatched). Negative dims count from the end.
    out_dims : int, None or pytree
        Where the batch dimension goes in each output; ``None`` for an output
        that does not depend on the sample.
    randomness : {"error", "different", "same"}
        What random operations inside ``func`` do: raise ``RuntimeError``,
        draw independently per sample, or give every sample the same draw.
    chunk_size : int or None
        Accepted and validated as torch.func does; a loop holds one sample in
        flight at a time anyway.

    Returns
    -------
    callable
        The batched function. Keyword arguments are passed through unbatched.

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends.loop import vmap
    >>> x, y = torch.ones(3, 2), torch.tensor([1.0, 2.0])
    >>> vmap(torch.dot, in_dims=(0, None))(x, y)
    tensor([3., 3., 3.])
    >>> vmap(lambda d: d["a"] * d["b"], in_dims=({"a": 0, "b": None},))(
    ...     {"a": x, "b": y}).shape
    torch.Size([3, 2])
    """
    if randomness not in ("error", "different", "same"):
        raise RuntimeError(
            "Only allowed values for randomness are 'error', 'different', or 'same'. "
            f"Got {randomness}"
        )
    if not (chunk_size is None or chunk_size > 0):
        raise ValueError(f"vmap: chunk_size should be None or greater than 0. (got {chunk_size})")

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return _run(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)

    return wrapped
