"""The compiled tier, ``torch.compile>torch.func>loop``: checked against eager, never wrong.

Most cases use torch.compile's ``"eager"`` backend (dynamo only: the mechanism
is the same, a compilation takes a fraction of a second). The cases marked
``compile`` run real inductor compilations.
"""

from __future__ import annotations

import gc
import threading
import warnings
from typing import Any, Callable, Iterator, List

import pytest
import torch
from torch.utils._pytree import tree_flatten

import adbackends
from adbackends import compiled
from adbackends.fallback import FallbackWarning

CHAIN = "torch.compile>torch.func>loop"

pytestmark = pytest.mark.skipif(
    not compiled.support()[0], reason=f"torch.compile is not usable here: {compiled.support()[1]}"
)


@pytest.fixture(autouse=True)
def _tier(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[Any]]:
    """Fast knobs, a record of every compilation, no remembered fallbacks."""
    s = compiled.settings
    monkeypatch.setattr(s, "threshold", 1)
    monkeypatch.setattr(s, "trials", 1)
    monkeypatch.setattr(s, "margin", 1e9)  # keep whatever compiles: the mechanism is tested
    monkeypatch.setattr(s, "backend", "eager")
    made: List[Any] = []
    real = compiled._compile

    def counting(target: Callable[..., Any]) -> Callable[..., Any]:
        made.append(target)
        return real(target)

    monkeypatch.setattr(compiled, "_compile", counting)
    adbackends.forget_fallbacks()
    monkeypatch.setattr(compiled, "_transforms", [])  # compilations() lists this test's only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield made
    adbackends.forget_fallbacks()


@pytest.fixture
def made(_tier: List[Any]) -> List[Any]:
    return _tier


W = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.3], [-0.6, 0.2, 0.1]], dtype=torch.float64)


def energy(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(W @ x).pow(2).sum()


def two(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * y.sum() + x * y


def two_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return two(x, y).sum()


def with_aux(x: torch.Tensor) -> Any:
    return torch.tanh(W @ x), {"norm": x.norm()}


def assert_same(actual: Any, expected: Any) -> None:
    la, sa = tree_flatten(actual)
    le, se = tree_flatten(expected)
    assert sa == se
    for a, e in zip(la, le):
        assert type(a) is type(e)
        assert a.shape == e.shape and a.dtype == e.dtype
        assert a.requires_grad == e.requires_grad
        assert (a.grad_fn is None) == (e.grad_fn is None)
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def state_of(label: str) -> List[str]:
    return [row.state for row in adbackends.compilations() if row.function == label]


x3 = torch.tensor([0.2, -0.7, 1.1], dtype=torch.float64)
y3 = torch.tensor([0.5, 0.3, -0.4], dtype=torch.float64)
xb = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)

F: Any = getattr(torch, "func", None)  # None before torch 2.0, where the module is skipped
CASES = {
    "jacrev": (lambda a: a.jacrev(energy), lambda: F.jacrev(energy), (x3,)),
    "jacrev-argnums": (
        lambda a: a.jacrev(two, argnums=(0, 1)),
        lambda: F.jacrev(two, argnums=(0, 1)),
        (x3, y3),
    ),
    "jacrev-aux": (
        lambda a: a.jacrev(with_aux, has_aux=True),
        lambda: F.jacrev(with_aux, has_aux=True),
        (x3,),
    ),
    "vmap": (lambda a: a.vmap(torch.sin), lambda: F.vmap(torch.sin), (xb,)),
    "grad": (lambda a: a.grad(energy), lambda: F.grad(energy), (x3,)),
    "grad_and_value": (
        lambda a: a.grad_and_value(two_sum, argnums=1),
        lambda: F.grad_and_value(two_sum, argnums=1),
        (x3, y3),
    ),
    "jacfwd": (lambda a: a.jacfwd(two, argnums=1), lambda: F.jacfwd(two, argnums=1), (x3, y3)),
    "hessian": (lambda a: a.hessian(energy), lambda: F.hessian(energy), (x3,)),
    "vmap(jacrev(jacrev))": (
        lambda a: a.vmap(a.jacrev(a.jacrev(energy))),
        lambda: F.vmap(F.jacrev(F.jacrev(energy))),
        (xb,),
    ),
    "vmap(hessian)": (
        lambda a: a.vmap(a.hessian(energy)),
        lambda: F.vmap(F.hessian(energy)),
        (xb,),
    ),
    "vmap(jacrev, in_dims)": (
        lambda a: a.vmap(a.jacrev(two), in_dims=(0, None)),
        lambda: F.vmap(F.jacrev(two), in_dims=(0, None)),
        (xb, y3),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_transform_compiled_matches_eager(case: str, made: List[Any]) -> None:
    build, reference, args = CASES[case]
    expected = reference()(*args)
    with adbackends.using(CHAIN):
        results = [build(adbackends)(*args) for _ in range(4)]
    assert len(made) == 1, "one compilation for the variant"
    for result in results:  # eager, checked, trial, compiled
        assert_same(result, expected)
    rows = [r for r in adbackends.compilations() if r.signature != "*" and r.calls]
    assert [r.state for r in rows if r.state != "eager"] == ["compiled"], rows
    assert adbackends.fallbacks() == []


def test_builds_are_found_again_and_shapes_make_variants(made: List[Any]) -> None:
    with adbackends.using(CHAIN):
        for _ in range(3):
            adbackends.jacrev(energy)(x3)
        for _ in range(3):
            adbackends.jacrev(energy)(torch.ones(3, dtype=torch.float64))
        with torch.no_grad():  # grad mode is part of the signature: a new variant
            adbackends.jacrev(energy)(x3)
    assert len(made) == 1  # the float64 calls share one signature
    states = sorted(state_of("jacrev(energy)"))
    assert states == ["compiled", "counting"]


def test_wrong_compiled_result_is_caught_and_never_returned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tampered: List[Any] = []

    def wrong(target: Callable[..., Any]) -> Callable[..., Any]:
        tampered.append(target)
        return lambda *a, **k: target(*a, **k) + 1e-4

    monkeypatch.setattr(compiled, "_compile", wrong)
    expected = torch.func.hessian(energy)(x3)
    with adbackends.using(CHAIN), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [adbackends.hessian(energy)(x3) for _ in range(5)]
    for result in results:
        assert_same(result, expected)
    assert len(tampered) == 1, "given up after the first mismatch"
    (record,) = adbackends.fallbacks()
    assert (record.native, record.fallback, record.kind) == (
        "torch.compile",
        "torch.func>loop",
        "mismatch",
    )
    assert record.function == "hessian(energy)" and "differs from eager" in record.reason
    fallback_warnings = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(fallback_warnings) == 1 and "not the eager one" in str(fallback_warnings[0].message)
    # forget_fallbacks() lets it try again.
    adbackends.forget_fallbacks()
    with adbackends.using(CHAIN), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        for _ in range(3):
            assert_same(adbackends.hessian(energy)(x3), expected)
    assert len(tampered) == 2


@pytest.mark.parametrize("what", ["shape", "dtype", "structure", "requires_grad"])
def test_difference_sees_each_kind_of_mismatch(what: str) -> None:
    a = torch.ones(2, 3, dtype=torch.float64)
    other = {
        "shape": torch.ones(3, 2, dtype=torch.float64),
        "dtype": torch.ones(2, 3, dtype=torch.float32),
        "structure": (a,),
        "requires_grad": torch.ones(2, 3, dtype=torch.float64, requires_grad=True),
    }[what]
    why = compiled._difference(a, other)
    assert why is not None and (what in why or (what == "structure" and "structure" in why))
    assert compiled._difference(a, a.clone()) is None


def test_exception_while_compiling_gives_eager_and_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(target: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any) -> Any:
            raise RuntimeError("backend exploded")

        return run

    monkeypatch.setattr(compiled, "_compile", broken)
    with adbackends.using(CHAIN), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [adbackends.jacrev(energy)(x3) for _ in range(3)]
    for result in results:
        assert_same(result, torch.func.jacrev(energy)(x3))
    (record,) = adbackends.fallbacks()
    assert record.kind == "compile_error" and "backend exploded" in record.reason
    assert sum(issubclass(w.category, FallbackWarning) for w in caught) == 1


def test_compiled_code_failing_later_gives_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: List[int] = []

    def flaky(target: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any) -> Any:
            calls.append(1)
            if len(calls) > 2:  # checked, timed, then it breaks
                raise RuntimeError("recompilation failed")
            return target(*a)

        return run

    monkeypatch.setattr(compiled, "_compile", flaky)
    expected = torch.func.jacrev(energy)(x3)
    with adbackends.using(CHAIN), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        results = [adbackends.jacrev(energy)(x3) for _ in range(6)]
    for result in results:
        assert_same(result, expected)
    assert len(calls) == 3
    (record,) = adbackends.fallbacks()
    assert "later call" in record.reason and "recompilation failed" in record.reason


def test_graph_break_gives_eager_with_reason() -> None:
    def printing(x: torch.Tensor) -> torch.Tensor:
        print("", end="")  # a graph break: fullgraph=True refuses it
        return energy(x)

    with adbackends.using(CHAIN), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        results = [adbackends.jacrev(printing)(x3) for _ in range(3)]
    for result in results:
        assert_same(result, torch.func.jacrev(energy)(x3))
    (record,) = adbackends.fallbacks()
    assert record.native == "torch.compile" and "fullgraph" in record.reason


def test_not_faster_keeps_eager(monkeypatch: pytest.MonkeyPatch, made: List[Any]) -> None:
    monkeypatch.setattr(compiled.settings, "margin", 0.0)  # nothing is ever fast enough
    with adbackends.using(CHAIN):
        for _ in range(5):
            assert_same(adbackends.jacrev(energy)(x3), torch.func.jacrev(energy)(x3))
    assert len(made) == 1
    (row,) = [r for r in adbackends.compilations() if r.function == "jacrev(energy)"]
    assert row.state == "eager" and row.reason.startswith("not faster")
    assert row.eager_us > 0 and row.compiled_us > 0
    assert adbackends.fallbacks() == []  # not a failure: nothing to warn about


def test_grad_requiring_call_stays_eager_and_differentiable(made: List[Any]) -> None:
    x = x3.clone().requires_grad_()
    with adbackends.using(CHAIN):
        hs = [adbackends.hessian(energy)(x) for _ in range(3)]
    assert made == []
    expected = torch.func.hessian(energy)(x)
    for h in hs:
        assert_same(h, expected)
    (g,) = torch.autograd.grad(hs[-1].sum(), x, create_graph=True)
    (ge,) = torch.autograd.grad(expected.sum(), x, create_graph=True)
    torch.testing.assert_close(g, ge)
    rows = [r for r in adbackends.compilations() if r.function == "hessian(energy)"]
    assert [r.reason for r in rows] == [compiled.UPSTREAM["double_backward"]]


def test_result_carrying_a_graph_is_never_compiled(made: List[Any]) -> None:
    weight = W.clone().requires_grad_()

    def closed(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(weight @ x).pow(2).sum()

    with adbackends.using(CHAIN), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        results = [adbackends.jacrev(closed)(x3) for _ in range(3)]
    assert made == []
    for result in results:
        assert result.requires_grad
        assert_same(result, torch.func.jacrev(closed)(x3))
    (record,) = adbackends.fallbacks()
    assert record.kind == "grad_graph"


def test_inside_a_transform_runs_eagerly(made: List[Any]) -> None:
    with adbackends.using(CHAIN):
        inner = adbackends.jacrev(energy)
        # torch.func's own vmap around it: vmap(compile(f)) is unsupported upstream.
        results = [torch.func.vmap(inner)(xb) for _ in range(3)]
    assert made == []
    for result in results:
        assert_same(result, torch.func.vmap(torch.func.jacrev(energy))(xb))
    rows = [r for r in adbackends.compilations() if r.function == "jacrev(energy)"]
    assert [r.reason for r in rows] == [compiled.UPSTREAM["inside_transform"]]


def test_hessian_of_hessian_is_never_compiled(made: List[Any]) -> None:
    def cube(x: torch.Tensor) -> torch.Tensor:
        return (x**3).sum()

    with adbackends.using(CHAIN):
        results = [adbackends.hessian(adbackends.hessian(cube))(x3) for _ in range(3)]
    assert made == []
    for result in results:
        assert_same(result, torch.func.hessian(torch.func.hessian(cube))(x3))
    rows = [r for r in adbackends.compilations() if r.function.startswith("hessian(hessian")]
    assert rows and "pytorch#154284" in rows[0].reason


def traced(t: torch.Tensor) -> torch.Tensor:
    # pytorch#190855's reproducer: inductor adds about 0.1 to every Hessian entry.
    return torch.mean(1.0 / (t + torch.trace(t) * torch.eye(3, dtype=t.dtype)))


M3 = torch.tensor([[0.10, 0.20, 0.30], [0.40, 0.50, 0.60], [0.70, 0.80, 0.95]], dtype=torch.float64)


@pytest.mark.parametrize("spelling", ["hessian", "jacrev(jacrev)", "jacfwd(grad)"])
def test_trace_in_a_second_derivative_is_never_compiled(spelling: str, made: List[Any]) -> None:
    def build() -> Any:
        a = adbackends
        if spelling == "hessian":
            return a.hessian(traced)
        if spelling == "jacrev(jacrev)":
            return a.jacrev(a.jacrev(traced))
        return a.jacfwd(a.grad(traced))

    with adbackends.using(CHAIN):
        transform = build()
        results = [transform(M3) for _ in range(3)]
    assert made == []
    for result in results:
        assert_same(result, torch.func.hessian(traced)(M3))
    (row,) = adbackends.compilations(transform)
    assert "pytorch#190855" in row.reason
    # A first derivative of it is compiled as usual.
    with adbackends.using(CHAIN):
        first = adbackends.jacrev(traced)
        for _ in range(3):
            assert_same(first(M3), torch.func.jacrev(traced)(M3))
    assert len(made) == 1


@pytest.mark.compile
def test_trace_hessian_wrong_under_inductor_is_caught_by_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the static refusal out of the way, the check itself must catch it.
    monkeypatch.setattr(compiled.settings, "backend", "inductor")
    monkeypatch.setattr(compiled, "_uses", lambda func, name: False)
    expected = torch.func.hessian(traced)(M3)
    with adbackends.using(CHAIN), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        results = [adbackends.hessian(traced)(M3) for _ in range(4)]
    for result in results:
        assert_same(result, expected)
    (record,) = adbackends.fallbacks()
    assert record.kind == "mismatch", record


def test_vmap_of_jacrev_with_aux_keeps_eagers_shapes(made: List[Any]) -> None:
    # pytorch#154036's pattern (forces with the energy as aux): compiled, and checked.
    def tupled(x: torch.Tensor) -> Any:
        return energy(x), (x, energy(x))

    with adbackends.using(CHAIN):
        build = adbackends.vmap(adbackends.jacrev(tupled, has_aux=True))
        results = [build(xb) for _ in range(4)]
    assert len(made) == 1
    for result in results:
        assert_same(result, torch.func.vmap(torch.func.jacrev(tupled, has_aux=True))(xb))
    assert [r.state for r in adbackends.compilations(build)] == ["compiled"]


def test_item_and_ctx_function_give_the_loops_result(made: List[Any]) -> None:
    class LegacyCube(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return 3 * x**2 * grad

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()  # torch.func's vmap refuses .item()

    def legacy(x: torch.Tensor) -> torch.Tensor:
        return LegacyCube.apply(x) * 2  # torch.func refuses ctx-style Functions

    loop = adbackends.get("loop")
    for transform, func, arg in (("vmap", scaled, xb), ("jacrev", legacy, x3)):
        with adbackends.using(CHAIN), warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            results = [getattr(adbackends, transform)(func)(arg) for _ in range(4)]
        for result in results:
            assert_same(result, getattr(loop, transform)(func)(arg))
    assert made == [], "what the native backend cannot transform is not compiled either"
    # Only the chain's own fallbacks are reported: the tier added no warning.
    assert {r.native for r in adbackends.fallbacks()} == {"torch.func"}


def test_four_threads_compile_once(made: List[Any]) -> None:
    def fresh(x: torch.Tensor) -> torch.Tensor:
        return (torch.cos(W @ x) * x).sum()

    expected = torch.func.jacrev(fresh)(x3)
    with adbackends.using(CHAIN):
        transform = adbackends.jacrev(fresh)
    transform(x3)  # the one eager call before the threshold is reached
    barrier = threading.Barrier(4)
    results: List[Any] = []
    errors: List[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                results.append(transform(x3))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(made) == 1
    assert len(results) == 20
    for result in results:
        assert_same(result, expected)


def test_no_global_compiler_setting_changes(made: List[Any]) -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    before = (dynamo_config.get_config_copy(), inductor_config.get_config_copy())
    with adbackends.using(CHAIN):
        for _ in range(4):
            adbackends.grad(energy)(x3)
    assert len(made) == 1
    assert (dynamo_config.get_config_copy(), inductor_config.get_config_copy()) == before


def test_asyncio_tasks_keep_their_own_selection(made: List[Any]) -> None:
    import asyncio

    def other(x: torch.Tensor) -> torch.Tensor:
        return (torch.sin(W @ x) ** 2).sum()

    async def task(name: str, func: Callable[..., Any]) -> List[Any]:
        out = []
        with adbackends.using(name):
            for _ in range(4):
                out.append((adbackends.current().name, adbackends.hessian(func)(x3)))
                await asyncio.sleep(0)
        return out

    async def both() -> Any:
        return await asyncio.gather(task(CHAIN, energy), task("torch.func>loop", other))

    compiled_runs, eager_runs = asyncio.run(both())
    assert {name for name, _ in compiled_runs} == {CHAIN}
    assert {name for name, _ in eager_runs} == {"torch.func>loop"}
    for _, h in compiled_runs:
        assert_same(h, torch.func.hessian(energy)(x3))
    for _, h in eager_runs:
        assert_same(h, torch.func.hessian(other)(x3))
    assert len(made) == 1  # the compiled task's function only


def test_transforms_built_on_every_call_do_not_pile_up() -> None:
    with adbackends.using(CHAIN):
        for _ in range(3000):
            adbackends.jacrev(lambda x: x * 2.0)(x3)  # a new function each time
    assert len(compiled._transforms) < 3000  # pruned while it grew
    gc.collect()
    assert len(adbackends.compilations()) < 100


def test_selection_spellings() -> None:
    assert adbackends.get(CHAIN).name == CHAIN
    assert adbackends.use("torch.func", fallback="loop", compile=True).name == CHAIN  # type: ignore[union-attr]
    adbackends.use(None)
    with adbackends.using("torch.func", compile=True) as b:
        assert b.name == "torch.compile>torch.func"
    with pytest.raises(ValueError, match="head of a chain"):
        adbackends.use("torch.compile")
    with pytest.raises(ValueError, match="first link"):
        adbackends.get("torch.func>torch.compile")
    with pytest.raises(ValueError, match="has none to compile"):
        adbackends.get("torch.compile>loop")
    with pytest.raises(ValueError, match="not 'auto'"):
        adbackends.use("auto", compile=True)


def test_explain_says_what_is_compiled(made: List[Any]) -> None:
    with adbackends.using(CHAIN):
        transform = adbackends.jacrev(energy)
        for _ in range(4):
            transform(x3)
        reason = adbackends.explain().reason
    assert reason.startswith("chosen by") and "1 variant(s) compiled" in reason
    assert "torch.func>loop eagerly otherwise" in reason


def test_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAD_AD_BACKEND", f"{CHAIN},loop")
    assert adbackends.current().name == CHAIN


def test_no_compiler_means_eager_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, made: List[Any]
) -> None:
    monkeypatch.setattr(compiled.settings, "backend", "inductor")
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    compiled._reset_support()
    try:
        assert compiled.support()[0] is False and "C++ compiler" in compiled.support()[1]
        with adbackends.using(CHAIN):
            for _ in range(3):
                assert_same(adbackends.jacrev(energy)(x3), torch.func.jacrev(energy)(x3))
        assert made == []
        (row,) = [r for r in adbackends.compilations() if r.function == "jacrev(energy)"]
        assert row.state == "eager" and "C++ compiler" in row.reason
    finally:
        compiled._reset_support()


# -- real inductor compilations (a few seconds each) -------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("case", ["hessian", "vmap(hessian)"])
def test_inductor(case: str, monkeypatch: pytest.MonkeyPatch, made: List[Any]) -> None:
    monkeypatch.setattr(compiled.settings, "backend", "inductor")
    build, reference, args = CASES[case]
    expected = reference()(*args)
    with adbackends.using(CHAIN):
        results = [build(adbackends)(*args) for _ in range(4)]
    assert len(made) == 1
    for result in results:
        assert_same(result, expected)
    assert adbackends.fallbacks() == []
    assert "compiled" in [r.state for r in adbackends.compilations()]
