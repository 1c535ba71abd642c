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
