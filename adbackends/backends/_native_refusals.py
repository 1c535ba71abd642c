"""When torch.func or functorch cannot transform a function, and what would fix it.

The native backends' :meth:`~adbackends.Backend.cannot_transform` hooks use
:func:`refusal_of`: it reads an exception raised by torch.func (or functorch,
whose messages are the same) and says whether it means "this transform
cannot handle this function", as opposed to an error in the function itself.
The knowledge lives here, in one table (:data:`_KNOWN`) beside the two
backends that raise these messages, and nowhere else in the package.

An exception is read once: the answer is carried on the exception itself
(its ``refusal`` attribute), so whoever asks again (an outer chain, the
Hessian strategy, functorch's own refusal error) reads it instead of the
message. :func:`refuse` attaches a refusal to an exception a backend raises
itself.
"""

from __future__ import annotations

from typing import Optional, Tuple

from .._shared import summarize_exception
from ..backend import Refusal

__all__ = ["classify", "refusal_of", "refuse", "function_capability"]

_FUNCTION_FIX = (
    "write the autograd.Function in the setup_context style (forward(x) without ctx, "
    "plus a setup_context staticmethod) and give it a vmap staticmethod or "
    "generate_vmap_rule = True"
)

#: (fragment of the message, kind, what would make the function transformable).
#: Checked in order; the first fragment found in the message decides. The
#: two refusals of an autograd.Function are also the capability a probe
#: checks (:data:`_FUNCTION_CAPABILITY`).
_KNOWN: Tuple[Tuple[str, str, str], ...] = (
    (
        "either (1) calling .item() on a Tensor or (2)",
        "item_or_control_flow",
        "avoid .item(), float()/int()/bool() of tensors and Python `if` on tensor values "
        "inside vmap: keep values as tensors and use torch.where for branches",
    ),
    (
        "calling .item() on a Tensor",
        "item",
        "avoid .item() (and float()/int() of tensors) inside vmap; keep values as tensors",
    ),
    (
        "data-dependent control flow",
        "control_flow",
        "replace Python `if`/`while` on tensor values with torch.where (compute both "
        "branches and select)",
    ),
    (
        "dynamic shape",
        "dynamic_shape",
        "avoid boolean-mask indexing, nonzero() and unique() inside vmap: give every "
        "result a fixed shape, for example torch.where(mask, x, 0).sum()",
    ),
    (
        "don't yet support saved tensor hooks",
        "saved_tensor_hooks",
        "do not use torch.utils.checkpoint (or other saved-tensor hooks) inside the "
        "transformed function",
    ),
    ("must override the setup_context staticmethod", "legacy_function", _FUNCTION_FIX),
    (
        "but it does not have vmap support",
        "function_without_vmap",
        "give the autograd.Function a vmap staticmethod or set generate_vmap_rule = True "
        "(its forward must then be written with torch operations only)",
    ),
    (
        "must implement the jvp function for custom autograd.Function",
        "function_without_jvp",
        "give the autograd.Function a jvp staticmethod for forward-mode AD",
    ),
    (
        "do not support the use of autograd.Function",
        "autograd_function",
        "use torch >= 2.0, whose torch.func transforms setup_context-style Functions",
    ),
    (
        # a function that reads data_ptr() (a cache keyed on tensor identity,
        # as dxtb's calculators keep): a transform's wrapped tensors have no storage
        "Cannot access data pointer of Tensor that doesn't have storage",
        "data_pointer",
        "do not read data_ptr() or the storage of tensors inside the transformed function "
        "(turn off caches keyed on tensor identity)",
    ),
    (
        # functorch before torch 2.0, forward mode over some 0-dim tensors
        "Could not allocate memory to change Tensor SizesAndStrides",
        "internal_failure",
        "nothing in the function: functorch fails inside; the loop backend computes it",
    ),
)


#: The refusals of an autograd.Function, and the capability each shows missing.
_FUNCTION_CAPABILITY = {
    # torch >= 2.0, a Function without setup_context (ctx style)
    "legacy_function": "legacy_function",
    # functorch 0.2 and torch 1.13: every Function, whatever its style
    "autograd_function": "custom_function",
}

#: The attribute on which an exception carries its refusal (or ``None``).
_ATTR = "refusal"
_UNREAD = object()


def refusal_of(exc: BaseException) -> Optional[Refusal]:
    """The refusal ``exc`` carries, reading its message the first time only.

    Examples
    --------
    >>> from adbackends.backends._native_refusals import refusal_of
    >>> exc = RuntimeError("vmap: It looks like you're calling .item() on a Tensor.")
    >>> refusal_of(exc).kind, exc.refusal.kind
    ('item', 'item')
    """
    found = getattr(exc, _ATTR, _UNREAD)
    if found is _UNREAD:
        found = classify(exc)
        refuse(exc, found)
    return found if isinstance(found, Refusal) else None


def refuse(exc: BaseException, refusal: Optional[Refusal]) -> BaseException:
    """Attach ``refusal`` to ``exc`` (``None``: read, and not a refusal); returns ``exc``."""
    try:
        setattr(exc, _ATTR, refusal)
    except (AttributeError, TypeError):  # an exception type that takes no attributes
        pass
    return exc


def function_capability(refusal: Optional[Refusal]) -> Optional[str]:
    """The capability a refusal of an autograd.Function shows missing, if it is one."""
    return None if refusal is None else _FUNCTION_CAPABILITY.get(refusal.kind)


def classify(exc: BaseException) -> Optional[Refusal]:
    """A :class:`~adbackends.backend.Refusal` if ``exc`` is a native transform's refusal.

    Reads the message every time; callers use :func:`refusal_of`, which
    reads it once per exception. ``None`` means the error is the function's own (a shape mismatch, a
    NameError, a bad ``in_dims``): it must be raised, never retried.

    Examples
    --------
    >>> from adbackends.backends._native_refusals import classify
    >>> classify(RuntimeError("vmap: It looks like you're calling .item() on a Tensor."))[0]
    'item'
    >>> classify(RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"))
    """
    if not isinstance(exc, (RuntimeError, NotImplementedError)):
        return None
    from .._memory import is_out_of_memory, oom_refusal_fix

    if is_out_of_memory(exc):  # what is left after any smaller chunks were tried
        return Refusal("out_of_memory", summarize_exception(exc, limit=300), oom_refusal_fix())
    try:
        text = str(exc)
    except Exception:  # an exception whose str() fails says nothing we can use
        return None
    for fragment, kind, fix in _KNOWN:
        if fragment in text:
            return Refusal(kind, summarize_exception(exc, limit=300), fix)
    # The transform machinery's own assertions (for example "unwrapped_count > 0
    # INTERNAL ASSERT FAILED ... functorch") are failures of the transform, not
    # of the function; the loop backend does not use that machinery.
    if "INTERNAL ASSERT FAILED" in text and "functorch" in text:
        return Refusal(
            "internal_assert",
            summarize_exception(exc, limit=300),
            "nothing in the function: the transform machinery failed an internal check",
        )
    return None
