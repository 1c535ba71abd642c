"""Comparison helpers for the loop backend's differential tests, and their own tests.

``assert_same`` is how every differential test decides that the loop backend
and torch.func agree: the same pytree structure (container types included),
and for every tensor the same shape, dtype, ``requires_grad`` and values.
``same_error`` runs a call on both backends and checks that both raise the
same exception type with messages that start alike.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Callable

import pytest
import torch
from torch.utils._pytree import tree_flatten

Pair = collections.namedtuple("Pair", "first second")


def assert_same(actual: Any, expected: Any, *, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Raise AssertionError unless ``actual`` matches ``expected`` leaf by leaf."""
    a_leaves, a_spec = tree_flatten(actual)
    e_leaves, e_spec = tree_flatten(expected)
    assert a_spec == e_spec, f"pytree structure differs:\n{a_spec}\nvs\n{e_spec}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"leaf {i}: {type(a)} is not a tensor"
            assert a.shape == e.shape, f"leaf {i}: shape {tuple(a.shape)} != {tuple(e.shape)}"
            assert a.dtype == e.dtype, f"leaf {i}: dtype {a.dtype} != {e.dtype}"
            assert a.requires_grad == e.requires_grad, (
                f"leaf {i}: requires_grad {a.requires_grad} != {e.requires_grad}"
            )
            assert torch.allclose(a.detach(), e.detach(), atol=atol, rtol=rtol, equal_nan=True), (
                f"leaf {i}: values differ, max abs diff "
                f"{(a.detach() - e.detach()).abs().max().item()}"
            )
        else:
            assert type(a) is type(e) and a == e, f"leaf {i}: {a!r} != {e!r}"


def _prefix(message: str) -> str:
    """The part of an error message before anything call-specific."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else ""
    # Cut at the first value that depends on the call (a repr, a number, a type).
    cut = re.split(r"[0-9<{(\[']", first, maxsplit=1)[0]
    return cut[:60]


def same_error(
    loop_call: Callable[[], Any], reference_call: Callable[[], Any], *, message: bool = True
) -> BaseException:
    """Both calls raise the same exception type, messages starting alike.

    With ``message=False`` only the types are compared: for errors whose
    torch.func text comes from its internals (a batching rule, a failed
    tensor operation) rather than from an argument check.
    """
    with pytest.raises(Exception) as expected:
        reference_call()
    with pytest.raises(Exception) as actual:
        loop_call()
    assert type(actual.value) is type(expected.value), (
        f"loop raised {type(actual.value).__name__}: {actual.value}\n"
        f"torch.func raised {type(expected.value).__name__}: {expected.value}"
    )
    if not message:
        return actual.value
    prefix = _prefix(str(expected.value))
    assert str(actual.value).startswith(prefix), (
        f"loop's message {str(actual.value)!r} does not start like torch.func's {prefix!r}"
    )
    return actual.value


# -- the helpers must be able to fail ------------------------------------------


def test_assert_same_accepts_equal_trees():
    x = torch.ones(2)
    assert_same({"a": (x, Pair(x, x))}, {"a": (x.clone(), Pair(x, x))})


@pytest.mark.parametrize(
    "actual, expected",
    [
        (torch.ones(2), torch.ones(3)),
        (torch.ones(2), torch.ones(2, dtype=torch.float64)),
        (torch.ones(2), torch.ones(2).requires_grad_()),
        (torch.ones(2), torch.zeros(2)),
        ((torch.ones(2),), [torch.ones(2)]),
        (Pair(torch.ones(2), torch.ones(2)), (torch.ones(2), torch.ones(2))),
        ({"a": torch.ones(2)}, {"b": torch.ones(2)}),
        (1, 2),
    ],
)
def test_assert_same_rejects_differences(actual, expected):
    with pytest.raises(AssertionError):
        assert_same(actual, expected)


def test_same_error_rejects_other_types_and_messages():
    def raise_(exc):
        def call():
            raise exc

        return call

    same_error(raise_(ValueError("vmap: bad 3")), raise_(ValueError("vmap: bad 4")))
    with pytest.raises(AssertionError):
        same_error(raise_(RuntimeError("vmap: bad")), raise_(ValueError("vmap: bad")))
    with pytest.raises(AssertionError):
        same_error(raise_(ValueError("jacrev: bad")), raise_(ValueError("vmap: bad")))
