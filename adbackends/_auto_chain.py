"""Automatic selection's second rule: a native backend that needs the loop for some calls.

The first rule (:func:`adbackends.selection._first_qualified`) picks the first
backend of :data:`~adbackends.selection.AUTO_ORDER` that passes the required
probes on its own. On torch 1.12 and 1.13 that is the loop backend, because
functorch refuses every ``autograd.Function`` and so fails the default
requirement ``custom_function``.

Where the loop backend was picked that way, this rule looks again at the
backends ruled out before it. The first one that loads, has native
composable transforms (the ``transforms`` probe), fails none of the
requirements that code added with :func:`adbackends.require` (only default
ones, :data:`~adbackends.selection.DEFAULT_REQUIRED`) and whose chain with
the loop backend, ``name>loop``, passes every required probe becomes the
choice: each call then runs natively where it can and on the loop where it
must. The decision is made by probes, never by a version number; on torch
1.12 and 1.13 it gives ``functorch>loop``.

A requirement added by code says that the code relies on it everywhere
(``require("legacy_function")``: ctx-style Functions throughout), where a
chain would fall back on every function: there the loop backend stays the
choice, on every torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["native_chain"]

#: What :func:`native_chain` returns: the chain, the native backend's name and
#: one sentence for the reason.
Found = Tuple["Backend", str, str]


def native_chain(
    rejected: Sequence[Tuple[str, str]],
    required: Sequence[str],
    waivable: Sequence[str],
    *,
    loaded: Callable[[str], Optional[Backend]],
    chain: Callable[[str], Backend],
) -> Optional[Found]:
    """The first ruled-out backend whose chain with the loop passes ``required``.

    Parameters
    ----------
    rejected : sequence of (name, reason)
        The candidates the first rule ruled out, in priority order.
    required : sequence of str
        The probes automatic selection demands.
    waivable : sequence of str
        The default requirements: a backend may fail these alone where its
        chain with the loop passes them.
    loaded : callable
        ``loaded(name)``: the loaded backend, or ``None`` where it does not load.
    chain : callable
        ``chain(name)``: the chain ``name>loop``.

    Returns
    -------
    (chain, name, reason) or None
        ``None`` where no candidate qualifies this way.
    """
    for name, why in rejected:
        backend = loaded(name)
        if backend is None or not backend.supports("transforms"):
            continue
        if any(cap not in waivable and not backend.supports(cap) for cap in required):
            continue
        candidate = chain(name)
        if all(candidate.supports(cap) for cap in required):
            passes = f"; {name}>loop passes {', '.join(required)}" if required else ""
            reason = (
                f"{name} has native transforms but {why}{passes}, so {name} runs each call "
                f"it can and the loop backend the rest"
            )
            return candidate, name, reason
    return None
