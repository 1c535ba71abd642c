"""``jacrev`` for the loop backend: one ``torch.autograd.grad`` call per row.

The Jacobian of every output with respect to every differentiated input is
built row by row. Each row is a vector-Jacobian product with a one-hot
cotangent; the cotangents are views into one buffer of ``2 m - 1`` numbers
(a single one among zeros), so no ``m x m`` identity is ever built and no
kernel runs per row to make a seed.

Nesting works like ``torch.autograd.functional``: each level differentiates
a fresh tensor of its own (a new leaf, or a new view when the argument is
already part of an outer graph), so an inner level never differentiates an
outer level's variable (no perturbation confusion). A level keeps its graph
(``create_graph``) only when the result must stay differentiable: grad mode
is on outside the transform and the outputs reach a tensor that requires
grad and is not this level's own input (an outer level's variable, or a
parameter the function closes over). This mirrors when torch.func's results
require grad.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .._shared import ArgNums, normalize_argnums

__all__ = ["jacrev"]


# -- pytrees, with shortcuts for a lone tensor and flat containers of them --------

_LEAF = object()


class _FlatDict(tuple):  # type: ignore[type-arg]
    """The spec of a plain ``dict`` whose values are all tensors: its keys, in order."""

    __slots__ = ()


class _FlatSequence(int):
    """The spec of a plain ``tuple`` (``list`` when negative) of ``n`` tensors."""

    __slots__ = ()


def flatten(tree: Any) -> Tuple[List[Any], Any]:
    """``tree_flatten``, without its cost for a tensor or a flat container of tensors.

    A plain ``dict``, ``tuple`` or ``list`` whose entries are all tensors
    (model parameters, the usual case) is flattened as ``tree_flatten``
    flattens it, in its own order, with a spec only :func:`unflatten` reads.
    """
    import torch

    tensor = torch.Tensor
    if isinstance(tree, tensor):
        return [tree], _LEAF
    kind = type(tree)
    if kind is dict:
        leaves = list(tree.values())
        for leaf in leaves:
            if not isinstance(leaf, tensor):
                break
        else:
            return leaves, _FlatDict(tree)
    elif kind is tuple or kind is list:
        for leaf in tree:
            if not isinstance(leaf, tensor):
                break
        else:
            n = len(tree)
            return list(tree), _FlatSequence(n if kind is tuple else -1 - n)
    from torch.utils._pytree import tree_flatten

    return tree_flatten(tree)


def unflatten(leaves: Sequence[Any], spec: Any) -> Any:
    """The inverse of :func:`flatten`."""
    if spec is _LEAF:
        return leaves[0]
    kind = type(spec)
    if kind is _FlatDict:
        return dict(zip(spec, leaves))
    if kind is _FlatSequence:
        return tuple(leaves) if spec >= 0 else list(leaves)
    from torch.utils._pytree import tree_unflatten

    return tree_unflatten(list(leaves), spec)


# -- argument checks, with torch.func's exception types and messages -----------


def check_chunk_size_type(chunk_size: Any, api: str) -> None:
    """Reject a ``chunk_size`` that passed the ``> 0`` test but is not an int."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(
            f"{api}: `chunk_size` should be None or a positive int, "
            f"got {type(chunk_size).__name__}: {chunk_size!r}"
        )


def _error_if_complex(leaves: Sequence[Any], what: str) -> None:
    import torch

    for idx, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_complex():
            raise RuntimeError(
                f"jacrev: Expected all {what} to be real but received complex tensor "
                f"at flattened input idx: {idx}"
            )


def _check_outputs(leaves: Sequence[Any]) -> None:
    import torch

    if (len(leaves) == 1 and leaves[0] is None) or len(leaves) < 1:
        raise RuntimeError(
            "vjp(f, *primals): Expected f to be a function that has non-empty output "
            f"(got output = {leaves})"
        )
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise RuntimeError(
                "vjp(f, *primals): expected f(*primals) to return only tensors, "
                f"got unsupported type {type(leaf)}"
            )
    for leaf in leaves:
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise RuntimeError(
                "vjp(f, ...): All outputs of f must be floating-point or complex Tensors, "
                f"got Tensor with dtype {leaf.dtype}"
            )


# -- fresh tensors and the question "does an outer level need this graph?" -----


class _Level:
    """One running ``jacrev`` call; its fresh leaves point at it.

    Once the call has returned, its leaves are private leftovers: graphs that
    a later level kept through them (``create_graph``) cannot be
    differentiated from outside, so they no longer count as "requires grad".
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = True


_LEVEL_ATTR = "_adbackends_level"


def _retired(leaf: Any) -> bool:
    """Whether ``leaf`` is a fresh leaf of a ``jacrev`` call that has returned."""
    level = getattr(leaf, _LEVEL_ATTR, None)
    return level is not None and not level.active


def _fresh(value: Any, attach: bool, level: _Level) -> Any:
    """This level's own differentiable handle on the argument ``value``.

    With ``attach`` and a ``value`` that already requires grad, a new view: it
    stays attached to the outer graph, yet is a node of its own, so this
    level differentiates only its own uses. Otherwise a new detached leaf,
    tagged with ``level`` (the tag keeps the leaf's Python object, and so the
    tag, alive for as long as a graph holds the leaf).
    """
    import torch

    if not isinstance(value, torch.Tensor):
        raise ValueError(f"Thing passed to transform API must be Tensor, got {type(value)}")
    if attach and value.requires_grad:
        return value.view_as(value)
    if value.is_inference():
        # Made under inference_mode: autograd cannot record it, a copy it can.
        value = value.clone()
    # requires_grad_ raises torch's own error for integer and bool tensors.
    leaf = value.detach().requires_grad_(True)
    setattr(leaf, _LEVEL_ATTR, level)
    return leaf


class _OuterGraph:
    """Answers "does this tensor reach a requires-grad tensor not ours?".

    Walks the autograd graph from a tensor towards its leaves. Reaching one of
    this level's own views (an argument that was attached to an outer graph)
    or a leaf that is neither one of this level's fresh leaves nor a leftover
    of a level that has returned means an outer level needs the result to be
    differentiable. The walk stops at the first such node; nodes found to
    lead nowhere outer are remembered.
    """

    def __init__(self, own: Sequence[Any]) -> None:
        # Node objects are compared by id, so every node whose id is kept
        # (own views, nodes known to be clean) is kept alive too: the id of a
        # freed node object could be reused by another one.
        self._keep: List[Any] = []
        self._own_nodes: Set[int] = set()
        self._own_leaves: Set[int] = set()
        for tensor in own:
            node = tensor.grad_fn
            if node is not None:
                self._keep.append(node)
                self._own_nodes.add(id(node))
            else:
                self._own_leaves.add(id(tensor))
        self._clean: Set[int] = set()

    def reaches(self, tensor: Any) -> bool:
        if not tensor.requires_grad:
            return False
        root = tensor.grad_fn
        if root is None:
            return id(tensor) not in self._own_leaves and not _retired(tensor)
        own_nodes, own_leaves, clean = self._own_nodes, self._own_leaves, self._clean
        stack = [root]
        pop, push = stack.pop, stack.append
        # id -> node: holding the node keeps its id from being reused.
        seen: Dict[int, Any] = {}
        while stack:
            node = pop()
            key = id(node)
            if key in seen or key in clean:
                continue
            if key in own_nodes:
                return True
            seen[key] = node
            next_nodes = node.next_functions
            if next_nodes:
                for child, _ in next_nodes:
                    if child is not None:
                        push(child)
                continue
            # A leaf's AccumulateGrad node: is the leaf ours?
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in own_leaves and not _retired(variable):
                return True
        clean.update(seen)
        self._keep.extend(seen.values())
        return False

    def any(self, tensors: Iterable[Any]) -> bool:
        return any(self.reaches(t) for t in tensors)


def _original_grad() -> Callable[..., Any]:
    """``torch.autograd.grad``, bypassing the wrapper a running loop vmap installs."""
    from ._torch_compat import original_grad

    return original_grad()


# -- the rows ------------------------------------------------------------------

# One-hot rows by (shape, dtype, device): read-only, so they can be shared.
_ROWS: Dict[Tuple[Any, Any, Any], Any] = {}
_ROWS_CACHE_LIMIT = 64
_ROWS_CACHE_MAX_NUMEL = 4096


def _one_hot_rows(out: Any) -> Any:
    """Every one-hot cotangent for ``out``, as overlapping views of one window.

    The window is ``2 m - 1`` zeros with a one in the middle; ``rows[r]`` is
    the view starting at ``r``, shaped like ``out``, with its one at flat index
    ``m - 1 - r``; so row ``j`` of the Jacobian takes ``rows[m - 1 - j]``.
    Nothing of size ``m x m`` is allocated. The rows are only read (autograd
    never writes into the cotangents it is given), so small ones are cached:
    making them costs more than a small backward pass.
    """
    key = (out.shape, out.dtype, out.device)
    rows = _ROWS.get(key)
    if rows is not None:
        return rows
    import torch

    m = out.numel()
    # A normal tensor even under inference_mode, since it is cached.
    with torch.inference_mode(False):
        window = out.new_zeros(2 * m - 1)
        window[m - 1] = 1
    strides = []
    step = 1
    for size in reversed(key[0]):
        strides.append(step)
        step *= size
    rows = window.as_strided((m, *key[0]), (1, *reversed(strides)))
    if m <= _ROWS_CACHE_MAX_NUMEL and type(out) is torch.Tensor:
        if len(_ROWS) >= _ROWS_CACHE_LIMIT:
            _ROWS.clear()
        _ROWS[key] = rows
    return rows


def _jacobian_blocks(
    outs: Sequence[Any],
    inputs: Sequence[Any],
    keep_graph: bool,
    chunk_size: Optional[int],
    grad: Callable[..., Any],
) -> List[List[Any]]:
    """d out / d input for every output and input, shaped ``out.shape + input.shape``.

    Like torch.func, each row is one vector-Jacobian product of all outputs
    together, with a one-hot cotangent for the row's output and zeros for the
    others; so a block gets a graph wherever torch.func's would.
    """
    if len(outs) == 1 and outs[0].requires_grad and outs[0].numel():
        return [_rows(outs[0], 0, list(outs), [None], inputs, keep_graph, chunk_size, grad)]
    # Positions, not identities: the same tensor may be returned twice.
    live = [k for k, out in enumerate(outs) if out.requires_grad]
    live_outs = [outs[k] for k in live]
    # Zero cotangents for the outputs other than the row's, made when needed.
    zeros: List[Any] = [None] * len(live_outs)
    per_output: List[List[Any]] = []
    for k, out in enumerate(outs):
        m = out.numel()
        if m == 0 or not live_outs:
            per_output.append([inp.new_zeros((*out.shape, *inp.shape)) for inp in inputs])
            continue
        slot = live.index(k) if out.requires_grad else -1
        for s, other in enumerate(live_outs):
            if s != slot and zeros[s] is None:
                zeros[s] = other.new_zeros(other.shape)
        if slot < 0:
            # Every row is the same product with zero cotangents: do it once.
            grads = grad(
                live_outs,
                inputs,
                zeros,
                retain_graph=True,
                create_graph=keep_graph,
                allow_unused=True,
            )
            per_output.append(
                [
                    inp.new_zeros((*out.shape, *inp.shape))
                    if g is None
                    else g.expand((m, *inp.shape)).reshape((*out.shape, *inp.shape)).clone()
                    for g, inp in zip(grads, inputs)
                ]
            )
            continue
        per_output.append(_rows(out, slot, live_outs, zeros, inputs, keep_graph, chunk_size, grad))
    return per_output


def _rows(
    out: Any,
    slot: int,
    live_outs: List[Any],
    zeros: List[Any],
    inputs: Sequence[Any],
    keep_graph: bool,
    chunk_size: Optional[int],
    grad: Callable[..., Any],
) -> List[Any]:
    """The Jacobian blocks of the live output ``out``, row by row."""
    import torch

    m = out.numel()
    seeds = _one_hot_rows(out)
    if len(live_outs) == 1:
        # The common case, kept lean: one output, its one-hot row as cotangent.
        def products(start: int, stop: int) -> List[Any]:
            # Rows start..stop-1 take seeds m-1-start down to m-stop.
            chunk = (seeds if stop - start == m else seeds[m - stop : m - start]).unbind(0)
            return [
                grad(
                    out,
                    inputs,
                    seed,
                    retain_graph=True,
                    create_graph=keep_graph,
                    allow_unused=True,
                )
                for seed in reversed(chunk)
            ]

    else:
        cotangents = list(zeros)

        def products(start: int, stop: int) -> List[Any]:
            result = []
            for seed in reversed(seeds[m - stop : m - start].unbind(0)):
                cotangents[slot] = seed
                result.append(
                    grad(
                        live_outs,
                        inputs,
                        cotangents,
                        retain_graph=True,
                        create_graph=keep_graph,
                        allow_unused=True,
                    )
                )
            return result

    shapes = [(*out.shape, *inp.shape) for inp in inputs]
    step = m if chunk_size is None else min(chunk_size, m)
    if step >= m or keep_graph:
        # One chunk, or a graph to keep: stack each chunk, join the chunks.
        chunks: List[List[Any]] = [[] for _ in inputs]
        for start in range(0, m, step):
            rows = products(start, min(start + step, m))
            for i, column in enumerate(chunks):
                if rows[0][i] is not None:
                    column.append(torch.stack([row[i] for row in rows]))
            del rows
        blocks = []
        for inp, shape, column in zip(inputs, shapes, chunks):
            if not column:
                blocks.append(inp.new_zeros(shape))
                continue
            block = column[0] if len(column) == 1 else torch.cat(column)
            # Stacked rows are (m, *inp.shape): already shaped for a 1-d output.
            blocks.append(block if out.dim() == 1 else block.view(shape))
        return blocks
    # Several chunks and no graph: write each chunk into the result, so that
    # only one chunk of rows is in flight beside it.
    blocks = [inp.new_zeros((m, *inp.shape)) for inp in inputs]
    for start in range(0, m, step):
        stop = min(start + step, m)
        rows = products(start, stop)
        for i, block in enumerate(blocks):
            # Whether an input is reachable does not depend on the row.
            if rows[0][i] is not None:
                torch.stack([row[i] for row in rows], out=block[start:stop])
        del rows
    return [block.view(shape) for block, shape in zip(blocks, shapes)]


def _aux_leaf(leaf: Any, originals: Dict[int, Any], outer: Optional[_OuterGraph]) -> Any:
    """One aux tensor as torch.func hands it back.

    An argument handed back comes back as the caller's own tensor. Otherwise
    the tensor stays attached where it depends on something outside this
    level that requires grad. Under an outer ``no_grad``, torch.func's
    operations record nothing outside, so only tensors that existed before
    the call (leaves) and views of the arguments keep ``requires_grad``.
    """
    import torch

    original = originals.get(id(leaf))
    if original is not None:
        return original
    if outer is not None:
        return leaf if outer.reaches(leaf) else leaf.detach()
    if leaf.grad_fn is None:
        return leaf
    base = originals.get(id(leaf._base)) if leaf._base is not None else None
    if base is not None:
        # A view of an argument, made under no_grad as torch.func makes it:
        # it keeps the argument's requires_grad but records no graph.
        with torch.no_grad():
            return base.as_strided(leaf.size(), leaf.stride(), leaf.storage_offset())
    return leaf.detach()


def _check_inputs(args: Tuple[Any, ...]) -> None:
    """torch.func's check that no argument (at any argnum) is complex."""
    import torch

    for arg in args:
        if not isinstance(arg, torch.Tensor):
            # Pytrees among the arguments: index the flattened leaves.
            _error_if_complex(flatten(args)[0], "inputs")
            return
        if arg.is_complex():
            _error_if_complex(args, "inputs")


def _jacobian(
    func: Callable[..., Any],
    args: Tuple[Any, ...],
    argnums: ArgNums,
    has_aux: bool,
    chunk_size: Optional[int],
    outer_grad: Optional[bool] = None,
) -> Any:
    import torch

    _check_inputs(args)
    nums = normalize_argnums(argnums, len(args))
    if chunk_size is not None:
        check_chunk_size_type(chunk_size, "jacrev")
    # A transform ignores an outer no_grad for its own work, but its results
    # are differentiable only where grad mode is on outside (as torch.func).
    if outer_grad is None:
        outer_grad = torch.is_grad_enabled()
    if torch.is_inference_mode_enabled():
        # Like torch.func, differentiate even inside inference_mode.
        with torch.inference_mode(False):
            return _jacobian(func, args, argnums, has_aux, chunk_size, outer_grad)
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            return _jacobian(func, args, argnums, has_aux, chunk_size, outer_grad)
    level = _Level()
    try:
        return _differentiate(func, args, nums, argnums, has_aux, chunk_size, outer_grad, level)
    finally:
        level.active = False


def _differentiate(
    func: Callable[..., Any],
    args: Tuple[Any, ...],
    nums: Tuple[int, ...],
    argnums: ArgNums,
    has_aux: bool,
    chunk_size: Optional[int],
    outer_grad: bool,
    level: _Level,
) -> Any:
    """The body of :func:`_jacobian`, with grad mode on and this call's ``level``."""
    import torch

    grad = _original_grad()
    primals = list(args)
    in_specs = []
    own: List[Any] = []
    for num in nums:
        leaves, spec = flatten(args[num])
        fresh = [_fresh(leaf, outer_grad, level) for leaf in leaves]
        primals[num] = unflatten(fresh, spec)
        in_specs.append((spec, len(own), len(fresh)))
        own.extend(fresh)
    result = func(*primals)
    if has_aux:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise RuntimeError(
                "vjp(f, *primals): output of function f should be a tuple: "
                "(output, aux) if has_aux is True"
            )
        result, aux = result
        aux_leaves, aux_spec = flatten(aux)
        for leaf in aux_leaves:
            if not isinstance(leaf, torch.Tensor):
                raise RuntimeError(f"Expected tensors, got unsupported type {type(leaf)}")
    out_leaves, out_spec = flatten(result)
    if out_spec is not _LEAF or not result.is_floating_point():
        _check_outputs(out_leaves)
        _error_if_complex(out_leaves, "outputs")
    outer = _OuterGraph(own) if outer_grad else None
    keep_graph = outer is not None and outer.any(out_leaves)
    per_output = _jacobian_blocks(out_leaves, own, keep_graph, chunk_size, grad)
    if keep_graph:
        # A block that depends only on this level's own leaves is not
        # differentiable from outside: torch.func gives it no grad.
        per_output = [
            [b if outer.reaches(b) else b.detach() for b in blocks]  # type: ignore[union-attr]
            for blocks in per_output
        ]
    as_tuple = isinstance(argnums, tuple)
    jac_leaves = []
    for blocks in per_output:
        per_arg = [unflatten(blocks[s : s + n], spec) for spec, s, n in in_specs]
        jac_leaves.append(tuple(per_arg) if as_tuple else per_arg[0])
    jac = unflatten(jac_leaves, out_spec)
    if not has_aux:
        return jac
    # aux is not differentiated here, but stays attached where it depends on
    # something outside this level that requires grad. Tensors handed back
    # come back as the caller's own objects.
    originals: Dict[int, Any] = {id(a): a for a in args if isinstance(a, torch.Tensor)}
    for num, (_, s, n) in zip(nums, in_specs):
        originals.update((id(new), old) for new, old in zip(own[s : s + n], flatten(args[num])[0]))
    kept = [_aux_leaf(leaf, originals, outer) for leaf in aux_leaves]
    return jac, unflatten(kept, aux_spec)


def jacrev(
    func: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    _preallocate_and_copy: bool = False,
) -> Callable[..., Any]:
    """Jacobian of ``func`` by reverse mode, row by row, as ``torch.func.jacrev``.

    Parameters
    ----------
    func : callable
        Takes positional arguments (pytrees of tensors at ``argnums``) and
        returns a tensor or a pytree of tensors.
    argnums : int or tuple of int
        The argument(s) to differentiate; negative counts from the end. A
        tuple gives one Jacobian per argument, as a tuple.
    has_aux : bool
        ``func`` returns ``(output, aux)``; ``aux`` is returned beside the
        Jacobian, not differentiated by this transform.
    chunk_size : int or None
        At most this many rows are in flight at a time (``None``: all of one
        output's rows). Rows are computed one ``autograd.grad`` call each.
    _preallocate_and_copy : bool
        Accepted for torch.func compatibility. Whenever several chunks are
        needed and no graph is kept, rows are written into a preallocated
        result anyway.

    Returns
    -------
    callable
        Takes ``func``'s positional arguments and returns the Jacobian, shaped
        ``output.shape + input.shape`` per (output, input) pair and nested
        like the outputs (outer) and the inputs (inner), or ``(jacobian, aux)``.

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends.loop import jacrev
    >>> x = torch.tensor([0.0, 1.0])
    >>> jacrev(torch.sin)(x)
    tensor([[1.0000, 0.0000],
            [0.0000, 0.5403]])
    >>> jacrev(lambda a, b: a * b, argnums=(0, 1))(x, 2 * x)[1]
    tensor([[0., 0.],
            [0., 1.]])
    """
    if not (chunk_size is None or chunk_size > 0):
        raise ValueError("jacrev: `chunk_size` should be greater than 0.")

    # Positional arguments only, as torch.func: keywords raise its TypeError.
    @functools.wraps(func)
    def wrapper_fn(*args: Any) -> Any:
        return _jacobian(func, args, argnums, has_aux, chunk_size)

    return wrapper_fn
