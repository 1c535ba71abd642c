"""chunk_size="auto", the memory limit, and out of memory handled per call."""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import pytest
import torch
from torch.utils._pytree import tree_flatten

import adbackends
from adbackends import _memory
from adbackends.backends._native_refusals import classify

from . import reference as tf  # torch.func, or functorch before torch 2.0

#: The native backend that loads here: torch.func, or functorch before torch 2.0.
NATIVE = "torch.func" if tf.NAME == "torch.func" else "functorch"
BACKENDS = list(dict.fromkeys([NATIVE, "functorch", "loop", f"{NATIVE}>loop"]))
#: Why this torch cannot measure peak memory on CPU (torch 1.12, 1.13); None where it can.
NO_CPU_METER = _memory.cpu_meter_problem()
needs_cpu_meter = pytest.mark.skipif(
    NO_CPU_METER is not None, reason=f"no CPU memory meter here: {NO_CPU_METER}"
)
CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes."


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(_memory.ENV_VAR, raising=False)
    adbackends.forget_chunks()
    adbackends.forget_fallbacks()
    adbackends.set_max_memory(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # functorch's deprecation
        yield
    adbackends.set_max_memory(None)
    adbackends.forget_chunks()
    adbackends.forget_fallbacks()
    _memory._auto_backends.clear()


def same(got: Any, want: Any) -> None:
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    assert got_spec == want_spec
    for a, b in zip(got_leaves, want_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)


W = torch.randn(96, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 5


def vector(x: Any, y: Any) -> Any:
    return {"a": torch.tanh(W @ torch.tanh(x * y)).cumsum(0), "b": (x**3).sum()}


def scalar(x: Any) -> Any:
    return (torch.tanh(W @ x) ** 2).sum() + (x**4).sum()


X = torch.randn(24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
Y = torch.randn(24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
B = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


# -- sizes and the limit --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GiB", 2 * 2**30),
        ("2 gib", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("512M", 512 * 2**20),
        ("100", 100),
        (4096, 4096),
        ("1e3 kb", 10**6),
        ("none", None),
        ("unlimited", None),
        (None, None),
    ],
)
def test_parse_size(text: Any, size: Any) -> None:
    assert _memory.parse_size(text) == size


@pytest.mark.parametrize("bad", ["2 parsecs", "GiB", "-1GiB", "0", "1,5GB", ""])
def test_bad_sizes_say_what_is_right(bad: str) -> None:
    with pytest.raises(ValueError, match=r"memory size|at least one byte") as info:
        _memory.parse_size(bad)
    assert "'2GiB'" in str(info.value)


@pytest.mark.parametrize("bad", [True, [1], 2.5j])
def test_bad_types(bad: Any) -> None:
    with pytest.raises(TypeError, match="number of bytes"):
        _memory.parse_size(bad)


def test_limit_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert adbackends.max_memory() is None
    monkeypatch.setenv(_memory.ENV_VAR, "3MiB")
    assert adbackends.max_memory() == 3 * 2**20
    adbackends.set_max_memory("2MiB")
    assert adbackends.max_memory() == 2 * 2**20
    with adbackends.memory_limit("1MiB"):
        assert adbackends.max_memory() == 2**20
        with adbackends.memory_limit(None):
            assert adbackends.max_memory() is None
        assert adbackends.max_memory() == 2**20
    adbackends.set_max_memory("none")  # explicitly none, over the environment
    assert adbackends.max_memory() is None
    adbackends.set_max_memory(None)
    assert adbackends.max_memory() == 3 * 2**20


def test_bad_environment_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_memory.ENV_VAR, "lots")
    with adbackends.using(NATIVE):
        with pytest.raises(ValueError, match="TAD_AD_MAX_MEMORY='lots' is not a memory size"):
            adbackends.jacrev(torch.sin, chunk_size="auto")(X)


# -- results equal the unchunked ones -----------------------------------------------------


def cases() -> Any:
    return {
        "jacrev": (
            lambda: adbackends.jacrev(vector, argnums=(0, 1), chunk_size="auto")(X, Y),
            lambda: tf.jacrev(vector, argnums=(0, 1))(X, Y),
        ),
        "jacrev_aux": (
            lambda: adbackends.jacrev(lambda x: (torch.sin(x), x.sum()), has_aux=True)(X),
            lambda: tf.jacrev(lambda x: (torch.sin(x), x.sum()), has_aux=True)(X),
        ),
        "jacfwd": (
            lambda: adbackends.jacfwd(vector, argnums=(0, 1))(X, Y),
            lambda: tf.jacfwd(vector, argnums=(0, 1))(X, Y),
        ),
        "jacfwd_aux": (
            lambda: adbackends.jacfwd(lambda x: (torch.sin(x), x.sum()), has_aux=True)(X),
            lambda: tf.jacfwd(lambda x: (torch.sin(x), x.sum()), has_aux=True)(X),
        ),
        "hessian": (lambda: adbackends.hessian(scalar)(X), lambda: tf.hessian(scalar)(X)),
        "vmap": (
            lambda: adbackends.vmap(vector, in_dims=(0, None), chunk_size="auto")(B, Y),
            lambda: tf.vmap(vector, in_dims=(0, None))(B, Y),
        ),
        "vmap_jacrev": (
            lambda: adbackends.vmap(
                adbackends.jacrev(scalar, chunk_size="auto"), chunk_size="auto"
            )(B),
            lambda: tf.vmap(tf.jacrev(scalar))(B),
        ),
        "vmap_hessian": (
            lambda: adbackends.vmap(adbackends.hessian(scalar), chunk_size="auto")(B),
            lambda: tf.vmap(tf.hessian(scalar))(B),
        ),
        "jacrev_jacrev": (
            lambda: adbackends.jacrev(
                adbackends.jacrev(scalar, chunk_size="auto"), chunk_size="auto"
            )(X),
            lambda: tf.jacrev(tf.jacrev(scalar))(X),
        ),
    }


@pytest.mark.parametrize("limit", [None, "40KiB", "1GiB"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(cases()))
def test_auto_equals_unchunked(case: str, backend: str, limit: Any) -> None:
    got_fn, want_fn = cases()[case]
    if limit is not None and backend != "loop" and NO_CPU_METER is not None:
        # No meter to choose a chunk by: the clear error, never an unmeasured run.
        with adbackends.using(backend), adbackends.memory_limit(limit):
            with pytest.raises(adbackends.CapabilityError, match="cpu_memory_meter"):
                got_fn()
        assert adbackends.fallbacks() == []
        return
    with adbackends.using(backend), adbackends.memory_limit(limit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", adbackends.MemoryWarning)
            got = got_fn()
            again = got_fn()  # with the chunk remembered
    want = want_fn()
    same(got, want)
    same(again, want)


@needs_cpu_meter
def test_a_limit_chunks_natively_and_is_remembered() -> None:
    with adbackends.using(NATIVE), adbackends.memory_limit("40KiB"):
        adbackends.jacrev(vector, chunk_size="auto")(X, Y)
    (choice,) = adbackends.chunk_choices()
    assert choice.transform == "jacrev" and choice.function == "vector"
    assert choice.units == 97 and 1 <= choice.chunk < 97
    assert choice.limit == 40 * 2**10 and choice.reason == "limit"


def test_without_a_limit_auto_is_the_unchunked_transform() -> None:
    with adbackends.using(NATIVE):
        got = adbackends.jacrev(vector, chunk_size="auto")(X, Y)
    same(got, tf.jacrev(vector)(X, Y))
    assert adbackends.chunk_choices() == []


def test_an_int_chunk_size_is_still_the_backends() -> None:
    with adbackends.using(NATIVE), adbackends.memory_limit("1KiB"):
        got = adbackends.jacrev(vector, chunk_size=7)(X, Y)
    same(got, tf.jacrev(vector)(X, Y))  # chunks change no value
    assert adbackends.chunk_choices() == []


@needs_cpu_meter
def test_requires_grad_and_graph_as_unchunked() -> None:
    x = X.clone().requires_grad_(True)
    with adbackends.using(NATIVE), adbackends.memory_limit("40KiB"):
        got = adbackends.jacrev(torch.sin, chunk_size="auto")(x)
    want = tf.jacrev(torch.sin)(x)
    assert got.requires_grad == want.requires_grad
    (g,) = torch.autograd.grad(got.sum(), x)
    (w,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g, w)


# -- peak memory stays under the limit ---------------------------------------------------------


def mlp(hidden: int, n: int) -> Any:
    gen = torch.Generator().manual_seed(4)
    w1 = torch.randn(hidden, n, generator=gen) / n**0.5
    w2 = torch.randn(n, hidden, generator=gen) / hidden**0.5

    def f(x: Any) -> Any:
        return w2 @ torch.tanh(w1 @ torch.tanh(x))

    return f


def peak(fn: Any) -> int:
    with _memory.measure() as meter:
        fn()
    return meter.peak()


@needs_cpu_meter
@pytest.mark.parametrize(
    "case",
    ["jacobian", "hessian", "vmap_jacrev"],
)
def test_peak_stays_under_a_quarter_of_unchunked(case: str) -> None:
    f = mlp(512, 128)
    x = torch.randn(128, generator=torch.Generator().manual_seed(5))
    batch = torch.randn(8, 128, generator=torch.Generator().manual_seed(6))
    if case == "jacobian":
        plain = lambda: adbackends.jacrev(f)(x)  # noqa: E731
        auto = lambda: adbackends.jacrev(f, chunk_size="auto")(x)  # noqa: E731
    elif case == "hessian":
        g = lambda t: f(t).square().sum()  # noqa: E731
        plain = lambda: adbackends.hessian(g)(x)  # noqa: E731
        auto = lambda: adbackends.hessian(g)(x)  # noqa: E731
    else:
        plain = lambda: adbackends.vmap(adbackends.jacrev(f))(batch)  # noqa: E731
        auto = lambda: adbackends.vmap(adbackends.jacrev(f), chunk_size="auto")(batch)  # noqa: E731
    with adbackends.using(NATIVE):
        unchunked = peak(plain)
        limit = unchunked // 4
        with adbackends.memory_limit(limit):
            first, second = peak(auto), peak(auto)
            same(auto(), plain())
    assert first <= limit and second <= limit, (unchunked, limit, first, second)
    (choice,) = adbackends.chunk_choices()
    assert choice.peak is not None and choice.peak <= limit


@needs_cpu_meter
def test_meter_counts_what_is_allocated() -> None:
    with _memory.measure() as meter:
        a = torch.ones(1000, dtype=torch.float64)
        b = a * 2
        assert meter.now() == 16000
        del a, b
    assert meter.peak() == 16000 and meter.now() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["jacobian", "hessian", "vmap_jacrev"])
def test_cuda_peak_stays_under_the_limit(case: str) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w1 = torch.randn(2048, 512, device=dev, generator=gen) / 20
    f = lambda x: w1.t() @ torch.tanh(w1 @ torch.tanh(x))  # noqa: E731
    x = torch.randn(512, device=dev, generator=gen)
    batch = torch.randn(16, 512, device=dev, generator=gen)
    if case == "jacobian":
        run = lambda: adbackends.jacrev(f, chunk_size="auto")(x)  # noqa: E731
    elif case == "hessian":
        run = lambda: adbackends.hessian(lambda t: f(t).square().sum())(x)  # noqa: E731
    else:
        run = lambda: adbackends.vmap(adbackends.jacrev(f), chunk_size="auto")(batch)  # noqa: E731

    def cuda_peak() -> int:
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - start

    with adbackends.using(NATIVE):
        unchunked = cuda_peak()
        with adbackends.memory_limit(unchunked // 4):
            measured = [cuda_peak(), cuda_peak()]
    assert max(measured) <= unchunked // 4, (unchunked, measured)


# -- out of memory -------------------------------------------------------------------------


def inject_oom(monkeypatch: pytest.MonkeyPatch, most: int, kind: Any = RuntimeError) -> Any:
    """The native jacrev always runs out of memory; its vmap beyond ``most`` samples."""
    native = adbackends.get(NATIVE)
    real_vmap = native.vmap
    calls = {"whole": 0, "chunks": []}

    def jacrev(func: Any, *args: Any, **kwargs: Any) -> Any:
        def run(*inner: Any) -> Any:
            calls["whole"] += 1
            raise kind(CPU_OOM)

        return run

    def vmap(func: Any, *args: Any, **kwargs: Any) -> Any:
        mapped = real_vmap(func, *args, **kwargs)

        def run(*inner: Any) -> Any:
            size = tree_flatten(inner)[0][0].shape[0]
            calls["chunks"].append(size)
            if size > most:
                raise kind(CPU_OOM)
            return mapped(*inner)

        return run

    monkeypatch.setattr(native, "jacrev", jacrev)
    monkeypatch.setattr(native, "vmap", vmap)
    return calls


def energy(x: Any) -> Any:
    return torch.sin(x).cumsum(0) * x.sum()


@pytest.mark.parametrize("backend", [NATIVE, f"{NATIVE}>loop"])
def test_injected_oom_is_retried_in_smaller_chunks(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = inject_oom(monkeypatch, most=5)
    with adbackends.using(backend):
        with pytest.warns(adbackends.MemoryWarning, match="ran out of memory in jacrev") as rec:
            got = adbackends.jacrev(energy, chunk_size="auto")(X)
        same(got, tf.jacrev(energy)(X))
        assert len([w for w in rec if issubclass(w.category, adbackends.MemoryWarning)]) == 1
        assert "set_max_memory" in str(rec[0].message)
        assert calls["whole"] == 1 and max(calls["chunks"]) > 5
        (choice,) = adbackends.chunk_choices()
        assert choice.reason == "out_of_memory" and choice.chunk <= 5
        calls["chunks"].clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            again = adbackends.jacrev(energy, chunk_size="auto")(X)
        same(again, got)
        assert calls["whole"] == 1, "the remembered chunk is used directly"
        assert calls["chunks"] and max(calls["chunks"]) <= 5
    assert adbackends.fallbacks() == []


def test_oom_at_one_row_goes_to_the_loop_under_a_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    inject_oom(monkeypatch, most=0, kind=getattr(torch, "OutOfMemoryError", RuntimeError))
    with adbackends.using(f"{NATIVE}>loop"):
        with pytest.warns(adbackends.FallbackWarning, match="out of memory|can't allocate"):
            got = adbackends.jacrev(energy, chunk_size="auto")(X)
    same(got, tf.jacrev(energy)(X))
    (record,) = adbackends.fallbacks()
    assert record.kind == "out_of_memory" and "chunk_size='auto'" in record.fix


def test_oom_on_a_strict_backend_still_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    inject_oom(monkeypatch, most=0)
    with adbackends.using(NATIVE), pytest.raises(RuntimeError, match="can't allocate"):
        adbackends.jacrev(energy, chunk_size="auto")(X)
    with adbackends.using(NATIVE), pytest.raises(RuntimeError, match="can't allocate"):
        adbackends.jacrev(energy)(X)


def test_plain_oom_under_a_chain_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    inject_oom(monkeypatch, most=0)
    with adbackends.using(f"{NATIVE}>loop"):
        with pytest.warns(adbackends.FallbackWarning):
            got = adbackends.jacrev(energy)(X)
    same(got, tf.jacrev(energy)(X))


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(x: Any) -> Any:
        raise ValueError("the function's own error")

    limit = "1MiB" if NO_CPU_METER is None else None  # no limit on CPU without a meter
    with adbackends.using(f"{NATIVE}>loop"), adbackends.memory_limit(limit):
        with pytest.raises(ValueError, match="own error"):
            adbackends.jacrev(broken, chunk_size="auto")(X)
    assert adbackends.chunk_choices() == [] and adbackends.fallbacks() == []


def test_classify_out_of_memory() -> None:
    refusal = classify(RuntimeError(CPU_OOM))
    assert refusal is not None and refusal.kind == "out_of_memory"
    cuda = classify(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB."))
    assert cuda is not None and cuda.kind == "out_of_memory"
    assert classify(RuntimeError("size mismatch")) is None


# -- visible -------------------------------------------------------------------------------


@needs_cpu_meter
def test_report_shows_limit_and_chunks() -> None:
    from adbackends.cli import _format, report

    adbackends.set_max_memory("40KiB")
    with adbackends.using(NATIVE):
        adbackends.jacrev(vector)(X, Y)  # a limit makes chunk_size=None automatic
    data = report()
    assert data["memory"]["max_memory"] == 40 * 2**10
    assert data["memory"]["source"] == "set_max_memory()"
    text = _format(data)
    assert "Memory limit: 40 KiB (source: set_max_memory())" in text
    assert f"jacrev(vector) on {NATIVE}" in text and "chunk_size=" in text


def test_use_and_using_set_the_limit() -> None:
    try:
        adbackends.use("loop", max_memory="2MiB")
        assert adbackends.max_memory() == 2 * 2**20
        with adbackends.using(NATIVE, max_memory="1MiB") as backend:
            assert backend.name == NATIVE and adbackends.max_memory() == 2**20
        assert adbackends.max_memory() == 2 * 2**20
        adbackends.use("loop")  # left out: unchanged
        assert adbackends.max_memory() == 2 * 2**20
        with pytest.raises(ValueError, match="not a memory size"):
            adbackends.use(NATIVE, max_memory="a lot")
        assert adbackends.current().name == "loop", "a bad limit changes nothing"
        with pytest.raises(ValueError, match="not a memory size"):
            with adbackends.using(NATIVE, max_memory="a lot"):
                pass
    finally:
        adbackends.use(None, max_memory=None)
    assert adbackends.max_memory() is None


@needs_cpu_meter
def test_explain_shows_limit_and_chunks() -> None:
    with adbackends.using(NATIVE, max_memory="40KiB"):
        adbackends.jacrev(vector, chunk_size="auto")(X, Y)
        choice = adbackends.explain()
        assert choice.max_memory == 40 * 2**10
        (chunk,) = choice.chunks
        assert chunk.function == "vector" and chunk.backend == NATIVE
    assert adbackends.explain().max_memory is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_objects_take_auto(backend: str) -> None:
    chosen = adbackends.get(backend)
    if backend != "loop" and NO_CPU_METER is not None:
        with adbackends.memory_limit("40KiB"):
            with pytest.raises(adbackends.CapabilityError, match="cpu_memory_meter"):
                chosen.jacrev(vector, argnums=(0, 1), chunk_size="auto")(X, Y)
            with pytest.raises(adbackends.CapabilityError, match="cpu_memory_meter"):
                chosen.vmap(vector, in_dims=(0, None), chunk_size="auto")(B, Y)
        return
    with adbackends.memory_limit("40KiB"), warnings.catch_warnings():
        warnings.simplefilter("ignore", adbackends.MemoryWarning)
        jac = chosen.jacrev(vector, argnums=(0, 1), chunk_size="auto")(X, Y)
        mapped = chosen.vmap(vector, in_dims=(0, None), chunk_size="auto")(B, Y)
    same(jac, tf.jacrev(vector, argnums=(0, 1))(X, Y))
    same(mapped, tf.vmap(vector, in_dims=(0, None))(B, Y))
    if backend != "loop":  # the loop computes row by row, unchunked
        assert {c.transform for c in adbackends.chunk_choices()} == {"jacrev", "vmap"}


@needs_cpu_meter
def test_meter_counts_tensors_the_graph_keeps() -> None:
    x = torch.ones(1000, dtype=torch.float64, requires_grad=True)
    with _memory.measure() as meter:
        out = x.exp().sum()  # exp's result is saved for backward: alive, though unnamed
        held = meter.now()
        del out  # the graph, and the saved tensor with it, goes
        assert meter.now() < held
    assert held >= 8000 and meter.peak() >= 8000


@needs_cpu_meter
def test_environment_limit_makes_none_automatic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_memory.ENV_VAR, "40KiB")
    with adbackends.using(NATIVE):
        got = adbackends.hessian(scalar)(X)
    same(got, tf.hessian(scalar)(X))
    (choice,) = adbackends.chunk_choices()
    assert choice.transform == "hessian" and choice.limit == 40 * 2**10
    assert "source: TAD_AD_MAX_MEMORY" in "\n".join(_memory.format_report(_memory.report()))


# -- torches without a CPU meter (1.12, 1.13) -------------------------------------------------


def test_cpu_meter_check_agrees_with_this_torch() -> None:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version >= (2, 1):
        assert NO_CPU_METER is None
    if not hasattr(torch.Tensor, "untyped_storage"):
        assert NO_CPU_METER is not None and "untyped_storage" in NO_CPU_METER
    assert _memory.cpu_meter_problem() is NO_CPU_METER  # checked once


@needs_cpu_meter
def test_cpu_meter_check_inside_another_mode_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):  # type: ignore[misc]
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(_memory, "_cpu_problem", _memory._UNSET)
    with Passing():
        assert _memory.cpu_meter_problem() is None
    assert _memory._cpu_problem is _memory._UNSET, "checked fully outside the mode"
    assert _memory.cpu_meter_problem() is None and _memory._cpu_problem is None


def test_without_a_cpu_meter_a_limit_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real reason on torch 1.12 and 1.13; the same path, simulated, elsewhere.
    problem = NO_CPU_METER or "this torch cannot count storages (simulated)"
    monkeypatch.setattr(_memory, "_cpu_problem", problem)
    calls = [
        ("jacrev(vector)", lambda: adbackends.jacrev(vector, chunk_size="auto")(X, Y)),
        ("hessian(scalar)", lambda: adbackends.hessian(scalar)(X)),
        ("vmap(vector)", lambda: adbackends.vmap(vector, (0, None), chunk_size="auto")(B, Y)),
    ]
    for backend in [NATIVE, f"{NATIVE}>loop"]:
        for what, call in calls:
            with adbackends.using(backend), adbackends.memory_limit("40KiB"):
                with pytest.raises(adbackends.CapabilityError) as info:
                    call()
            text = str(info.value)
            assert problem in text and what in text and "max_memory=40 KiB" in text, text
            for works in ("no limit", "int chunk_size", "CUDA", "'loop'", "torch >= 2.1"):
                assert works in text, (works, text)
            assert info.value.capability == "cpu_memory_meter"
            assert isinstance(info.value, RuntimeError)
            assert not _memory.is_out_of_memory(info.value)  # not retried as one
    assert adbackends.chunk_choices() == [] and adbackends.fallbacks() == []
    with pytest.raises(adbackends.CapabilityError, match="cpu_memory_meter"):
        with _memory.measure():
            pass
    # What the error says works does.
    want = tf.jacrev(vector)(X, Y)
    with adbackends.using(NATIVE):
        same(adbackends.jacrev(vector, chunk_size="auto")(X, Y), want)
    with adbackends.using(NATIVE), adbackends.memory_limit("40KiB"):
        same(adbackends.jacrev(vector, chunk_size=7)(X, Y), want)
    with adbackends.using("loop"), adbackends.memory_limit("40KiB"):
        same(adbackends.jacrev(vector, chunk_size="auto")(X, Y), want)
    assert adbackends.chunk_choices() == []


class OomOnce:
    """``func``, whose first call fails as the CPU allocator does."""

    def __init__(self, func: Any) -> None:
        self.func = func
        self.__name__ = self.__qualname__ = func.__name__
        self.failed = 0

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            self.failed += 1
            raise RuntimeError(CPU_OOM)
        return self.func(*args)


def oom_cases() -> Any:
    auto = _memory.auto_backend(adbackends.get(NATIVE))  # jacfwd, hessian: automatic here
    return {
        "jacrev": (
            lambda f: adbackends.jacrev(f, argnums=(0, 1), chunk_size="auto")(X, Y),
            vector,
            lambda: tf.jacrev(vector, argnums=(0, 1))(X, Y),
        ),
        "jacfwd": (
            lambda f: auto.jacfwd(f, argnums=(0, 1))(X, Y),
            vector,
            lambda: tf.jacfwd(vector, argnums=(0, 1))(X, Y),
        ),
        "hessian": (lambda f: auto.hessian(f)(X), scalar, lambda: tf.hessian(scalar)(X)),
        "vmap": (
            lambda f: adbackends.vmap(f, in_dims=(0, None), chunk_size="auto")(B, Y),
            vector,
            lambda: tf.vmap(vector, in_dims=(0, None))(B, Y),
        ),
        "vmap_jacrev": (
            lambda f: adbackends.vmap(adbackends.jacrev(f, chunk_size="auto"), chunk_size="auto")(
                B
            ),
            scalar,
            lambda: tf.vmap(tf.jacrev(scalar))(B),
        ),
    }


@pytest.mark.parametrize("case", list(oom_cases()))
def test_chunk_loop_after_oom_equals_unchunked(case: str) -> None:
    # No limit and no meter needed: on torch 1.12/1.13 this is the chunk loop on functorch.
    run, func, want_fn = oom_cases()[case]
    failing = OomOnce(func)
    with adbackends.using(NATIVE):
        with pytest.warns(adbackends.MemoryWarning, match="ran out of memory") as rec:
            got = run(failing)
        with warnings.catch_warnings():
            warnings.simplefilter("error", adbackends.MemoryWarning)
            again = run(failing)  # the remembered chunk, no second warning
    assert failing.failed == 1
    assert len([w for w in rec if issubclass(w.category, adbackends.MemoryWarning)]) == 1
    (choice,) = adbackends.chunk_choices()
    assert choice.reason == "out_of_memory" and 1 <= choice.chunk < choice.units
    want = want_fn()
    same(got, want)
    same(again, want)


def test_every_kind_of_link_is_rebuilt_around_automatic_backends() -> None:
    """A chain and the compiled tier alike: both sides made automatic, the result unchanged."""
    from adbackends import compiled
    from adbackends.fallback import ChainBackend

    loop = adbackends.get("loop")
    native = adbackends.get(NATIVE)
    for link in (ChainBackend(native, loop), compiled.CompiledBackend(native, loop)):
        made = _memory.auto_backend(link)
        assert type(made) is type(link) and made is not link
        assert made.native_backend is not native and made.fallback_backend is not loop
        with adbackends.memory_limit(None):  # no limit: "auto" runs the unchunked transform
            same(
                made.jacrev(vector, argnums=(0, 1), chunk_size="auto")(X, Y),
                tf.jacrev(vector, argnums=(0, 1))(X, Y),
            )
