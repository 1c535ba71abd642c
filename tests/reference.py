"""The reference the loop backend is checked against, on every torch.

torch.func on torch >= 2.0; before that functorch (the standalone 0.2
package on torch 1.12, the copy bundled with torch 1.13), which runs the
same transforms. ``backend()`` is the adbackends backend of that library
(what the ``reference`` fixture gives); ``jacrev``, ``vmap``, ``grad``,
``grad_and_value``, ``vjp``, ``jvp``, ``jacfwd``, ``hessian`` and
``linearize`` are the library's own functions, for tests that call them
directly.

Known gaps of old functorch are filled here, each where it is met, so that
torch >= 2.0 keeps the unchanged torch.func functions:

* ``jacfwd`` and ``hessian`` of functorch before torch 2.0 return zeros for a
  negative ``argnums`` in range (``jacrev`` of functorch 0.2.1 too): they are
  counted from the front before the call;
* functorch has no ``linearize`` before torch 2.0: the reference is its
  ``jvp``, evaluated at the same primals for each tangent;
* functorch before torch 2.0 refuses every ``autograd.Function`` under a
  transform: ``skip_if_no_reference`` marks the tests that only a reference
  running such a Function could check.

Other gaps, of the reference or of what the loop can watch on this torch, are
found out at run time by the functions at the end of this module, so that the
tests that meet them say exactly where and why.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Tuple

import pytest
import torch

_module: Any
NAME: Optional[str]
try:
    import torch.func as _module

    NAME = "torch.func"
except ImportError:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import functorch as _module
        NAME = "functorch"
    except ImportError:
        _module = None
        NAME = None

#: True where the reference is functorch before torch 2.0.
OLD = NAME == "functorch"
#: True where some reference loads.
AVAILABLE = NAME is not None


def describe() -> str:
    """The reference in words, for messages."""
    if NAME is None:
        return f"no reference (torch {torch.__version__} has neither torch.func nor functorch)"
    if OLD:
        version = getattr(_module, "__version__", None) or f"bundled with torch {torch.__version__}"
        return f"functorch {version}"
    return "torch.func"


def require() -> None:
    """Skip unless a reference loads here."""
    if NAME is None:
        pytest.skip(describe())


def skip_if_no_reference(reason: str) -> None:
    """Skip where the reference cannot run this case; ``reason`` says why.

    Only functorch before torch 2.0 is short of what torch.func runs (custom
    autograd.Functions above all); on torch >= 2.0 this never skips.
    """
    require()
    if OLD:
        pytest.skip(f"{describe()} cannot check this: {reason}")


def backend() -> Any:
    """The reference's adbackends backend (skips where none loads)."""
    require()
    from adbackends.registry import REGISTRY

    assert NAME is not None
    failure = REGISTRY.failure(NAME)
    if failure is not None:
        pytest.skip(f"{NAME} does not load here: {failure.reason}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return REGISTRY.get(NAME)


def _api(name: str) -> Callable[..., Any]:
    require()
    return getattr(_module, name)  # type: ignore[no-any-return]


def _from_front(argnums: Any, n: int) -> Any:
    """Negative positions in range counted from the front; the rest unchanged."""
    if isinstance(argnums, int) and not isinstance(argnums, bool) and -n <= argnums < 0:
        return argnums + n
    if isinstance(argnums, tuple):
        return tuple(
            a + n if isinstance(a, int) and not isinstance(a, bool) and -n <= a < 0 else a
            for a in argnums
        )
    return argnums


def _counting_from_front(
    name: str, func: Callable[..., Any], argnums: Any, *rest: Any, **kwargs: Any
) -> Callable[..., Any]:
    native = _api(name)
    if not OLD:
        return native(func, argnums, *rest, **kwargs)  # type: ignore[no-any-return]

    @functools.wraps(func)
    def transformed(*args: Any, **call_kwargs: Any) -> Any:
        nums = _from_front(argnums, len(args))
        return native(func, nums, *rest, **kwargs)(*args, **call_kwargs)

    return transformed


def jacrev(func: Callable[..., Any], argnums: Any = 0, **kwargs: Any) -> Callable[..., Any]:
    return _counting_from_front("jacrev", func, argnums, **kwargs)


def jacfwd(func: Callable[..., Any], argnums: Any = 0, *rest: Any, **kwargs: Any) -> Any:
    return _counting_from_front("jacfwd", func, argnums, *rest, **kwargs)


def hessian(func: Callable[..., Any], argnums: Any = 0) -> Callable[..., Any]:
    return _counting_from_front("hessian", func, argnums)


def grad(func: Callable[..., Any], argnums: Any = 0, *rest: Any, **kwargs: Any) -> Any:
    return _counting_from_front("grad", func, argnums, *rest, **kwargs)


def grad_and_value(func: Callable[..., Any], argnums: Any = 0, *rest: Any, **kwargs: Any) -> Any:
    return _counting_from_front("grad_and_value", func, argnums, *rest, **kwargs)


def vmap(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    return _api("vmap")(func, *args, **kwargs)  # type: ignore[no-any-return]


def vjp(func: Callable[..., Any], *primals: Any, **kwargs: Any) -> Any:
    return _api("vjp")(func, *primals, **kwargs)


def jvp(func: Callable[..., Any], primals: Any, tangents: Any, **kwargs: Any) -> Any:
    return _api("jvp")(func, primals, tangents, **kwargs)


def linearize(func: Callable[..., Any], *primals: Any) -> Tuple[Any, Callable[..., Any]]:
    native = getattr(_module, "linearize", None) if NAME is not None else None
    if native is not None:
        return native(func, *primals)  # type: ignore[no-any-return]
    require()
    # functorch before torch 2.0 has no linearize: its jvp at the same primals.
    output = func(*primals)

    def tangent_map(*tangents: Any) -> Any:
        return _api("jvp")(func, primals, tangents)[1]

    return output, tangent_map


# -- what this torch and its reference can do, found out at run time ------------


def _function_mode_base() -> Any:
    return getattr(torch.overrides, "TorchFunctionMode", None)


@functools.lru_cache(maxsize=None)
def function_modes() -> bool:
    """Whether a torch function mode can be built directly (not on torch 1.12).

    The loop's vmap follows which outputs were computed from a per-sample
    argument with such a mode; without one it judges them by their values
    (docs/loop.rst).
    """
    base = _function_mode_base()
    if base is None:
        return False

    class _Mode(base):  # type: ignore[misc, valid-type]
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    try:
        _Mode()
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def function_modes_see_indexing() -> bool:
    """Whether ``Tensor.__getitem__`` passes through torch function modes.

    It does not on torch 1.13 and 2.0: there the loop judges an output reached
    by indexing a sample by its values (docs/loop.rst).
    """
    if not function_modes():
        return False
    seen = []

    class _Mode(_function_mode_base()):  # type: ignore[misc]
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(getattr(func, "__name__", None))
            return func(*args, **(kwargs or {}))

    value = torch.ones(2)
    with _Mode():
        value[:1]
    return "__getitem__" in seen


def _reference_raises(call: Callable[[], Any]) -> Optional[BaseException]:
    try:
        call()
    except Exception as exc:  # inspected by the callers
        return exc
    return None


@functools.lru_cache(maxsize=None)
def vmap_breaks_on_new_tensor_with_out_dims_none() -> bool:
    """Whether the reference's vmap fails on ``v.new_tensor(...)`` with
    ``out_dims=None`` with an internal error ("DispatchKey FuncTorchBatched
    doesn't correspond to a device": torch.func of torch 2.0) instead of
    returning the unbatched tensor."""
    if OLD or NAME is None:
        return False
    exc = _reference_raises(
        lambda: vmap(lambda v: v.new_tensor([1.0]), out_dims=None)(torch.ones(2, 1))
    )
    return isinstance(exc, RuntimeError) and "doesn't correspond to a device" in str(exc)


#: How torch.func's ValueError for a vmap with no batched input starts.
NO_BATCHED_INPUT = "vmap: Expected at least one Tensor to vmap over"


@functools.lru_cache(maxsize=None)
def vmap_breaks_without_batched_input() -> bool:
    """Whether the reference's vmap fails on a call with no batched input with
    an ``IndexError`` of its own (functorch 0.2.1) instead of torch.func's
    ``ValueError``."""
    if NAME is None:
        return False
    exc = _reference_raises(lambda: vmap(lambda v: v, in_dims=(None,))(torch.ones(2)))
    return isinstance(exc, IndexError)


@functools.lru_cache(maxsize=None)
def jvp_takes_integer_tensors() -> bool:
    """Whether the reference's jvp computes with an integer primal or tangent
    (functorch 0.2.1) where torch.func raises ``ValueError``; its jacfwd and
    hessian, built on it, do not raise torch.func's error either."""
    if NAME is None:
        return False
    x = torch.ones(2, dtype=torch.float64)
    n = torch.ones(2, dtype=torch.long)
    return _reference_raises(lambda: jvp(torch.sin, (x,), (n,))) is None


@functools.lru_cache(maxsize=None)
def jacfwd_takes_randomness() -> bool:
    """Whether the reference's jacfwd has torch.func's ``randomness`` argument
    (functorch 0.2.1 has none)."""
    if NAME is None:
        return False
    exc = _reference_raises(lambda: jacfwd(torch.sin, randomness="error")(torch.ones(2)))
    return not (isinstance(exc, TypeError) and "randomness" in str(exc))
