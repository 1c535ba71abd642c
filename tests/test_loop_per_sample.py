"""Per-sample gradients on the loop backend, and the shortcuts that make them cheap.

The tutorial's workload (``vmap(grad(compute_loss), in_dims=(None, None, 0,
0))`` over a model called through ``functional_call``) against torch.func
and against the hand loop; flat containers of tensors taking the path
without pytrees, checked against torch's pytrees; unbatched containers
handed to each sample as torch.func hands them.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

import adbackends
from adbackends.backends._loop_jacrev import flatten, unflatten

from . import reference as ref
from .test_loop_support import assert_same

Point = collections.namedtuple("Point", "x y")


@pytest.fixture
def loop():
    return adbackends.get("loop")


@pytest.fixture
def reference():
    return ref.backend()


def _functional_call(model: Any, params_and_buffers: Any, args: Any) -> Any:
    """torch.func.functional_call, or torch.nn.utils.stateless's before torch 2.0."""
    func = getattr(getattr(torch, "func", None), "functional_call", None)
    if func is not None:
        return func(model, params_and_buffers, args)
    from torch.nn.utils.stateless import functional_call

    merged = {}
    for part in (
        params_and_buffers if isinstance(params_and_buffers, tuple) else (params_and_buffers,)
    ):
        merged.update(part)
    return functional_call(model, merged, args)


def _t(*shape: int) -> Any:
    return torch.randn(shape, dtype=torch.float64)


# -- the flat-container shortcut against torch's pytrees --------------------------


@pytest.mark.parametrize(
    "tree",
    [
        {"b": _t(2), "a": _t(3)},
        {},
        (_t(2), _t(1)),
        (),
        [_t(2), _t(3), _t(1)],
        [],
        # Not flat, or not plain: torch's own path.
        {"a": _t(2), "b": None},
        {"a": [_t(2)]},
        (_t(2), 3),
        collections.OrderedDict(a=_t(2)),
        Point(_t(1), _t(2)),
        [(_t(1),), {"k": _t(2)}],
    ],
    ids=lambda tree: type(tree).__name__ + str(len(tree)),
)
def test_flatten_matches_torch_pytrees(tree):
    leaves, spec = flatten(tree)
    torch_leaves, torch_spec = tree_flatten(tree)
    assert len(leaves) == len(torch_leaves)
    assert all(a is b for a, b in zip(leaves, torch_leaves))
    replaced = [object() for _ in leaves]
    rebuilt = unflatten(replaced, spec)
    expected = tree_unflatten(replaced, torch_spec)
    assert type(rebuilt) is type(expected)
    assert tree_flatten(rebuilt)[1] == tree_flatten(expected)[1]
    assert tree_flatten(rebuilt)[0] == tree_flatten(expected)[0]
    if isinstance(expected, dict):
        assert list(rebuilt) == list(expected)  # key order kept


def test_flat_specs_equal_exactly_when_torchs_are():
    a, b = _t(1), _t(1)
    cases = [{"x": a, "y": b}, {"y": b, "x": a}, {"x": a}, (a, b), [a, b], (a,), [a]]
    for one in cases:
        for other in cases:
            ours = flatten(one)[1] == flatten(other)[1]
            theirs = tree_flatten(one)[1] == tree_flatten(other)[1]
            assert ours == theirs, (one, other)


# -- unbatched containers -------------------------------------------------------


def test_each_sample_gets_its_own_copy_of_an_unbatched_dict(loop, reference):
    def f(params, x):
        scale = params.pop("scale")  # changes the dict it was given
        params["seen"] = x
        return x * scale + params["shift"]

    for backend in (loop, reference):
        params = {"scale": _t(3), "shift": _t(3)}
        before = dict(params)
        x = _t(4, 3)
        out = backend.vmap(f, in_dims=(None, 0))(params, x)
        assert torch.allclose(out, x * before["scale"] + before["shift"])
        assert params.keys() == before.keys()  # the caller's dict is untouched
        assert all(params[k] is before[k] for k in before)


def test_each_sample_gets_its_own_copy_of_an_unbatched_list(loop, reference):
    def f(items, x):
        first = items.pop(0)
        return x * first + len(items)

    for backend in (loop, reference):
        items = [_t(2), _t(2)]
        x = _t(3, 2)
        out = backend.vmap(f, in_dims=(None, 0))(items, x)
        assert torch.allclose(out, x * items[0] + 1)
        assert len(items) == 2


@pytest.mark.parametrize(
    "unbatched",
    [
        lambda: {"w": _t(3), "b": _t(3)},
        lambda: (_t(3), _t(3)),
        lambda: [_t(3), _t(3)],
        lambda: {},
        lambda: 2.5,
        lambda: None,
    ],
    ids=["dict", "tuple", "list", "empty", "float", "none"],
)
def test_unbatched_arguments_match_torch_func(loop, reference, unbatched):
    value = unbatched()

    def f(p, x):
        if isinstance(p, dict):
            return {k: x * v for k, v in p.items()} if p else x.sum()
        if isinstance(p, (tuple, list)):
            return x * p[0] + p[1]
        return x * (1.0 if p is None else p)

    x = _t(4, 3)
    for in_dims in [(None, 0), (None, 1)]:
        xs = x if in_dims[1] == 0 else x.T.contiguous()
        assert_same(loop.vmap(f, in_dims)(value, xs), reference.vmap(f, in_dims)(value, xs))


def test_outputs_of_different_structures_are_refused_with_torchs_specs(loop):
    def f(x):
        return {"a": x, "b": x} if x.sum() > 0 else {"b": x, "a": x}

    x = torch.tensor([[1.0], [-1.0]])
    with pytest.raises(ValueError, match="returned outputs of different structures") as info:
        loop.vmap(f)(x)
    first, second = (tree_flatten(f(row))[1] for row in x)
    assert f"for different samples: {first} and {second}." in str(info.value)


@pytest.mark.parametrize("out_dims", [0, 1, {"a": 0, "b": 1}, {"a": None, "b": 0}])
def test_dict_outputs_match_torch_func(loop, reference, out_dims):
    y = _t(2)

    def f(x):
        return {
            "a": y * 2 if isinstance(out_dims, dict) and out_dims["a"] is None else x * 2,
            "b": x.sin(),
        }

    x = _t(3, 2)
    try:
        expected = reference.vmap(f, out_dims=out_dims)(x)
    except (ValueError, adbackends.CapabilityError) as exc:  # functorch's, or its refusal
        if "out_dims" not in str(exc) or hasattr(torch, "func"):
            raise
        pytest.skip(f"this reference (functorch before torch 2.0) refuses it: {exc}")
    assert_same(loop.vmap(f, out_dims=out_dims)(x), expected)


def test_tuple_and_list_outputs_match_torch_func(loop, reference):
    x = _t(3, 2)
    for f in (lambda t: (t, t.cos()), lambda t: [t.exp(), t]):
        for out_dims in (0, 1):
            assert_same(loop.vmap(f, out_dims=out_dims)(x), reference.vmap(f, out_dims=out_dims)(x))


# -- the tutorial's workload --------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)
        self.register_buffer("offset", torch.full((3,), 0.1))

    def forward(self, x: Any) -> Any:
        x = F.relu(self.conv(x)).flatten(1)
        return F.log_softmax(self.fc(x) + self.offset, dim=1)


def _tutorial(dtype: Any = torch.float64) -> Any:
    torch.manual_seed(0)
    model = _Net().to(dtype)
    data = torch.randn(5, 1, 6, 6, dtype=dtype)
    targets = torch.randint(3, (5,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def compute_loss(params: Any, buffers: Any, sample: Any, target: Any) -> Any:
        predictions = _functional_call(model, (params, buffers), (sample.unsqueeze(0),))
        return F.nll_loss(predictions, target.unsqueeze(0))

    return model, compute_loss, params, buffers, data, targets


def test_per_sample_gradients_match_torch_func(loop, reference):
    _, compute_loss, params, buffers, data, targets = _tutorial()
    ours = loop.vmap(loop.grad(compute_loss), in_dims=(None, None, 0, 0))(
        params, buffers, data, targets
    )
    theirs = reference.vmap(reference.grad(compute_loss), in_dims=(None, None, 0, 0))(
        params, buffers, data, targets
    )
    assert list(ours) == list(theirs) == list(params)
    assert_same(ours, theirs)


def test_per_sample_gradients_match_the_hand_loop(loop):
    model, compute_loss, params, buffers, data, targets = _tutorial()
    ours = loop.vmap(loop.grad(compute_loss), in_dims=(None, None, 0, 0))(
        params, buffers, data, targets
    )
    for i in range(data.shape[0]):
        loss = F.nll_loss(model(data[i : i + 1]), targets[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for name, g in zip(params, grads):
            assert torch.allclose(ours[name][i], g, rtol=1e-12, atol=1e-14)
            assert not ours[name].requires_grad


def test_per_sample_gradients_of_parameters_that_require_grad(loop, reference):
    # Parameters that require grad (not detached): the results stay differentiable.
    model, compute_loss, params, buffers, data, targets = _tutorial()
    params = dict(model.named_parameters())
    ours = loop.vmap(loop.grad(compute_loss), in_dims=(None, None, 0, 0))(
        params, buffers, data, targets
    )
    theirs = reference.vmap(reference.grad(compute_loss), in_dims=(None, None, 0, 0))(
        params, buffers, data, targets
    )
    assert_same(ours, theirs)
    assert all(v.requires_grad for v in ours.values())
    w = params["fc.weight"]
    (ga,) = torch.autograd.grad(ours["fc.bias"].sum(), w, retain_graph=True)
    (gb,) = torch.autograd.grad(theirs["fc.bias"].sum(), w)
    assert torch.allclose(ga, gb)


def test_grad_and_value_still_hands_back_the_value(loop, reference):
    _, compute_loss, params, buffers, data, targets = _tutorial()
    for has_aux in (False, True):

        def f(*args: Any, has_aux: bool = has_aux) -> Any:
            loss = compute_loss(*args)
            return (loss, {"loss": loss * 2}) if has_aux else loss

        ours = loop.vmap(loop.grad_and_value(f, has_aux=has_aux), in_dims=(None, None, 0, 0))(
            params, buffers, data, targets
        )
        theirs = reference.vmap(
            reference.grad_and_value(f, has_aux=has_aux), in_dims=(None, None, 0, 0)
        )(params, buffers, data, targets)
        assert_same(ours, theirs)
        with_aux = loop.vmap(loop.grad(f, has_aux=has_aux), in_dims=(None, None, 0, 0))(
            params, buffers, data, targets
        )
        assert_same(
            with_aux,
            reference.vmap(reference.grad(f, has_aux=has_aux), in_dims=(None, None, 0, 0))(
                params, buffers, data, targets
            ),
        )


def test_the_benchmark_runs_quick(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "per_sample.py"
    spec = importlib.util.spec_from_file_location("per_sample_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        out = tmp_path / "results.json"
        assert module.main(["--quick", "--models", "mlp", "--out", str(out)]) == 0
        import json

        data = json.loads(out.read_text())
        assert [r["model"] for r in data["rows"]] == ["mlp"]
        row = data["rows"][0]
        assert set(row["times_s"]) == {"loop", "hand", "hand_functional_call"}
        assert row["ratio"] > 0 and row["met"] == (row["ratio"] <= data["target"])
        # The docs table replaces only what stands between its markers.
        page = tmp_path / "page.rst"
        page.write_text(f"Title\n\n{module.START}\n\nold\n\n{module.END}\n\nAfter.\n")
        module.write_docs(data, page)
        text = page.read_text()
        assert text.startswith("Title\n\n" + module.START) and text.endswith(
            module.END + "\n\nAfter.\n"
        )
        assert "old" not in text and "MLP 784-128-10" in text and f"{row['ratio']:.3f}" in text
    finally:
        del sys.modules[spec.name]
