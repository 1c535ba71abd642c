"""How the native backends compute ``hessian``: reverse over reverse by default.

``torch.func.hessian`` is ``jacfwd(jacrev(f))``, forward over reverse. On
CPU, ``jacrev(jacrev(f))`` is faster for the scalar functions Hessians are
usually taken of (``benchmarks/hessian_strategy.py``: 0.58x of the time at
n = 8, 0.30x at n = 128, 0.13x at n = 256 on torch 2.13, one thread) and
needs no forward-mode rule, so a custom Function that defines only
``backward`` has a Hessian too. Both give the same values and structure.

The strategy is read when a Hessian is built: the one handed down by
:func:`adbackends.hessian` (from ``adbackends.transforms.hessian_strategy``,
through :func:`requested`), or else the environment variable
``TAD_AD_HESSIAN``: ``"reverse"`` (the default) or ``"forward"``. This
module never reads the setting itself: what a backend needs from above is
passed in. With
``"forward"``, a call that the native ``hessian`` refuses for want of a jvp
rule is computed reverse over reverse instead. A DEBUG line on the
``adbackends`` logger says which ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from typing import Any, Callable, Iterator, Optional, Tuple

from .._shared import ArgNums
from ._native_refusals import refusal_of

__all__ = ["ENV_VAR", "STRATEGIES", "build", "requested", "strategy"]

#: The environment variable that picks the strategy when the setting is ``None``.
ENV_VAR = "TAD_AD_HESSIAN"
#: The strategies, default first.
STRATEGIES = ("reverse", "forward")

log = logging.getLogger("adbackends")


#: The strategy handed down by the caller building a Hessian, and its source.
_REQUESTED: contextvars.ContextVar[Optional[Tuple[str, str]]] = contextvars.ContextVar(
    "adbackends_hessian_strategy", default=None
)


@contextlib.contextmanager
def requested(chosen: Optional[str], source: str) -> Iterator[None]:
    """Build Hessians inside the block with ``chosen`` (``None``: the environment's)."""
    if chosen is None:
        yield
        return
    token = _REQUESTED.set((chosen, source))
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def strategy() -> str:
    """The Hessian strategy in force: the one requested, the environment's, or "reverse"."""
    found = _REQUESTED.get()
    if found is not None:
        chosen: Optional[str] = found[0]
        source = found[1]
    else:
        chosen = os.environ.get(ENV_VAR) or None
        source = ENV_VAR
    if chosen is None:
        return "reverse"
    if chosen not in STRATEGIES:
        raise ValueError(
            f"{source}={chosen!r} is not a Hessian strategy; use one of "
            + ", ".join(repr(s) for s in STRATEGIES)
        )
    return str(chosen)


def build(
    backend: str,
    jacrev: Callable[..., Any],
    forward: Callable[..., Any],
    func: Callable[..., Any],
    argnums: ArgNums,
) -> Callable[..., Any]:
    """The Hessian transform of ``func`` for a native backend.

    ``jacrev`` is the backend's reverse-mode Jacobian, ``forward`` its own
    (forward-over-reverse) ``hessian``.
    """
    if strategy() == "reverse":
        log.debug("hessian on %s: reverse over reverse, jacrev(jacrev(f))", backend)
        return jacrev(jacrev(func, argnums), argnums)
    log.debug("hessian on %s: forward over reverse, jacfwd(jacrev(f))", backend)
    native = forward(func, argnums)

    @functools.wraps(func)
    def hessian(*args: Any) -> Any:
        try:
            return native(*args)
        except (RuntimeError, NotImplementedError) as exc:
            refusal = refusal_of(exc)
            if refusal is None or refusal.kind != "function_without_jvp":
                raise
        log.debug(
            "hessian on %s: %s has no jvp rule; reverse over reverse instead",
            backend,
            getattr(func, "__qualname__", func),
        )
        return jacrev(jacrev(func, argnums), argnums)(*args)

    return hessian
