"""What the loop backend takes from torch beyond its public API: one engine call.

``torch.autograd.grad`` checks and converts its arguments, then hands them
to the autograd engine through ``torch.autograd.graph._engine_run_backward``
(a private function). For small graphs that handling costs about as much as
the backward pass itself, and the loop's forward-mode products and Hessians
run many small backward passes on arguments that need none of it, so
:func:`backward` calls the engine entry directly, as ``torch.autograd.grad``
calls it, when all of the following hold:

* the torch release is one on which this call has been checked against
  ``torch.autograd.grad`` (:data:`CHECKED`), or :data:`use_engine` is
  ``True``;
* the switch is not off: :data:`use_engine` is not ``False`` and the
  environment variable ``ADBACKENDS_LOOP_ENGINE`` is not ``public``;
* ``torch.autograd.grad`` is torch's own function (not replaced by another
  library; the loop vmap's wrapper counts as torch's own, see
  :func:`original_grad`);
* the arguments are plain tensors (no ``__torch_function__``, no nested
  tensors) and every cotangent has its output's shape and complexness, so
  ``torch.autograd.grad`` would pass them on unchanged.

Anything else goes through ``torch.autograd.grad`` itself, with its checks
and its error messages. Either way the results are the same:
``tests/test_loop_engine.py`` compares the two on the installed torch.
"""

from __future__ import annotations

import os
from typing import Any, Callable, FrozenSet, List, Optional, Sequence, Tuple

__all__ = ["CHECKED", "ENV_VAR", "backward", "backward_rows", "engine", "original_grad"]

#: Torch releases, as ``(major, minor)``, on which the direct engine call has
#: been checked against ``torch.autograd.grad``: the compatibility matrix runs
#: ``tests/test_loop_engine.py`` and the loop's differential tests against
#: torch.func on them. Other releases use ``torch.autograd.grad``; a release
#: is added here once its matrix row passes ``tests/test_loop_engine.py``,
#: which turns the call on whatever the release.
CHECKED: FrozenSet[Tuple[int, int]] = frozenset({(2, 13), (2, 15)})

#: ``ADBACKENDS_LOOP_ENGINE=public`` turns the direct engine call off (read
#: when the loop first runs a backward pass, and again after :func:`reset`).
ENV_VAR = "ADBACKENDS_LOOP_ENGINE"

#: ``None``: the torch release and :data:`ENV_VAR` decide. ``False``: always
#: ``torch.autograd.grad``. ``True``: the engine call wherever torch has it,
#: checked release or not (to check a new release).
use_engine: Optional[bool] = None

# (torch.autograd.grad seen, use_engine seen, engine entry or None,
#  torch.overrides.has_torch_function): decided once per (grad, use_engine),
#  replaced whole, so that a thread reading it never sees half of a decision.
_NONE: Tuple[Any, Any, Any, Any] = (None, None, None, None)
_state: Tuple[Any, Any, Any, Any] = _NONE


def reset() -> None:
    """Forget the decision, so that the next backward pass reads the switch again."""
    global _state
    _state = _NONE


def original_grad() -> Callable[..., Any]:
    """``torch.autograd.grad``, bypassing the wrapper a running loop vmap installs."""
    import torch

    grad = torch.autograd.grad
    return getattr(grad, "__adbackends_original__", grad)


def _version() -> Tuple[int, int]:
    import torch

    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _switched_off() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() == "public"


def _decide(grad: Any) -> Any:
    """The engine entry behind ``grad``, or ``None`` where ``grad`` must be called."""
    import torch

    if use_engine is False or (
        use_engine is None and (_switched_off() or _version() not in CHECKED)
    ):
        return None
    code = getattr(grad, "__code__", None)
    if (
        code is None
        or code.co_name != "grad"
        or code.co_filename != getattr(torch.autograd, "__file__", None)
        or "_engine_run_backward" not in code.co_names
    ):
        return None  # not torch's own function: it may do more than pass arguments on
    try:
        from torch.autograd.graph import _engine_run_backward
    except ImportError:  # a torch that calls the engine some other way
        return None
    return _engine_run_backward


def _decision() -> Tuple[Any, Any, Any, Any]:
    global _state
    state = _state
    grad = original_grad()
    if grad is not state[0] or use_engine is not state[1]:
        from torch.overrides import has_torch_function

        state = _state = (grad, use_engine, _decide(grad), has_torch_function)
    return state


def engine() -> Optional[Callable[..., Any]]:
    """The engine entry :func:`backward` calls directly, or ``None``: ``torch.autograd.grad``."""
    return _decision()[2]  # type: ignore[no-any-return]


def backward(
    outputs: Sequence[Any],
    inputs: Sequence[Any],
    cotangents: Sequence[Any],
    retain_graph: bool,
    create_graph: bool,
) -> Tuple[Any, ...]:
    """``torch.autograd.grad(outputs, inputs, cotangents, retain_graph, create_graph,
    allow_unused=True)``: one gradient (or ``None``) per input."""
    _, _, run, has_torch_function = _decision()
    if run is not None and outputs and inputs:
        outputs, inputs = tuple(outputs), tuple(inputs)
        if not has_torch_function(outputs + inputs) and all(
            ct is not None
            and out.shape == ct.shape
            and out.is_complex() == ct.is_complex()
            and not out.is_nested
            for out, ct in zip(outputs, cotangents)
        ):
            return run(  # type: ignore[no-any-return]
                outputs,
                tuple(cotangents),
                retain_graph,
                create_graph,
                inputs,
                True,
                accumulate_grad=False,
            )
    return original_grad()(  # type: ignore[no-any-return]
        outputs,
        inputs,
        cotangents,
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )


def backward_rows(
    output: Any, inputs: Sequence[Any], rows: Sequence[Any], create_graph: bool
) -> List[Tuple[Any, ...]]:
    """:func:`backward` of ``output`` once per cotangent in ``rows``, the graph retained.

    The rows all have one shape and dtype, so the question of the engine
    call is answered once for all of them.
    """
    _, _, run, has_torch_function = _decision()
    outputs, inputs = (output,), tuple(inputs)
    if (
        run is None
        or not inputs
        or not rows
        or has_torch_function(outputs + inputs)
        or output.is_nested
        or output.shape != rows[0].shape
        or output.is_complex() != rows[0].is_complex()
    ):
        grad = original_grad()
        return [
            grad(
                output, inputs, row, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            for row in rows
        ]
    return [
        run(outputs, (row,), True, create_graph, inputs, True, accumulate_grad=False)
        for row in rows
    ]
