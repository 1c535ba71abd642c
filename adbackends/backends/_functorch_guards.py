"""Guards against the differences of old functorch copies, for the functorch backend.

A survey (``tests/functorch_survey.py``, ``tests/test_functorch_survey.py``)
runs the whole transform family through the functorch backend against the
loop backend on torch 1.12 + functorch 0.2.1 and on torch 1.13. Each
difference it found is handled here in one of two ways:

* the call is **rewritten** into one old functorch gets right, or checked
  first so that it raises the error torch.func (and the loop backend) raise
  instead of returning a wrong result;
* or it is **refused** with a :class:`adbackends.CapabilityError`, which the
  backend's ``cannot_transform`` recognises, so that a chain
  ``functorch>loop`` runs the call on the loop backend.

The guards (docs/compatibility.rst has the table):

``jacrev``/``jacfwd``/``hessian`` of a complex input or output
    functorch before torch 2.0 returns a Jacobian (``jacrev`` the conjugate
    of ``jacfwd``'s for a complex input, only the real part for a complex
    output) where torch.func refuses both. Checked: torch.func's
    ``RuntimeError`` (:func:`check_real`, :func:`real_outputs`).
``jvp``/``jacfwd`` of an integer primal or tangent
    functorch 0.2.1 computes; torch.func raises ``ValueError``. Checked first
    (:func:`check_floating`).
``vmap`` with no batched input
    functorch 0.2.1 raises ``IndexError: list index out of range``;
    torch.func raises ``ValueError``. Translated on the error path
    (:func:`vmap_failure`).
``vmap`` over a batch of size 0
    every functorch (and torch.func) fails with an ``IndexError`` or an
    assertion; the loop backend maps over the empty batch. Refused on the
    error path (:func:`vmap_failure`).
functorch's internal "Could not allocate memory to change Tensor SizesAndStrides"
    functorch before torch 2.0, forward mode over some 0-dim tensors, where
    the loop computes: refused, by the one refusal table
    (:mod:`adbackends.backends._native_refusals`); so is "Cannot access data
    pointer of Tensor that doesn't have storage", from a function that reads
    ``data_ptr()`` of its inputs (under torch.func too).
``vmap`` of an output that does not depend on the batch, at ``out_dims`` other than 0
    every functorch (torch.func too) fails to expand it or gives a wrong
    shape, and before torch 2.0 a 0-dim such output crashes the process
    (segmentation fault). Refused from inside the call, where functorch
    tells which level each output is batched at (:func:`batched_outputs`).
``vmap(out_dims=None)`` (or ``None`` inside ``out_dims``)
    functorch before torch 2.0 does not have it and raises ``ValueError`` at
    the call. Refused when the transform is built (:func:`refuses_none_out_dims`).

Negative ``argnums`` (zeros from functorch 0.2.1's ``jacrev`` and from
``jacfwd``/``hessian`` before torch 2.0) are counted from the front by the
backend itself (``_counted`` in :mod:`adbackends.backends.functorch`).

What this functorch does is found out by trying it once, on first need, on
a few numbers (never from a version number); the checks cost nothing where
the installed copy needs none of them.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = [
    "Quirks",
    "check_floating",
    "check_real",
    "real_outputs",
    "guard_floating",
    "guard_real",
    "batched_outputs",
    "has_none",
    "moves_unbatched_outputs",
    "vmap_failure",
]


class Quirks:
    """What one functorch copy gets wrong, each found out once by trying it."""

    def __init__(
        self,
        jacrev: Callable[..., Any],
        vmap: Callable[..., Any],
        jvp: Optional[Callable[..., Any]],
    ) -> None:
        self._jacrev = jacrev
        self._vmap = vmap
        self._jvp = jvp
        self._found: Dict[str, bool] = {}
        self._lock = threading.Lock()

    def _check(self, name: str, trial: Callable[[], bool]) -> bool:
        found = self._found.get(name)
        if found is not None:
            return found
        with self._lock:
            if name not in self._found:
                import torch

                try:
                    with warnings.catch_warnings(), torch.enable_grad():
                        warnings.simplefilter("ignore")
                        self._found[name] = bool(trial())
                except Exception:  # the copy refuses: nothing to guard
                    self._found[name] = False
            return self._found[name]

    def takes_complex(self) -> bool:
        """Whether ``jacrev`` computes with a complex input (torch.func refuses)."""

        def trial() -> bool:
            import torch

            self._jacrev(lambda z: z * 2)(torch.ones(1, dtype=torch.complex128))
            return True

        return self._check("complex", trial)

    def takes_integers(self) -> bool:
        """Whether ``jvp`` computes with an integer primal (torch.func raises)."""
        jvp = self._jvp
        if jvp is None:
            return False

        def trial() -> bool:
            import torch

            primal = torch.ones(1, dtype=torch.long)
            jvp(lambda n: n * 2, (primal,), (torch.ones(1, dtype=torch.float64),))
            return True

        return self._check("integers", trial)

    def refuses_none_out_dims(self) -> bool:
        """Whether ``vmap`` refuses ``out_dims=None`` (functorch before torch 2.0)."""

        def trial() -> bool:
            import torch

            try:
                self._vmap(lambda v: v.sum() * 0, out_dims=None)(torch.ones(1))
            except ValueError as exc:
                return "out_dims" in str(exc)
            return False

        return self._check("none_out_dims", trial)


def has_none(out_dims: Any) -> bool:
    """Whether ``out_dims`` is ``None`` or holds one anywhere."""
    if out_dims is None:
        return True
    if isinstance(out_dims, (tuple, list)):
        return any(has_none(d) for d in out_dims)
    if isinstance(out_dims, dict):
        return any(has_none(d) for d in out_dims.values())
    return False


def _selected(args: Sequence[Any], argnums: Any) -> Any:
    """The arguments at ``argnums`` as jacrev sees them (one, or a tuple)."""
    if isinstance(argnums, int):
        return args[argnums]
    return tuple(args[n] for n in argnums)


def _leaves(tree: Any) -> Sequence[Any]:
    import torch

    if isinstance(tree, torch.Tensor):
        return (tree,)
    if type(tree) is tuple and all(type(t) is torch.Tensor for t in tree):
        return tree  # the usual arguments: no pytree walk
    from torch.utils._pytree import tree_flatten

    return tree_flatten(tree)[0]  # type: ignore[no-any-return]


def check_real(api: str, args: Sequence[Any]) -> None:
    """torch.func's error for a complex input (any argument, as torch.func checks)."""
    for idx, leaf in enumerate(_leaves(tuple(args))):
        if getattr(leaf, "is_complex", None) is not None and leaf.is_complex():
            raise RuntimeError(
                f"{api}: Expected all inputs to be real but received complex tensor "
                f"at flattened input idx: {idx}"
            )


def real_outputs(api: str, func: Callable[..., Any], has_aux: bool) -> Callable[..., Any]:
    """``func``, raising torch.func's error when an output (not the aux) is complex.

    Old functorch differentiates a complex output of real inputs silently
    (``jacrev`` keeps only the real part); torch.func refuses it.
    """

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        outputs = result[0] if has_aux and isinstance(result, tuple) and result else result
        for idx, leaf in enumerate(_leaves(outputs)):
            if getattr(leaf, "is_complex", None) is not None and leaf.is_complex():
                raise RuntimeError(
                    f"{api}: Expected all outputs to be real but received complex tensor "
                    f"at flattened input idx: {idx}"
                )
        return result

    return checked


#: functorch's own failures (not errors of the function) that the loop
#: backend does not share, so that a chain sends such calls to the loop:
#: (fragment of the message, kind, what would let functorch transform it).
def check_floating(what: str, tree: Any) -> None:
    """torch.func's ``ValueError`` for an integer ``what`` (``"primal"``/``"tangent"``)."""
    import torch

    for leaf in _leaves(tree):
        if isinstance(leaf, torch.Tensor) and not (leaf.is_floating_point() or leaf.is_complex()):
            raise ValueError(
                f"Expected {what} to be floating point or complex, but got: {leaf.dtype}"
            )


def vmap_failure(
    exc: BaseException, func: Any, in_dims: Any, args: Any, refuse: Callable[[str], BaseException]
) -> Optional[BaseException]:
    """What to raise instead of ``exc``, the error of a native vmap call, if anything.

    ``refuse(reason)`` builds the refusal the backend raises for a batch of
    size 0; an error torch.func would have raised for these inputs (no
    batched input, mismatched sizes, a bad ``in_dims``) is returned as it
    is; ``None`` keeps ``exc``.
    """
    from ._loop_vmap import _process_inputs

    try:
        size = _process_inputs(in_dims, tuple(args), func)[0]
    except ValueError as right:
        if isinstance(exc, (IndexError, AssertionError)):
            return right
        return None
    except Exception:  # inputs this check cannot read: keep functorch's error
        return None
    if size == 0:
        return refuse("vmap over a batch of size 0")
    return None


def guard_real(api: str, transformed: Callable[..., Any]) -> Callable[..., Any]:
    """``transformed``, raising torch.func's error first for a complex input."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        check_real(api, args)
        return transformed(*args, **kwargs)

    return checked


def guard_floating(argnums: Any, transformed: Callable[..., Any]) -> Callable[..., Any]:
    """``transformed``, raising torch.func's error first for an integer input at ``argnums``."""

    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            chosen = _selected(args, argnums)
        except (IndexError, TypeError):
            chosen = ()
        check_floating("primal", chosen)
        return transformed(*args, **kwargs)

    return checked


def _level_functions() -> Optional[Tuple[Callable[[Any], int], Callable[[], int]]]:
    """functorch's ``(maybe_get_level, current_level)``, wherever this torch keeps them."""
    import importlib

    functions: Any = None
    for where in ("torch._C._functorch", "functorch._C"):  # torch >= 1.13, functorch 0.2
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                functions = importlib.import_module(where)
            break
        except ImportError:
            continue
    if functions is None:
        return None
    get = getattr(functions, "maybe_get_level", None)
    current = getattr(functions, "current_level", None)
    if get is None or current is None:
        return None
    return get, current


def moves_unbatched_outputs(out_dims: Any) -> bool:
    """Whether ``out_dims`` asks to place some output at a dim other than 0."""
    if isinstance(out_dims, int):
        return out_dims != 0
    if isinstance(out_dims, (tuple, list)):
        return any(moves_unbatched_outputs(d) for d in out_dims)
    if isinstance(out_dims, dict):
        return any(moves_unbatched_outputs(d) for d in out_dims.values())
    return False


def batched_outputs(
    func: Callable[..., Any], out_dims: Any, refuse: Callable[[str], BaseException]
) -> Callable[..., Any]:
    """``func``, refusing an output that does not depend on the batch at an out_dim other than 0.

    functorch (every copy, torch.func too) mis-handles such an output: it fails
    to expand it, returns a tensor of the wrong shape, or, before torch 2.0,
    crashes the process (a 0-dim output at ``out_dims=1``). The loop backend
    expands it as it should, so the call is refused, for a chain to run it
    there. Where this torch does not say which level a tensor is batched at,
    ``func`` is returned as it is.
    """
    levels = _level_functions()
    if levels is None:
        return func
    get_level, current_level = levels

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten

        leaves, spec = tree_flatten(result)
        dims = _broadcast_to_and_flatten(out_dims, spec)
        if dims is None:  # functorch reports the mismatch itself
            return result
        level = current_level()
        for leaf, dim in zip(leaves, dims):
            if dim is None or dim == 0 or getattr(leaf, "dim", None) is None:
                continue
            if get_level(leaf) != level:
                raise refuse(f"place an output that does not depend on the batch at out_dims={dim}")
        return result

    return checked
