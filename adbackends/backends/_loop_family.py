"""The rest of torch.func's transforms for the loop backend, from reverse mode only.

``grad``, ``grad_and_value``, ``vjp``, ``jvp``, ``jacfwd``, ``hessian`` and
``linearize``, with torch.func's signatures, results and exceptions, built on
reverse passes alone, so that they run through custom Functions that define
only ``backward`` and on every torch from 1.12. The passes go through
:mod:`adbackends.backends._torch_compat` (``torch.autograd.grad``, or the
engine entry behind it where that has been checked).

Forward-mode products use the double-vjp construction: for ``y = f(x)`` and
a dummy cotangent ``u`` that requires grad, ``g = J^T u`` is computed with a
graph, and ``d(g . v)/du = J v``. The first backward pass is shared by every
product at the same point (``jacfwd`` takes one column per input element
from it, ``linearize`` one product per call).

Nesting follows :mod:`adbackends.backends._loop_jacrev`: every level
differentiates fresh tensors of its own (views of arguments that are part of
an outer graph, detached leaves otherwise), keeps a graph only when a result
must stay differentiable, and detaches results that depend on nothing but
its own tensors, so results require grad exactly where torch.func's do.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .._shared import ArgNums, RngState, normalize_argnums
from ._loop_jacrev import (
    _LEVEL_ATTR,
    _aux_leaf,
    _check_outputs,
    _fresh,
    _Level,
    _one_hot_rows,
    _OuterGraph,
    flatten,
    jacrev,
    unflatten,
)
from ._torch_compat import backward as _backward
from ._torch_compat import backward_rows as _per_row

__all__ = ["grad", "grad_and_value", "hessian", "jacfwd", "jvp", "linearize", "vjp"]

_JVP = "jvp(f, primals, tangents)"
_GRAD = "grad_and_value(f)(*args)"


# -- levels --------------------------------------------------------------------


class _transform_mode:
    """Grad mode on (and inference mode off) inside; yields the grad mode outside.

    A transform ignores an outer ``no_grad`` for its own work, but its results
    are differentiable only where grad mode is on outside, as with torch.func.
    A class, not a generator: it runs on every call of every transform.
    """

    def __enter__(self) -> bool:
        import torch

        outer_grad = torch.is_grad_enabled()
        self._stack: Optional[contextlib.ExitStack] = None
        if not outer_grad or torch.is_inference_mode_enabled():
            stack = self._stack = contextlib.ExitStack()
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
        return outer_grad

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()


@contextlib.contextmanager
def _no_inference_mode() -> Iterator[None]:
    """Inference mode off for a product computed later, grad mode left as it was."""
    import torch

    if not torch.is_inference_mode_enabled():
        yield
        return
    grad_mode = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad_mode):
        yield


class _Scope:
    """This level's own tensors for the arguments at ``nums``, and what to hand back.

    Its leaves carry a tag that :meth:`close` retires: once the transform has
    returned, graphs kept through them no longer count as differentiable from
    outside (torch.func's wrappers of a finished level are plain tensors).
    """

    def __init__(self, args: Tuple[Any, ...], nums: Sequence[int], outer_grad: bool) -> None:
        self.tag = _Level()
        self.args = args
        self.nums = tuple(nums)
        self.outer_grad = outer_grad
        primals = list(args)
        self.own: List[Any] = []
        # Per differentiated argument: (spec, start in own, count); and the
        # arguments' own leaves, in the order of own.
        self.specs: List[Tuple[Any, int, int]] = []
        self.leaves: List[Any] = []
        for num in self.nums:
            leaves, spec = flatten(args[num])
            fresh = [_fresh(leaf, outer_grad, self.tag) for leaf in leaves]
            primals[num] = unflatten(fresh, spec)
            self.specs.append((spec, len(self.own), len(fresh)))
            self.own.extend(fresh)
            self.leaves.extend(leaves)
        self.primals = tuple(primals)
        self.graph: Optional[_OuterGraph] = None
        self._originals: Optional[Dict[int, Any]] = None

    def __enter__(self) -> _Scope:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tag.active = False

    def seeds(self, live: Sequence[Any], tag: bool = True) -> List[Any]:
        """Dummy cotangents for the double-vjp: ``J^T u`` is linear in these.

        ``tag=False`` leaves them untagged, for a caller that calls
        :meth:`tag_all` once it knows a graph through them is handed back
        (only such a graph is walked after this level has returned).
        """
        import torch

        seeds = [torch.zeros_like(out).requires_grad_(True) for out in live]
        if tag:
            self.tag_all(seeds)
        return seeds

    def tag_all(self, leaves: Sequence[Any]) -> None:
        """Mark ``leaves`` as this level's own, retired when it returns."""
        for leaf in leaves:
            setattr(leaf, _LEVEL_ATTR, self.tag)

    def watch(self, extra: Sequence[Any] = ()) -> Optional[_OuterGraph]:
        """Start answering "reaches outside?", counting ``extra`` leaves as ours."""
        if self.outer_grad:
            self.graph = _OuterGraph([*self.own, *extra])
        return self.graph

    def needs_graph(self, tensors: Sequence[Any]) -> bool:
        """Whether results computed from ``tensors`` must stay differentiable."""
        return self.graph is not None and self.graph.any(tensors)

    def result(self, tensor: Any) -> Any:
        """A product handed back: attached only where it depends on the outside."""
        if self.graph is not None and self.graph.reaches(tensor):
            return tensor
        return tensor.detach() if tensor.requires_grad else tensor

    def export(self, leaf: Any) -> Any:
        """An output or aux tensor handed back as torch.func unwraps it."""
        if self._originals is None:
            import torch

            originals = {id(a): a for a in self.args if isinstance(a, torch.Tensor)}
            originals.update((id(new), old) for new, old in zip(self.own, self.leaves))
            self._originals = originals
        return _aux_leaf(leaf, self._originals, self.graph)

    def per_argument(self, flat: Sequence[Any], as_tuple: bool) -> Any:
        """Per-input results, nested like the differentiated arguments."""
        per_arg = [unflatten(flat[s : s + n], spec) for spec, s, n in self.specs]
        return tuple(per_arg) if as_tuple else per_arg[0]


def _ones(output: Any) -> Any:
    """The cotangent ``torch.autograd.grad`` makes for a scalar output.

    ``None`` for an output that is not real floating point: ``torch.autograd.grad``
    then makes it, or raises its own error.
    """
    import torch

    return torch.ones_like(output) if output.is_floating_point() else None


def _split_aux(result: Any, message: str) -> Tuple[Any, List[Any], Any]:
    """``(output, aux leaves, aux spec)``, checked as torch.func checks them."""
    import torch

    if not (isinstance(result, tuple) and len(result) == 2):
        raise RuntimeError(message)
    output, aux = result
    aux_leaves, aux_spec = flatten(aux)
    for leaf in aux_leaves:
        if not isinstance(leaf, torch.Tensor):
            raise RuntimeError(f"Expected tensors, got unsupported type {type(leaf)}")
    return output, aux_leaves, aux_spec


def _error_if_complex(api: str, leaves: Sequence[Any], what: str) -> None:
    import torch

    for idx, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_complex():
            raise RuntimeError(
                f"{api}: Expected all {what} to be real but received complex tensor "
                f"at flattened input idx: {idx}"
            )


def _check_jvp_outputs(leaves: Sequence[Any]) -> None:
    import torch

    if (len(leaves) == 1 and leaves[0] is None) or len(leaves) < 1:
        raise RuntimeError(
            f"{_JVP}: Expected f to be a function that has non-empty output (got output = {leaves})"
        )
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise RuntimeError(
                f"{_JVP}: expected f(*primals) to return only tensors, "
                f"got unsupported type {type(leaf)}"
            )


def _check_dual(primal: Any, tangent: Any) -> None:
    """What ``torch.autograd.forward_ad.make_dual`` checks, with its messages."""
    if not (primal.is_floating_point() or primal.is_complex()):
        raise ValueError(
            f"Expected primal to be floating point or complex, but got: {primal.dtype}"
        )
    if not (tangent.is_floating_point() or tangent.is_complex()):
        raise ValueError(
            f"Expected tangent to be floating point or complex, but got: {tangent.dtype}"
        )
    if primal.shape != tangent.shape:
        raise RuntimeError(
            "Trying to set a forward gradient that has a different size than that of the "
            "original Tensor, this is not supported. Tensor is of size "
            f"{list(primal.shape)} while the given forward gradient is of size "
            f"{list(tangent.shape)}."
        )


def _transpose_products(live: Sequence[Any], own: Sequence[Any], seeds: Sequence[Any]) -> List[Any]:
    """``J^T u`` per input (``None`` where unreachable), with a graph back to ``u``."""
    if not live:
        return [None] * len(own)
    grads = _backward(live, own, seeds, True, True)
    # A gradient that does not depend on u (a backward that ignores its
    # cotangent) contributes nothing to J v.
    return [g if g is not None and g.requires_grad else None for g in grads]


# -- grad and grad_and_value ---------------------------------------------------


def _grad_and_value(
    func: Callable[..., Any],
    argnums: ArgNums,
    has_aux: bool,
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    value_wanted: bool = True,
) -> Tuple[Any, Any]:
    """``(gradient, value)`` or ``(gradient, (value, aux))``.

    With ``value_wanted=False`` (``grad`` without aux, which drops it) the
    value is ``None``, and the cost of handing it back is saved.
    """
    import torch

    nums = normalize_argnums(argnums, len(args))
    with _transform_mode() as outer_grad, _Scope(args, nums, outer_grad) as level:
        output = func(*level.primals, **kwargs)
        aux_leaves: List[Any] = []
        aux_spec = None
        if has_aux:
            output, aux_leaves, aux_spec = _split_aux(
                output,
                f"{_GRAD}: output of function f should be a tuple: (output, aux) "
                "if has_aux is True",
            )
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"{_GRAD}: Expected f(*args) to return a Tensor, got {type(output)}")
        if output.dim() != 0:
            raise RuntimeError(
                f"{_GRAD}: Expected f(*args) to return a scalar Tensor, got tensor with "
                f"{output.dim()} dims. Maybe you wanted to use the vjp or jacrev APIs instead?"
            )
        level.watch()
        keep = level.needs_graph([output])
        own = level.own
        grads: Sequence[Any] = [None] * len(own)
        if output.requires_grad and own:
            # Keep the graph while aux may still be differentiated from outside.
            grads = _backward([output], own, [_ones(output)], keep or has_aux, keep)
        flat = [
            torch.zeros_like(inp) if g is None else level.result(g) for g, inp in zip(grads, own)
        ]
        gradient = level.per_argument(flat, isinstance(argnums, tuple))
        value = level.export(output) if value_wanted or has_aux else None
        if has_aux:
            aux = unflatten([level.export(leaf) for leaf in aux_leaves], aux_spec)
            return gradient, (value, aux)
        return gradient, value


def grad_and_value(
    func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Gradient and value of a scalar ``func``, as ``torch.func.grad_and_value``.

    Parameters
    ----------
    func : callable
        Returns a 0-dim tensor, or ``(tensor, aux)`` with ``has_aux``.
    argnums : int or tuple of int
        The argument(s) to differentiate; a tuple gives a tuple of gradients.
    has_aux : bool
        ``func`` returns ``(output, aux)``; ``aux`` is passed through.

    Returns
    -------
    callable
        Takes ``func``'s arguments (keywords are passed through, not
        differentiated) and returns ``(gradient, value)``, or
        ``(gradient, (value, aux))``.

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends._loop_family import grad_and_value
    >>> grad_and_value(lambda x: (x**2).sum())(torch.tensor([1.0, 2.0]))
    (tensor([2., 4.]), tensor(5.))
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _grad_and_value(func, argnums, has_aux, args, kwargs)

    return wrapper


def grad(
    func: Callable[..., Any], argnums: ArgNums = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Gradient of a scalar ``func``, as ``torch.func.grad``.

    Parameters
    ----------
    func : callable
        Returns a 0-dim tensor, or ``(tensor, aux)`` with ``has_aux``.
    argnums : int or tuple of int
        The argument(s) to differentiate; a tuple gives a tuple of gradients.
    has_aux : bool
        ``func`` returns ``(output, aux)``; the result is ``(gradient, aux)``.

    Returns
    -------
    callable
        Takes ``func``'s arguments and returns the gradient (nested like the
        differentiated arguments), or ``(gradient, aux)``.

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends._loop_family import grad
    >>> x = torch.tensor(0.5)
    >>> grad(grad(torch.sin))(x)
    tensor(-0.4794)
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        gradient, value = _grad_and_value(func, argnums, has_aux, args, kwargs, False)
        return (gradient, value[1]) if has_aux else gradient

    return wrapper


# -- vjp -----------------------------------------------------------------------


def _treespec_text(spec: Any) -> str:
    try:
        from torch.utils._pytree import treespec_pprint
    except ImportError:  # older torch: the spec's own repr
        return str(spec)
    return str(treespec_pprint(spec))


def vjp(func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> Any:
    """Output of ``func`` and a function for vector-Jacobian products, as ``torch.func.vjp``.

    Parameters
    ----------
    func : callable
        Takes ``primals`` (pytrees of tensors), returns a tensor or a pytree of
        floating-point tensors, or ``(output, aux)`` with ``has_aux``.
    *primals : pytrees of tensors
        The point; every tensor among them is differentiated.
    has_aux : bool
        ``func`` returns ``(output, aux)``; ``aux`` is returned third.

    Returns
    -------
    tuple
        ``(output, vjp_fn)`` or ``(output, vjp_fn, aux)``.
        ``vjp_fn(cotangents, retain_graph=True, create_graph=None)`` takes
        cotangents shaped like ``output`` and returns a tuple with one
        gradient per primal; ``create_graph=None`` means "if grad mode is on".

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends._loop_family import vjp
    >>> out, vjp_fn = vjp(torch.mul, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    >>> vjp_fn(torch.ones(2))
    (tensor([3., 4.]), tensor([1., 2.]))
    """
    import torch

    with _transform_mode() as outer_grad, _Scope(primals, range(len(primals)), outer_grad) as level:
        result = func(*level.primals)
        aux_leaves: List[Any] = []
        aux_spec = None
        if has_aux:
            result, aux_leaves, aux_spec = _split_aux(
                result,
                "vjp(f, *primals): output of function f should be a tuple: (output, aux) "
                "if has_aux is True",
            )
        out_leaves, out_spec = flatten(result)
        _check_outputs(out_leaves)
        graph = level.watch()
        output = unflatten([level.export(leaf) for leaf in out_leaves], out_spec)
        aux = unflatten([level.export(leaf) for leaf in aux_leaves], aux_spec) if has_aux else None
    # The spec to compare cotangents against, in torch's own pytree terms.
    from torch.utils._pytree import tree_flatten

    expected_spec = tree_flatten(result)[1]
    own = level.own
    # Results hold only the leaves; the caller's graph is not kept alive.
    checker = graph if graph is not None else _OuterGraph(own)

    def vjp_fn(
        cotangents: Any, retain_graph: bool = True, create_graph: Optional[bool] = None
    ) -> Any:
        if create_graph is None:
            create_graph = torch.is_grad_enabled()
        flat_cts, spec = tree_flatten(cotangents)
        if spec != expected_spec:
            raise RuntimeError(
                "Expected pytree structure of cotangents to be the same as pytree structure "
                f"of outputs to the function. cotangents: {_treespec_text(spec)}, "
                f"primal output: {_treespec_text(expected_spec)}"
            )
        pairs = [(o, c) for o, c in zip(out_leaves, flat_cts) if o.requires_grad]
        grads: Sequence[Any] = [None] * len(own)
        if pairs and own:
            with _no_inference_mode():
                # torch.autograd.grad looked up now: a running loop vmap keeps
                # the graph alive for its remaining samples.
                grads = torch.autograd.grad(
                    [o for o, _ in pairs],
                    own,
                    [c for _, c in pairs],
                    retain_graph=retain_graph,
                    create_graph=create_graph,
                    allow_unused=True,
                )
        flat = []
        for g, inp in zip(grads, own):
            if g is None:
                flat.append(torch.zeros_like(inp))
            elif g.requires_grad and not checker.reaches(g):
                flat.append(g.detach())
            else:
                flat.append(g)
        return level.per_argument(flat, True)

    if has_aux:
        return output, vjp_fn, aux
    return output, vjp_fn


# -- jvp -----------------------------------------------------------------------


def _check_jvp_arguments(primals: Any, tangents: Any) -> Tuple[List[Any], List[Any]]:
    import torch

    if not isinstance(primals, tuple):
        raise RuntimeError(
            f"{_JVP}: Expected primals to be a tuple. E.g. it should be valid to call f(*primals)."
        )
    if type(tangents) is tuple and len(tangents) == len(primals) and primals:
        # Flat tuples of plain tensors, the common case: no pytree walk needed.
        tensor = torch.Tensor
        for primal, tangent in zip(primals, tangents):
            if type(primal) is not tensor or type(tangent) is not tensor:
                break
        else:
            for primal, tangent in zip(primals, tangents):
                _check_dual(primal, tangent)
            return list(primals), list(tangents)
    from torch.utils._pytree import tree_flatten

    flat_primals, primals_spec = tree_flatten(primals)
    flat_tangents, tangents_spec = tree_flatten(tangents)
    if primals_spec != tangents_spec:
        raise RuntimeError(
            f"{_JVP}: Expected primals and tangents to have the same python structure. For "
            "example, if primals is a tuple of 3 tensors, tangents also must be. Got primals "
            f"with structure {primals_spec} and tangents with structure {tangents_spec}"
        )
    for leaves, name in ((flat_primals, "primals"), (flat_tangents, "tangents")):
        if not leaves:
            raise RuntimeError(f"{_JVP}: Expected {name} to contain at least one Tensor.")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise RuntimeError(
                    f"{_JVP}: Expected {name} to only contain Tensors, got {type(leaf)}"
                )
    for primal, tangent in zip(flat_primals, flat_tangents):
        _check_dual(primal, tangent)
    return flat_primals, flat_tangents


def jvp(
    func: Callable[..., Any],
    primals: Any,
    tangents: Any,
    *,
    strict: bool = False,
    has_aux: bool = False,
) -> Any:
    """Output of ``func`` and its Jacobian-vector product, as ``torch.func.jvp``.

    Computed with two reverse passes (the double-vjp construction), so it
    works through custom Functions that define only ``backward``, provided
    that backward is itself differentiable.

    Parameters
    ----------
    func : callable
        Called as ``func(*primals)``; returns a tensor or a pytree of tensors,
        or ``(output, aux)`` with ``has_aux``.
    primals : tuple
        The point: a tuple of pytrees of floating-point tensors.
    tangents : tuple
        The direction, with the structure and shapes of ``primals``.
    strict : bool
        Raise when an output does not depend on the inputs.
    has_aux : bool
        ``func`` returns ``(output, aux)``; ``aux`` is returned third.

    Returns
    -------
    tuple
        ``(output, jvp_out)`` or ``(output, jvp_out, aux)``; ``jvp_out`` is
        nested like ``output``.

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends._loop_family import jvp
    >>> x = torch.tensor([0.0, 1.0])
    >>> jvp(lambda t: t**2, (x,), (torch.ones(2),))
    (tensor([0., 1.]), tensor([0., 2.]))
    """
    import torch

    flat_primals, flat_tangents = _check_jvp_arguments(primals, tangents)
    with _transform_mode() as outer_grad, _Scope(
        tuple(flat_primals), range(len(flat_primals)), outer_grad
    ) as level:
        if len(flat_primals) == len(primals) and all(isinstance(p, torch.Tensor) for p in primals):
            args: Tuple[Any, ...] = level.primals
        else:
            from torch.utils._pytree import tree_flatten, tree_unflatten

            args = tree_unflatten(list(level.primals), tree_flatten(primals)[1])
        result = func(*args)
        aux_leaves: List[Any] = []
        aux_spec = None
        if has_aux:
            result, aux_leaves, aux_spec = _split_aux(
                result,
                f"{_JVP}: output of function f should be a tuple: (output, aux) if has_aux is True",
            )
        out_leaves, out_spec = flatten(result)
        _check_jvp_outputs(out_leaves)
        live = [k for k, out in enumerate(out_leaves) if out.requires_grad]
        live_outs = [out_leaves[k] for k in live]
        seeds = level.seeds(live_outs, tag=False)
        level.watch(seeds)
        outputs_attached = outer_grad and level.needs_graph(live_outs)
        keep = outer_grad and (outputs_attached or any(t.requires_grad for t in flat_tangents))
        if keep:  # the seeds are part of the graph handed back
            level.tag_all(seeds)
        products = _transpose_products(live_outs, level.own, seeds)
        pairs = [(g, t) for g, t in zip(products, flat_tangents) if g is not None]
        columns: Sequence[Any] = [None] * len(live)
        if pairs:
            columns = _backward([g for g, _ in pairs], seeds, [t for _, t in pairs], keep, keep)
        by_output: Dict[int, Any] = dict(zip(live, columns))
        tangent_leaves = []
        for k, out in enumerate(out_leaves):
            column = by_output.get(k)
            if column is None:
                if strict:
                    raise RuntimeError(
                        "jvp(f, primals, tangents, strict=True): The output of f is independent "
                        "of the inputs. This is not allowed with strict=True."
                    )
                tangent_leaves.append(torch.zeros_like(out))
            else:
                tangent_leaves.append(level.result(column))
        if level.graph is not None and not outputs_attached:
            # No output reaches outside: each is a primal handed back or detached.
            pairs_back = list(zip(level.own, flat_primals))
            exported = []
            for leaf in out_leaves:
                for new, old in pairs_back:
                    if leaf is new or leaf is old:
                        exported.append(old)
                        break
                else:
                    exported.append(leaf.detach())
            output = unflatten(exported, out_spec)
        else:
            output = unflatten([level.export(leaf) for leaf in out_leaves], out_spec)
        jvp_out = unflatten(tangent_leaves, out_spec)
        if has_aux:
            aux = unflatten([level.export(leaf) for leaf in aux_leaves], aux_spec)
            return output, jvp_out, aux
        return output, jvp_out


# -- jacfwd --------------------------------------------------------------------


def _one_record(blocks: List[Any], inputs: Sequence[Any]) -> List[Any]:
    """One output's blocks (one per input) as slices of one differentiable tensor.

    torch.func's forward Jacobian of an output is a single tensor over all
    inputs, split afterwards, so either every block of it requires grad or
    none does; blocks computed apart are joined when they disagree.
    """
    import torch

    differentiable = [b.requires_grad for b in blocks]
    if all(differentiable) or not any(differentiable):
        return blocks
    lead = blocks[0].shape[: blocks[0].dim() - inputs[0].dim()]
    numels = [inp.numel() for inp in inputs]
    joined = torch.cat([b.reshape((*lead, n)) for b, n in zip(blocks, numels)], dim=-1)
    pieces = joined.split(numels, dim=-1)
    return [p.reshape((*lead, *inp.shape)) for p, inp in zip(pieces, inputs)]


def _forward_checks(
    args: Tuple[Any, ...], argnums: ArgNums, randomness: str
) -> Tuple[Tuple[int, ...], List[int]]:
    """torch.func's ``jacfwd`` checks, in its order: ``(positions, input numels)``."""
    import torch

    # Arguments that are all tensors (the usual case) need no pytree walk.
    flat_args = args if all(isinstance(a, torch.Tensor) for a in args) else flatten(args)[0]
    _error_if_complex("jacfwd", flat_args, "inputs")
    nums = normalize_argnums(argnums, len(args))
    flat_primals = [leaf for num in nums for leaf in flatten(args[num])[0]]
    numels = [p.numel() for p in flat_primals]
    if randomness not in ("error", "different", "same"):
        raise RuntimeError(
            "Only allowed values for randomness are 'error', 'different', or 'same'. "
            f"Got {randomness}"
        )
    if not flat_primals:
        raise RuntimeError(f"{_JVP}: Expected primals to contain at least one Tensor.")
    for primal in flat_primals:
        _check_dual(primal, primal)
    return nums, numels


def _jacfwd(
    func: Callable[..., Any],
    argnums: ArgNums,
    has_aux: bool,
    randomness: str,
    args: Tuple[Any, ...],
) -> Any:
    import torch

    from ._loop_vmap import _RANDOM_ERROR

    nums, numels = _forward_checks(args, argnums, randomness)
    with _transform_mode() as outer_grad, _Scope(args, nums, outer_grad) as level:
        rng = RngState() if randomness == "error" else None
        result = func(*level.primals)
        if rng is not None and not rng.unchanged():
            # torch.func maps over the columns, and refuses random operations there.
            rng.restore()
            raise RuntimeError(_RANDOM_ERROR)
        aux_leaves: List[Any] = []
        aux_spec = None
        if has_aux:
            result, aux_leaves, aux_spec = _split_aux(
                result,
                f"{_JVP}: output of function f should be a tuple: (output, aux) if has_aux is True",
            )
        out_leaves, out_spec = flatten(result)
        _check_jvp_outputs(out_leaves)
        _error_if_complex("jacfwd", out_leaves, "outputs")
        live = [k for k, out in enumerate(out_leaves) if out.requires_grad]
        live_outs = [out_leaves[k] for k in live]
        seeds = level.seeds(live_outs)
        level.watch(seeds)
        keep = level.needs_graph(live_outs)
        own = level.own
        products = _transpose_products(live_outs, own, seeds)
        # blocks[k][i]: d out_k / d own_i, shaped out.shape + own_i.shape.
        blocks: List[List[Any]] = [[None] * len(own) for _ in out_leaves]
        for i, (inp, product, n) in enumerate(zip(own, products, numels)):
            if product is None or n == 0:
                continue
            rows = _one_hot_rows(inp)
            # Column j takes the one-hot direction rows[n - 1 - j].
            columns = _per_row(product, seeds, list(reversed(rows.unbind(0))), keep)
            for s, k in enumerate(live):
                if columns[0][s] is None:
                    continue
                stacked = torch.stack([column[s] for column in columns], dim=-1)
                blocks[k][i] = level.result(stacked.reshape((*out_leaves[k].shape, *inp.shape)))
            del columns
        jac_leaves = []
        as_tuple = isinstance(argnums, tuple)
        for k, out in enumerate(out_leaves):
            flat = [
                out.new_zeros((*out.shape, *inp.shape)) if block is None else block
                for block, inp in zip(blocks[k], own)
            ]
            jac_leaves.append(level.per_argument(_one_record(flat, own), as_tuple))
        jac = unflatten(jac_leaves, out_spec)
        if has_aux:
            return jac, unflatten([level.export(leaf) for leaf in aux_leaves], aux_spec)
        return jac


def jacfwd(
    func: Callable[..., Any],
    argnums: ArgNums = 0,
    has_aux: bool = False,
    *,
    randomness: str = "error",
) -> Callable[..., Any]:
    """Jacobian of ``func`` column by column, as ``torch.func.jacfwd``.

    One reverse pass with a graph gives ``J^T u`` for dummy cotangents ``u``;
    each column is then one more reverse pass through it, with a one-hot
    direction for one input element, so no ``n x n`` basis is built and
    custom Functions with only a ``backward`` work.

    Parameters
    ----------
    func : callable
        Takes positional arguments and returns a tensor or a pytree of them.
    argnums : int or tuple of int
        The argument(s) to differentiate; a tuple gives a tuple of Jacobians.
    has_aux : bool
        ``func`` returns ``(output, aux)``; the result is ``(jacobian, aux)``.
    randomness : {"error", "different", "same"}
        With ``"error"``, a random operation in ``func`` raises, as under
        torch.func. ``func`` is called once, so every column sees one draw.

    Returns
    -------
    callable
        Returns the Jacobian, shaped ``output.shape + input.shape`` per pair,
        nested like the outputs (outer) and the inputs (inner).

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends._loop_family import jacfwd
    >>> jacfwd(lambda x: x**2)(torch.tensor([1.0, 2.0]))
    tensor([[2., 0.],
            [0., 4.]])
    """

    @functools.wraps(func)
    def wrapper_fn(*args: Any) -> Any:
        return _jacfwd(func, argnums, has_aux, randomness, args)

    return wrapper_fn


# -- hessian -------------------------------------------------------------------


def _hessian(inner: Callable[..., Any], argnums: ArgNums, args: Tuple[Any, ...]) -> Any:
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    nums, _ = _forward_checks(args, argnums, "error")
    as_tuple = isinstance(argnums, tuple)
    with _transform_mode() as outer_grad, _Scope(args, nums, outer_grad) as level:
        gradients, spec = tree_flatten(inner(*level.primals))
        level.watch()
        own = level.own
        hess = []
        for gradient in gradients:
            blocks: List[Any] = [None] * len(own)
            if gradient.requires_grad and gradient.numel():
                # Rows of this gradient block alone (torch.func's outer transform is
                # forward mode: each block's derivative is computed on its own).
                keep = level.needs_graph([gradient])
                rows = _per_row(
                    gradient, own, list(reversed(_one_hot_rows(gradient).unbind(0))), keep
                )
                for i, inp in enumerate(own):
                    if rows and rows[0][i] is not None:
                        stacked = torch.stack([row[i] for row in rows])
                        blocks[i] = level.result(stacked.reshape((*gradient.shape, *inp.shape)))
                del rows
            flat = [
                gradient.new_zeros((*gradient.shape, *inp.shape)) if b is None else b
                for b, inp in zip(blocks, own)
            ]
            hess.append(level.per_argument(_one_record(flat, own), as_tuple))
        return tree_unflatten(hess, spec)


def hessian(func: Callable[..., Any], argnums: ArgNums = 0) -> Callable[..., Any]:
    """Hessian of ``func``, reverse over reverse, matching ``torch.func.hessian``.

    torch.func takes forward over reverse, which needs forward-mode rules;
    the Jacobian of the loop ``jacrev`` runs through any differentiable
    backward, custom Functions with only a ``backward`` included.

    Parameters
    ----------
    func : callable
        Takes positional arguments and returns a tensor or a pytree of them.
    argnums : int or tuple of int
        The argument(s) to differentiate, twice.

    Returns
    -------
    callable
        Returns the Hessian, shaped ``output.shape + input.shape +
        input.shape``, nested as ``[output][input][input]``.

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends._loop_family import hessian
    >>> hessian(lambda x: (x**3).sum())(torch.tensor([1.0, 2.0]))
    tensor([[ 6.,  0.],
            [ 0., 12.]])
    """
    inner = jacrev(func, argnums)

    @functools.wraps(func)
    def wrapper_fn(*args: Any) -> Any:
        return _hessian(inner, argnums, args)

    return wrapper_fn


# -- linearize -----------------------------------------------------------------


def linearize(func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
    """Output of ``func`` and its linear approximation, as ``torch.func.linearize``.

    ``func`` is called twice, as torch.func calls it: once plainly for the
    output, once to record ``J^T u`` (the double-vjp construction); each call
    of ``jvp_fn`` is then one reverse pass through that record.

    Parameters
    ----------
    func : callable
        Called as ``func(*primals)``.
    *primals : pytrees of tensors
        The point.

    Returns
    -------
    tuple
        ``(output, jvp_fn)``; ``jvp_fn(*tangents)`` takes tangents with the
        structure, shapes, dtypes and devices of ``primals`` and returns the
        Jacobian-vector product, nested like ``output``.

    Examples
    --------
    >>> import torch
    >>> from adbackends.backends._loop_family import linearize
    >>> out, jvp_fn = linearize(torch.sin, torch.zeros(2))
    >>> jvp_fn(torch.tensor([1.0, 2.0]))
    tensor([1., 2.])
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    output = func(*primals)
    out_spec = tree_flatten(output)[1]
    flat_primals, primals_spec = tree_flatten(primals)
    for primal in flat_primals:
        if not isinstance(primal, torch.Tensor):
            raise AttributeError(f"'{type(primal).__name__}' object has no attribute 'new_empty'")
    with _transform_mode() as outer_grad, _Scope(
        tuple(flat_primals), range(len(flat_primals)), outer_grad
    ) as level:
        traced = func(*tree_unflatten(list(level.primals), primals_spec))
        out_leaves = tree_flatten(traced)[0]
        live = [
            k
            for k, out in enumerate(out_leaves)
            if isinstance(out, torch.Tensor) and out.requires_grad
        ]
        live_outs = [out_leaves[k] for k in live]
        seeds = level.seeds(live_outs)
        level.watch(seeds)
        reaches_outside = level.needs_graph(live_outs)
        products = _transpose_products(live_outs, level.own, seeds)
    shapes = [p.shape for p in flat_primals]
    devices = [p.device for p in flat_primals]
    dtypes = [p.dtype for p in flat_primals]
    checker = level.graph if level.graph is not None else _OuterGraph([*level.own, *seeds])

    def jvp_fn(*tangents: Any) -> Any:
        flat_tangents, tangents_spec = tree_flatten(tangents)
        if tangents_spec != primals_spec:
            raise RuntimeError(
                f"Expected the tangents {tangents_spec} to have the same argspec as the "
                f"primals {primals_spec}"
            )
        for idx, t in enumerate(flat_tangents):
            for what, have, want in (
                ("shape", t.shape, shapes[idx]),
                ("device", t.device, devices[idx]),
                ("dtype", t.dtype, dtypes[idx]),
            ):
                if have != want:
                    raise RuntimeError(
                        f"tangent:{idx} with {what} {have} in flattened pytree doesn't match "
                        f"the {what} {want} of the corresponding primal."
                    )
        pairs = [(g, t) for g, t in zip(products, flat_tangents) if g is not None]
        columns: Sequence[Any] = [None] * len(live)
        if pairs:
            keep = torch.is_grad_enabled() and (
                reaches_outside or any(t.requires_grad for _, t in pairs)
            )
            with _no_inference_mode(), torch.enable_grad():
                columns = _backward([g for g, _ in pairs], seeds, [t for _, t in pairs], True, keep)
        by_output = dict(zip(live, columns))
        leaves = []
        for k, out in enumerate(out_leaves):
            column = by_output.get(k)
            if not isinstance(out, torch.Tensor):
                leaves.append(out)
            elif column is None:
                leaves.append(torch.zeros_like(out).detach())
            elif column.requires_grad and not checker.reaches(column):
                leaves.append(column.detach())
            else:
                leaves.append(column)
        return tree_unflatten(leaves, out_spec)

    return output, jvp_fn
