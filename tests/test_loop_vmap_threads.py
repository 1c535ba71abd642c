"""The loop vmap's ``torch.autograd.grad`` wrapper seen from other threads.

While a loop vmap runs, ``torch.autograd.grad`` names a wrapper that keeps
graphs alive for the map's remaining samples. Another thread's calls during
that time must behave exactly as without the wrapper: same results, same
exceptions, graphs freed as usual. Every overlap here is forced with events
and barriers (with timeouts, so that a failure cannot hang the suite).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List

import pytest
import torch
from torch.autograd import grad as grad_bound_at_import

import adbackends

WAIT = 20.0  # seconds: only ever reached when something is broken


@pytest.fixture
def loop():
    return adbackends.get("loop")


def _patched() -> bool:
    return hasattr(torch.autograd.grad, "__adbackends_original__")


def _in_thread(target: Callable[[], Any]) -> Dict[str, Any]:
    """Start ``target`` in a thread; the dict gets its ``result`` or ``error``."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = target()
        except BaseException as exc:  # reported by the test, not lost in the thread
            box["error"] = exc

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def _join(box: Dict[str, Any]) -> Any:
    box["thread"].join(WAIT)
    assert not box["thread"].is_alive(), "thread did not finish"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _message(call: Callable[[], Any]) -> str:
    with pytest.raises(RuntimeError) as info:
        call()
    return f"{type(info.value).__name__}: {info.value}"


def _other_threads_work(grad: Callable[..., Any]) -> Dict[str, Any]:
    """What another thread does with ``grad``: results and exception texts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = (x.sin() * x).sum()
    (g,) = grad(y, x)
    out: Dict[str, Any] = {"grad": g}
    # The graph was freed by that call, as torch.autograd.grad frees it.
    out["second backward"] = _message(lambda: grad(y, x))
    z = x.exp()
    (kept,) = grad(z, x, torch.ones(5, dtype=x.dtype), True)  # retain_graph positionally
    (again,) = grad(z, x, torch.ones(5, dtype=x.dtype))
    out["kept"], out["again"] = kept, again
    out["freed after"] = _message(lambda: grad(z, x, torch.ones(5, dtype=x.dtype)))
    w = x * 2
    out["shape"] = _message(lambda: grad(w, x, torch.ones(3, dtype=x.dtype)))
    out["no grad"] = _message(lambda: grad(torch.ones(2).sum(), torch.ones(2)))
    unused = torch.ones(2, requires_grad=True)
    out["unused"] = _message(lambda: grad((x * 3).sum(), [x, unused]))
    second_order = (x**3).sum()
    (d1,) = grad(second_order, x, create_graph=True)
    (d2,) = grad(d1.sum(), x)
    out["create_graph"] = (d1.requires_grad, d1.grad_fn is not None, d2)
    return out


def _assert_same(got: Dict[str, Any], expected: Dict[str, Any]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        have = got[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(have, value), key
        elif isinstance(value, tuple):
            assert have[:2] == value[:2], key
            assert torch.equal(have[2], value[2]), key
        else:
            assert have == value, key


def _map_that_waits(loop: Any, inside: threading.Event, release: threading.Event) -> Any:
    """A loop vmap over the seed's vjp-of-a-closure, held open in its first sample."""
    x = torch.arange(1.0, 5.0, dtype=torch.float64, requires_grad=True)
    y = x**2
    calls: List[int] = []

    def get_vjp(v: Any) -> Any:
        if not calls:
            inside.set()
            assert release.wait(WAIT), "the other thread did not finish"
        calls.append(1)
        return torch.autograd.grad(y, x, v)

    (jac,) = loop.vmap(get_vjp)(torch.eye(4, dtype=x.dtype))
    assert len(calls) == 4
    return jac, x


def test_another_threads_autograd_grad_behaves_as_unpatched(loop):
    expected = _other_threads_work(torch.autograd.grad)
    inside, release = threading.Event(), threading.Event()
    mapper = _in_thread(lambda: _map_that_waits(loop, inside, release))
    assert inside.wait(WAIT)
    try:
        assert _patched()  # the overlap is real: the wrapper is installed now
        got = _other_threads_work(torch.autograd.grad)
        assert _patched()
    finally:
        release.set()
    jac, x = _join(mapper)
    _assert_same(got, expected)
    assert torch.equal(jac, torch.diag(2 * x.detach()))
    assert not _patched()


def test_grad_bound_by_name_in_another_thread_behaves_as_unpatched(loop):
    # ``from torch.autograd import grad`` at import time: the original function.
    assert not hasattr(grad_bound_at_import, "__adbackends_original__")
    expected = _other_threads_work(grad_bound_at_import)
    inside, release = threading.Event(), threading.Event()
    mapper = _in_thread(lambda: _map_that_waits(loop, inside, release))
    assert inside.wait(WAIT)
    try:
        # Bound by name while the map runs: the wrapper, which for this thread
        # passes every call on unchanged, during the map and after it.
        from torch.autograd import grad as bound_during

        assert hasattr(bound_during, "__adbackends_original__")
        during_bound = _other_threads_work(bound_during)
        during_import = _other_threads_work(grad_bound_at_import)
    finally:
        release.set()
    _join(mapper)
    _assert_same(during_bound, expected)
    _assert_same(during_import, expected)
    _assert_same(_other_threads_work(bound_during), expected)


def test_the_wrapper_is_what_the_name_gives_while_a_map_runs(loop):
    inside, release = threading.Event(), threading.Event()
    mapper = _in_thread(lambda: _map_that_waits(loop, inside, release))
    assert inside.wait(WAIT)
    try:
        wrapper = torch.autograd.grad
        original = wrapper.__adbackends_original__
        # Looks like torch's function to introspection.
        assert wrapper.__name__ == original.__name__ == "grad"
        assert wrapper.__doc__ == original.__doc__
        assert wrapper.__wrapped__ is original
    finally:
        release.set()
    _join(mapper)
    assert torch.autograd.grad is original


def test_two_threads_in_loop_vmaps_at_once(loop):
    barrier = threading.Barrier(2, timeout=WAIT)
    original = torch.autograd.grad

    def one_map(scale: float) -> Any:
        x = (scale * torch.arange(1.0, 4.0, dtype=torch.float64)).requires_grad_(True)
        y = x**3
        calls: List[int] = []

        def get_vjp(v: Any) -> Any:
            if len(calls) in (0, 2):
                barrier.wait()  # both maps are running, twice over
            calls.append(1)
            return torch.autograd.grad(y, x, v)

        (jac,) = loop.vmap(get_vjp)(torch.eye(3, dtype=x.dtype))
        return jac, x

    first, second = _in_thread(lambda: one_map(1.0)), _in_thread(lambda: one_map(2.0))
    for jac, x in (_join(first), _join(second)):
        assert torch.equal(jac, torch.diag(3 * x.detach() ** 2))
    assert torch.autograd.grad is original


def test_one_thread_finishing_leaves_the_other_covered(loop):
    # A short map in one thread ends while a long one in another still needs
    # the wrapper: the long one's later samples still keep the graph.
    started, short_done = threading.Event(), threading.Event()

    def long_map() -> Any:
        x = torch.arange(1.0, 4.0, dtype=torch.float64, requires_grad=True)
        y = x.exp()
        calls: List[int] = []

        def get_vjp(v: Any) -> Any:
            if not calls:
                started.set()
                assert short_done.wait(WAIT)
            calls.append(1)
            return torch.autograd.grad(y, x, v)

        (jac,) = loop.vmap(get_vjp)(torch.eye(3, dtype=x.dtype))
        return jac, x

    long_box = _in_thread(long_map)
    assert started.wait(WAIT)
    try:
        out = loop.vmap(torch.sin)(torch.zeros(3, 2))
        assert torch.equal(out, torch.zeros(3, 2))
        assert _patched()
    finally:
        short_done.set()
    jac, x = _join(long_box)
    assert torch.equal(jac, torch.diag(x.detach().exp()))
    assert not _patched()


def test_grad_bound_by_name_before_the_map_is_not_covered(loop):
    # The one case the wrapper cannot reach: code that bound the original
    # function before the map runs the vjp-of-a-closure pattern with it. The
    # first sample frees the graph, the second one says so (torch.func, which
    # runs that backward once, works).
    x = torch.arange(1.0, 4.0, dtype=torch.float64, requires_grad=True)
    y = x**2

    def get_vjp(v: Any) -> Any:
        return grad_bound_at_import(y, x, v)

    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loop.vmap(get_vjp)(torch.eye(3, dtype=x.dtype))
    assert not _patched()
    # Retaining the graph explicitly works under both.
    y = x**2
    (jac,) = loop.vmap(lambda v: grad_bound_at_import(y, x, v, retain_graph=True))(
        torch.eye(3, dtype=x.dtype)
    )
    assert torch.equal(jac, torch.diag(2 * x.detach()))
