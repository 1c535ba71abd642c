"""``vmap`` for the loop backend: call the function once per sample.

Inputs are checked exactly as torch.func checks them (same exception types,
messages that start the same way), sliced along their ``in_dims``, passed to
the function one sample at a time, and the per-sample outputs are stacked
along ``out_dims``. Tensors in and out take a path without pytrees: each
argument is sliced once for the whole batch, the outputs are stacked once,
so a map costs what a hand-written loop over ``unbind`` costs.

An output whose ``out_dims`` entry is ``None`` must not depend on the batch.
Only then, a torch function mode follows which tensors were computed from
the per-sample arguments, which is what makes torch.func's outputs batched.

Two things a loop must do that a vectorising vmap gets for free:

* Randomness. ``"error"`` compares the random number generators' states
  before and after the batch and raises if the function drew from them;
  ``"same"`` rewinds them before each sample, so every sample sees the draw
  a single call would see; ``"different"`` lets the samples draw in turn.
* Graphs freed by ``torch.autograd.grad``. A function that calls
  ``torch.autograd.grad`` on a graph built outside the vmap (the vjp-of-a-
  closure pattern) runs that backward once per sample, so the graph must
  survive until the last sample. While a loop vmap runs,
  ``torch.autograd.grad`` is a wrapper (installed process-wide, counted so
  that concurrent maps share it) that retains the graph on every sample but
  the last for calls from the map's own thread; a thread-local counter tells
  it which calls those are, and every other call passes through unchanged.
"""

from __future__ import annotations

import functools
import sys
import threading
from itertools import islice, repeat
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
)

from .._shared import RngState
from ._loop_jacrev import check_chunk_size_type, flatten, unflatten

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


# (original, wrapper): the wrapper is made once per original, since
# functools.wraps costs more than a small sample does.
_WRAPPER: List[Any] = [None, None]


def _install() -> None:
    global _PATCH_USERS
    autograd: Any = sys.modules["torch.autograd"]

    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            current = autograd.grad
            if not hasattr(current, "__adbackends_original__"):
                if _WRAPPER[0] is not current:
                    _WRAPPER[:] = [current, _make_retaining_grad(current)]
                autograd.grad = _WRAPPER[1]
        _PATCH_USERS += 1


def _uninstall() -> None:
    global _PATCH_USERS
    autograd: Any = sys.modules["torch.autograd"]

    with _PATCH_LOCK:
        _PATCH_USERS -= 1
        if _PATCH_USERS == 0:
            original = getattr(autograd.grad, "__adbackends_original__", None)
            if original is not None:
                autograd.grad = original


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


#: Unbatched arguments passed whole to every sample: immutable leaves as they are.
_AS_IS = (int, float, bool, str, type(None))


def _whole(arg: Any) -> bool:
    """Whether an unbatched (``in_dim=None``) argument can skip the pytree path.

    Tensors, Python scalars, ``None``, and plain dicts, tuples and lists of
    tensors (model parameters): each sample gets what torch.func's
    flatten-and-rebuild gives, see :func:`_unbatched`.
    """
    import torch

    tensor = torch.Tensor
    if isinstance(arg, tensor) or type(arg) in _AS_IS:
        return True
    kind = type(arg)
    if kind is dict:
        return all(isinstance(v, tensor) for v in arg.values())
    if kind is tuple or kind is list:
        return all(isinstance(v, tensor) for v in arg)
    return False


def _unbatched(arg: Any, n: int) -> Iterable[Any]:
    """An unbatched argument for each of ``n`` samples.

    torch.func rebuilds containers from their leaves, so a function that
    changes its dict or list does not change the caller's: each sample gets a
    shallow copy of a dict or list, the very object otherwise.
    """
    kind = type(arg)
    if kind is dict or kind is list:
        return map(kind, repeat(arg, n))
    return repeat(arg, n)


def _tensor_inputs(in_dims: Any, args: Tuple[Any, ...]) -> Optional[Tuple[int, List[Any]]]:
    """``(batch, dims)`` when ``in_dims`` is flat and valid for tensor arguments.

    The common case, checked without pytrees: every batched argument is a
    tensor, every unbatched one passes :func:`_whole`. Anything else
    (pytrees, non-tensors, an invalid dim) gives ``None``:
    :func:`_process_inputs` then handles it, and raises torch.func's errors.
    """
    import torch

    n = len(args)
    if type(in_dims) is int:
        dims: List[Any] = [in_dims] * n
    elif type(in_dims) is tuple and len(in_dims) == n:
        dims = list(in_dims)
    else:
        return None
    batch = -1
    for i, (arg, d) in enumerate(zip(args, dims)):
        if d is None:
            if not _whole(arg):
                return None
            continue
        if not isinstance(arg, torch.Tensor):
            return None
        if type(d) is not int:
            return None
        ndim = arg.dim()
        if d < -ndim or d >= ndim:
            return None
        if d < 0:
            d = dims[i] = d + ndim
        size = arg.shape[d]
        if batch < 0:
            batch = size
        elif size != batch:
            return None
    return None if batch < 0 else (batch, dims)


def _columns(
    flat_args: Sequence[Any], flat_in_dims: Sequence[Optional[int]], batch: int
) -> Iterator[Tuple[Any, ...]]:
    """Per-sample argument tuples, each argument sliced once for the whole batch.

    An argument that does not require grad is split by one ``unbind``. One
    that requires grad is sliced by ``select`` just before its sample runs, as
    torch.func would see it: an in-place update on such a slice must rebase
    the argument's history, which the views of a multi-output ``unbind``
    refuse.
    """
    columns: List[Iterable[Any]] = []
    for arg, d in zip(flat_args, flat_in_dims):
        if d is None:
            columns.append(_unbatched(arg, batch))
        elif arg.requires_grad:
            columns.append(map(functools.partial(arg.select, d), range(batch)))
        else:
            columns.append(arg.unbind(d))
    return zip(*columns)


def _empty_sample_args(flat_args: List[Any], flat_in_dims: List[Optional[int]]) -> List[Any]:
    """Stand-ins for a sample of an empty batch: zeros of a sample's shape."""
    out: List[Any] = []
    for arg, d in zip(flat_args, flat_in_dims):
        if d is None:
            out.extend(_unbatched(arg, 1))
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


# -- which outputs depend on the batched inputs ----------------------------------


def _make_probe(mode_base: Any) -> Any:
    """A torch function mode that marks every tensor computed from a marked one.

    torch.func returns a BatchedTensor from any operation that takes one, so
    an output "depends on the batch" exactly when such a chain of operations
    leads from a per-sample argument to it, whatever the values (``v * 0``)
    and whether or not autograd records it (comparisons, ``detach``,
    ``no_grad``). Marks are weak references by id, so intermediates are freed
    as usual.
    """
    import weakref

    import torch

    tensor = torch.Tensor
    # Builds from Python data: torch.func's result is not batched.
    unbatched = {tensor.new_tensor}

    class _Probe(mode_base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.marks: Dict[int, Any] = {}

        def mark(self, value: Any) -> None:
            self.marks[id(value)] = weakref.ref(value)

        def marked(self, value: Any) -> bool:
            ref = self.marks.get(id(value))
            return ref is not None and ref() is value

        def _any_marked(self, values: Iterable[Any]) -> bool:
            for value in values:
                if isinstance(value, tensor):
                    if self.marked(value):
                        return True
                elif isinstance(value, (list, tuple)) and self._any_marked(value):
                    return True
            return False

        def _mark_all(self, value: Any) -> None:
            if isinstance(value, tensor):
                self.mark(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    self._mark_all(item)

        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            if func not in unbatched and (
                self._any_marked(args) or self._any_marked(kwargs.values())
            ):
                self._mark_all(result)
            return result

    return _Probe()


def _probe() -> Any:
    """A fresh probe, or ``None`` on a torch without torch function modes."""
    import torch.overrides

    mode_base = getattr(torch.overrides, "TorchFunctionMode", None)
    if mode_base is None:
        return None
    try:
        return _make_probe(mode_base)
    except TypeError:
        # torch 1.12 builds modes only through push_torch_function_mode; there
        # the per-sample values decide, as they did before modes existed.
        return None


def _has_none(out_dims: Any) -> bool:
    if out_dims is None:
        return True
    if isinstance(out_dims, int):
        return False
    from torch.utils._pytree import tree_flatten

    return any(d is None for d in tree_flatten(out_dims)[0])


# -- the loop ----------------------------------------------------------------------


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

    if (
        len(args) == 1
        and type(in_dims) is int
        and type(out_dims) is int
        and randomness != "same"
        and chunk_size is None
        and not kwargs
    ):
        # The common case, decided before anything else is built: one tensor
        # that does not require grad, split once, each view passed as is.
        arg = args[0]
        if isinstance(arg, torch.Tensor) and not arg.requires_grad:
            ndim = arg.dim()
            if -ndim <= in_dims < ndim and arg.shape[in_dims] > 1:
                return _map_views(func, arg.unbind(in_dims), out_dims, randomness == "error")

    if type(out_dims) is not int:
        _check_out_dims(out_dims, func)
    args_spec = None
    prepared: Optional[Tuple[int, List[Any]]] = None
    if len(args) == 1 and type(in_dims) is int and isinstance(args[0], torch.Tensor):
        # One tensor: checked here, without building lists.
        ndim = args[0].dim()
        if -ndim <= in_dims < ndim:
            dim = in_dims % ndim
            prepared = (args[0].shape[dim], [dim])
    else:
        prepared = _tensor_inputs(in_dims, args)
    if prepared is None:
        batch, flat_in_dims, flat_args, args_spec = _process_inputs(in_dims, args, func)
    else:
        batch, flat_in_dims = prepared
        flat_args = list(args)
    if chunk_size is not None:
        check_chunk_size_type(chunk_size, "vmap")
    probe = _probe() if _has_none(out_dims) else None

    if probe is None and args_spec is None and batch and not kwargs:
        # Tensors only: per-sample tuples straight from the sliced columns.
        outputs = _call_samples(
            func, _columns(flat_args, flat_in_dims, batch), True, batch, randomness
        )
        return _assemble(outputs, out_dims, batch, [], func)

    if batch == 0:
        # torch.func runs the function once, on a sample-shaped stand-in.
        samples: Iterable[Tuple[Any, ...]] = [tuple(_empty_sample_args(flat_args, flat_in_dims))]
    else:
        samples = _columns(flat_args, flat_in_dims, batch)
    call = func
    marks: List[List[bool]] = []
    if probe is not None:
        batched = [k for k, d in enumerate(flat_in_dims) if d is not None]

        def seeded(sample: Tuple[Any, ...]) -> Tuple[Any, ...]:
            probe.marks.clear()
            for k in batched:
                probe.mark(sample[k])
            return sample

        def call(*sample_args: Any, **sample_kwargs: Any) -> Any:
            from torch.utils._pytree import tree_flatten

            output = func(*sample_args, **sample_kwargs)
            leaves = [output] if isinstance(output, torch.Tensor) else tree_flatten(output)[0]
            marks.append([isinstance(v, torch.Tensor) and probe.marked(v) for v in leaves])
            return output

        samples = map(seeded, samples)
    if args_spec is not None:
        samples = map(functools.partial(_unflatten_args, spec=args_spec), samples)
    if kwargs:
        call = functools.partial(call, **kwargs)

    if probe is None:
        outputs = _call_samples(call, samples, True, max(batch, 1), randomness)
    else:
        with probe:
            outputs = _call_samples(call, samples, True, max(batch, 1), randomness)
    return _assemble(outputs, out_dims, batch, marks, func)


def _map_views(func: Callable[..., Any], views: Sequence[Any], out_dims: int, check: bool) -> Any:
    """:func:`_call_samples` and :func:`_assemble` in one, for two or more views.

    The same steps, with no option left to test per sample: the cost of a
    call here is meant to be that of a hand-written loop over ``unbind``.
    """
    import torch

    rng = RngState() if check else None
    _install()
    _LOCAL.pending = _pending() + 1
    pending = True
    try:
        outputs = [func(view) for view in views[:-1]]
        _LOCAL.pending -= 1
        pending = False
        outputs.append(func(views[-1]))
        if rng is not None and not rng.unchanged():
            rng.restore()
            raise RuntimeError(_RANDOM_ERROR)
    finally:
        if pending:
            _LOCAL.pending -= 1
        _uninstall()
    try:
        stacked = torch.stack(outputs)
    except TypeError:
        # Not all tensors: the general path says why, or handles pytrees.
        return _assemble(outputs, out_dims, len(views), [], func)
    return stacked if out_dims == 0 else stacked.movedim(0, out_dims)


def _unflatten_args(leaves: Tuple[Any, ...], spec: Any) -> Any:
    from torch.utils._pytree import tree_unflatten

    return tree_unflatten(list(leaves), spec)


def _call_samples(
    call: Callable[..., Any], samples: Iterable[Any], star: bool, n: int, randomness: str
) -> List[Any]:
    """``call`` on each of the ``n`` samples (unpacked when ``star``), in order.

    Randomness and graphs freed by ``torch.autograd.grad`` are handled here:
    the generators are compared once for the whole batch, and every sample
    but the last keeps the graphs that ``torch.autograd.grad`` frees.
    """
    rng = RngState() if randomness != "different" else None
    same = randomness == "same"
    samples = iter(samples)
    pending = n > 1
    if pending:
        _install()
        _LOCAL.pending = _pending() + 1
    try:
        if same:
            outputs: List[Any] = []
            for k, sample in enumerate(samples):
                if k:
                    rng.restore()  # type: ignore[union-attr]
                if k == n - 1 and pending:
                    _LOCAL.pending -= 1
                    pending = False
                outputs.append(call(*sample) if star else call(sample))
        else:
            if star:
                outputs = [call(*sample) for sample in islice(samples, n - 1)]
            else:
                outputs = [call(sample) for sample in islice(samples, n - 1)]
            if pending:
                _LOCAL.pending -= 1
                pending = False
            last = next(samples)
            outputs.append(call(*last) if star else call(last))
        # One comparison for the whole batch: a random operation in any sample
        # leaves the default generators moved on.
        if randomness == "error" and not rng.unchanged():  # type: ignore[union-attr]
            rng.restore()  # type: ignore[union-attr]
            raise RuntimeError(_RANDOM_ERROR)
    finally:
        if pending:
            _LOCAL.pending -= 1
        if n > 1:
            _uninstall()
    return outputs


def _assemble(
    outputs: List[Any], out_dims: Any, batch: int, marks: List[List[bool]], func: Any
) -> Any:
    """Stack the per-sample outputs along ``out_dims``."""
    import torch

    if type(out_dims) is int and batch:
        # The common case: one stack, batch first, then moved, which gives the
        # memory layout torch.func's results have. Outputs that are not all
        # tensors make stack raise TypeError; the general path below says why.
        try:
            stacked = torch.stack(outputs)
        except TypeError:
            pass
        else:
            return stacked if out_dims == 0 else stacked.movedim(0, out_dims)

    from torch.utils._pytree import tree_flatten

    name = _func_name(func)
    columns_by_sample: List[List[Any]] = []
    first = outputs[0]
    out_spec = None
    for output in outputs:
        # Flat dicts, tuples and lists of tensors without the pytree walk; their
        # specs are equal exactly when torch's would be.
        leaves, spec = flatten(output)
        if out_spec is None:
            out_spec = spec
        elif spec != out_spec:
            raise ValueError(
                f"vmap({name}, ...): `{name}` returned outputs of different structures "
                f"for different samples: {tree_flatten(first)[1]} and "
                f"{tree_flatten(output)[1]}. The loop backend stacks per-sample "
                "outputs, so they must have one structure."
            )
        columns_by_sample.append(leaves)
    outputs.clear()
    if type(out_dims) is int and not isinstance(first, torch.Tensor):
        flat_dims: List[Any] = [out_dims] * len(columns_by_sample[0])
    else:
        flat_dims = _flat_out_dims(out_dims, first, tree_flatten(first)[1], func)
    del first
    result = []
    for k, dim in enumerate(flat_dims):
        column = [leaves[k] for leaves in columns_by_sample]
        if dim is None:
            if isinstance(column[0], torch.Tensor) and (
                any(m[k] for m in marks) or _varies(column)
            ):
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
        for leaves in columns_by_sample:
            leaves[k] = None
    # The loop ran at least once, so the structure is known.
    return unflatten(result, out_spec)


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
