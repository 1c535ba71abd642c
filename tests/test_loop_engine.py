"""The loop's one call past torch's public API (backends/_torch_compat.py).

On the installed torch, the direct engine call gives what
``torch.autograd.grad`` gives (values, ``None`` for unused inputs,
differentiability with ``create_graph``, the graph freed or kept by
``retain_graph``), and it is used exactly where the version gate and the
switch allow it. The compatibility matrix runs this file on every torch.
"""

from __future__ import annotations

from typing import Any, Iterator, List

import pytest
import torch

import adbackends
from adbackends.backends import _torch_compat as compat


@pytest.fixture(autouse=True)
def _fresh_switch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(compat.ENV_VAR, raising=False)
    monkeypatch.setattr(compat, "use_engine", None)
    compat.reset()
    yield
    compat.reset()


def _has_engine_entry() -> bool:
    import torch.autograd.graph as graph

    return hasattr(graph, "_engine_run_backward")


def _checked_here() -> bool:
    return compat._version() in compat.CHECKED


needs_entry = pytest.mark.skipif(
    not _has_engine_entry(), reason="this torch has no torch.autograd.graph._engine_run_backward"
)


class _DirectCalls:
    """Counts the loop's direct engine calls.

    ``torch.autograd.grad`` calls the entry through its own module's name for
    it, so only calls made past it are counted.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch.autograd.graph as graph

        self.n = 0
        original = getattr(graph, "_engine_run_backward", None)

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.n += 1
            return original(*args, **kwargs)  # type: ignore[misc]

        if original is not None:
            monkeypatch.setattr(graph, "_engine_run_backward", counting)
        compat.reset()


# -- the gate and the switch ----------------------------------------------------


def test_engine_used_exactly_on_checked_releases_that_have_it():
    expected = _checked_here() and _has_engine_entry()
    assert (compat.engine() is not None) is expected


def test_every_checked_release_has_the_entry_grad_calls():
    if not _checked_here():
        pytest.skip(f"torch {torch.__version__} is not in CHECKED")
    # torch.autograd.grad itself calls it: the canary for a release that changes this.
    assert _has_engine_entry()
    assert "_engine_run_backward" in torch.autograd.grad.__code__.co_names


def test_unchecked_release_uses_the_public_function(monkeypatch):
    monkeypatch.setattr(compat, "_version", lambda: (2, 99))
    compat.reset()
    assert compat.engine() is None
    calls = _DirectCalls(monkeypatch)
    x = torch.randn(3, requires_grad=True)
    (g,) = compat.backward([x.sin()], [x], [torch.ones(3)], False, False)
    assert torch.equal(g, x.detach().cos())
    assert calls.n == 0


def test_module_flag_turns_it_off_and_on(monkeypatch):
    monkeypatch.setattr(compat, "use_engine", False)
    assert compat.engine() is None
    if _has_engine_entry():
        monkeypatch.setattr(compat, "_version", lambda: (2, 99))
        monkeypatch.setattr(compat, "use_engine", True)
        assert compat.engine() is not None  # forced on, to check a new release


@pytest.mark.parametrize("value", ["public", "PUBLIC", " public "])
def test_environment_variable_turns_it_off(monkeypatch, value):
    monkeypatch.setenv(compat.ENV_VAR, value)
    compat.reset()
    assert compat.engine() is None
    calls = _DirectCalls(monkeypatch)
    loop = adbackends.get("loop")
    x = torch.randn(3)
    assert torch.allclose(loop.jacfwd(torch.sin)(x), torch.diag(x.cos()))
    assert calls.n == 0
    if _has_engine_entry():
        monkeypatch.delenv(compat.ENV_VAR)
        monkeypatch.setattr(compat, "use_engine", True)
        loop.jacfwd(torch.sin)(x)
        assert calls.n > 0  # the same counter sees the engine path


def test_environment_variable_other_values_leave_it_to_the_gate(monkeypatch):
    monkeypatch.setenv(compat.ENV_VAR, "engine")
    compat.reset()
    assert (compat.engine() is not None) is (_checked_here() and _has_engine_entry())


@needs_entry
def test_a_replaced_autograd_grad_is_called(monkeypatch):
    monkeypatch.setattr(compat, "use_engine", True)
    seen: List[Any] = []
    original = torch.autograd.grad

    def other_library_grad(*args: Any, **kwargs: Any) -> Any:
        seen.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", other_library_grad)
    assert compat.engine() is None
    x = torch.randn(3, requires_grad=True)
    compat.backward([x.sin()], [x], [torch.ones(3)], False, False)
    assert len(seen) == 1


# -- same results as torch.autograd.grad ------------------------------------------


def _graph():
    """``(outputs, inputs, cotangents)``: two outputs, one input unused."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    outs = [(b * a.sin()).sum(0), (a**3).prod().reshape(())]
    cts = [
        torch.randn(3, generator=gen, dtype=torch.float64),
        torch.tensor(1.5, dtype=torch.float64),
    ]
    return outs, [a, b, unused], cts


def _assert_same_grads(ours, theirs):
    assert isinstance(ours, tuple) and len(ours) == len(theirs)
    for g, h in zip(ours, theirs):
        if h is None:
            assert g is None
            continue
        assert g.dtype == h.dtype and g.shape == h.shape
        assert torch.equal(g, h)
        assert g.requires_grad == h.requires_grad
        assert (g.grad_fn is None) == (h.grad_fn is None)


@pytest.fixture(params=[True, False], ids=["engine", "public"])
def engine_on(request, monkeypatch):
    if request.param and not _has_engine_entry():
        pytest.skip("this torch has no engine entry")
    monkeypatch.setattr(compat, "use_engine", request.param)
    assert (compat.engine() is not None) is request.param
    return request.param


@pytest.mark.parametrize("create_graph", [False, True])
def test_values_unused_inputs_and_differentiability(engine_on, create_graph, monkeypatch):
    calls = _DirectCalls(monkeypatch)
    outs, ins, cts = _graph()
    ours = compat.backward(outs, ins, cts, True, create_graph)
    assert calls.n == int(engine_on)
    theirs = torch.autograd.grad(
        outs, ins, cts, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    _assert_same_grads(ours, theirs)
    assert ours[2] is None
    if create_graph:
        # The graphs built are the same: second derivatives agree.
        second = torch.autograd.grad(ours[0].sum(), ins[:2], retain_graph=True)
        expected = torch.autograd.grad(theirs[0].sum(), ins[:2], retain_graph=True)
        _assert_same_grads(second, expected)


def test_retain_graph_false_frees_the_graph(engine_on):
    outs, ins, cts = _graph()
    compat.backward(outs, ins, cts, False, False)
    with pytest.raises(RuntimeError) as ours:
        compat.backward(outs, ins, cts, False, False)
    outs, ins, cts = _graph()
    torch.autograd.grad(outs, ins, cts, allow_unused=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.autograd.grad(outs, ins, cts, allow_unused=True)
    assert str(ours.value) == str(theirs.value)


def test_retain_graph_true_keeps_it(engine_on):
    outs, ins, cts = _graph()
    first = compat.backward(outs, ins, cts, True, False)
    again = compat.backward(outs, ins, cts, False, False)
    _assert_same_grads(again, first)


def test_rows_match_one_call_per_row(engine_on):
    outs, ins, _ = _graph()
    out = outs[0]
    rows = list(torch.eye(3, dtype=out.dtype).unbind(0))
    for create_graph in (False, True):
        ours = compat.backward_rows(out, ins, rows, create_graph)
        for got, row in zip(ours, rows):
            expected = torch.autograd.grad(
                out, ins, row, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            _assert_same_grads(got, expected)


def test_wrong_cotangent_shape_raises_torchs_error(engine_on):
    outs, ins, cts = _graph()
    bad = [torch.ones(5, dtype=torch.float64), cts[1]]
    with pytest.raises(RuntimeError) as ours:
        compat.backward(outs, ins, bad, True, False)
    with pytest.raises(RuntimeError) as theirs:
        torch.autograd.grad(outs, ins, bad, retain_graph=True, allow_unused=True)
    assert str(ours.value) == str(theirs.value)
    assert "Mismatch in shape" in str(ours.value)


def test_complex_cotangent_of_a_real_output_raises_torchs_error(engine_on):
    outs, ins, cts = _graph()
    bad = [cts[0].to(torch.complex128), cts[1]]
    with pytest.raises(RuntimeError) as ours:
        compat.backward(outs, ins, bad, True, False)
    with pytest.raises(RuntimeError) as theirs:
        torch.autograd.grad(outs, ins, bad, retain_graph=True, allow_unused=True)
    assert str(ours.value) == str(theirs.value)


def test_torch_function_subclass_goes_through_autograd_grad(engine_on, monkeypatch):
    class Tagged(torch.Tensor):
        pass

    calls = _DirectCalls(monkeypatch)
    x = torch.randn(3).as_subclass(Tagged).requires_grad_(True)
    out = x.sin()
    (g,) = compat.backward([out], [x], [torch.ones(3)], False, False)
    assert torch.allclose(g.as_subclass(torch.Tensor), x.detach().cos().as_subclass(torch.Tensor))
    assert calls.n == 0


# -- the loop's transforms give the same results either way ------------------------


def _run_family(use: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every loop transform that runs backward passes, on one function: ``(leaves, w)``."""
    monkeypatch.setattr(compat, "use_engine", use)
    loop = adbackends.get("loop")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(t: Any) -> Any:
        return torch.tanh(w @ t) ** 2

    def scalar(t: Any) -> Any:
        return f(t).sum()

    out, jvp_fn = loop.linearize(f, x)
    results = [
        loop.grad(scalar)(x),
        loop.grad_and_value(scalar)(x),
        loop.jvp(f, (x,), (torch.ones(4, dtype=x.dtype),)),
        loop.jacfwd(f)(x),
        loop.hessian(scalar)(x),
        out,
        jvp_fn(torch.ones(4, dtype=x.dtype)),
        loop.vmap(loop.grad(scalar))(torch.randn(3, 4, generator=gen, dtype=x.dtype)),
    ]
    return torch.utils._pytree.tree_flatten(results)[0], w


def test_loop_transforms_identical_with_and_without_the_engine(monkeypatch):
    if not _has_engine_entry():
        pytest.skip("this torch has no engine entry: only the public path exists")
    with_engine, w1 = _run_family(True, monkeypatch)
    without, w2 = _run_family(False, monkeypatch)
    assert len(with_engine) == len(without) == 10
    assert any(a.requires_grad for a in with_engine)
    for a, b in zip(with_engine, without):
        assert torch.equal(a, b)
        assert a.requires_grad == b.requires_grad
        if a.requires_grad:
            # Differentiable results lead back to w the same way.
            (ga,) = torch.autograd.grad(a.sum(), w1, retain_graph=True)
            (gb,) = torch.autograd.grad(b.sum(), w2, retain_graph=True)
            assert torch.equal(ga, gb)
