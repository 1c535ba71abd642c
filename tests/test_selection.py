"""Selection precedence: using() > use() > TAD_AD_BACKEND > auto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import adbackends
from adbackends import selection
from adbackends.registry import REGISTRY

LOADABLE = [n for n in selection.AUTO_ORDER if REGISTRY.failure(n) is None]


def _auto_name() -> str:
    return selection._auto().backend.name


def _other_than(*names: str) -> str:
    for name in reversed(LOADABLE):
        if name not in names:
            return name
    pytest.skip("needs two loadable backends")


def run_python(code: str, env_value=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(selection.ENV_VAR, None)
    if env_value is not None:
        env[selection.ENV_VAR] = env_value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- in process -----------------------------------------------------------------


def _auto_rule() -> str:
    """The automatic choice, worked out from the probes as the rule says."""
    # 1. The first backend that passes custom_function alone; with native
    #    transforms it keeps the loop backend as per-call fallback.
    expected = next(n for n in LOADABLE if REGISTRY.get(n).supports("custom_function"))
    if expected != "loop":
        return f"{expected}>loop" if REGISTRY.get(expected).supports("transforms") else expected
    # 2. Where that is the loop: the first backend before it with native
    #    transforms whose chain with the loop passes custom_function.
    for name in LOADABLE[: LOADABLE.index("loop")]:
        if REGISTRY.get(name).supports("transforms"):
            if adbackends.get(f"{name}>loop").supports("custom_function"):
                return f"{name}>loop"
    return "loop"


def test_auto_is_the_first_backend_passing_custom_function():
    expected = _auto_rule()
    choice = adbackends.explain()
    assert choice.backend.name == expected
    assert choice.source == "auto"
    ruled_out = [name for name, _ in choice.rejected]
    first = expected.split(">")[0]
    assert ruled_out == [n for n in selection.AUTO_ORDER[: selection.AUTO_ORDER.index(first)]]


def test_auto_chains_a_native_backend_that_fails_alone(monkeypatch):
    """The second rule, wherever this runs: a native backend failing custom_function
    alone is chosen with the loop where the chain passes, and not where it fails."""
    from adbackends.backend import Backend

    if not any(n != "loop" and REGISTRY.get(n).supports("transforms") for n in LOADABLE):
        pytest.skip("no backend with native transforms loads here")
    natives = [n for n in LOADABLE if n != "loop"]
    native = natives[0]
    real = Backend.supports

    def supports(self, capability):
        # Every native backend fails custom_function alone (as on torch 1.12/1.13).
        if self.name in natives and capability == "custom_function":
            from adbackends.probes import Support

            return Support(capability, False, "refuses autograd.Function (pretended)")
        return real(self, capability)

    monkeypatch.setattr(Backend, "supports", supports)
    selection._reset()
    choice = selection._auto()
    assert choice.backend.name == f"{native}>loop"
    assert "passes custom_function" in choice.reason and "pretended" in choice.reason
    assert [n for n, _ in choice.rejected] == list(
        selection.AUTO_ORDER[: selection.AUTO_ORDER.index(native)]
    )

    # A chain that fails a required probe is not chosen: the loop is.
    from adbackends.fallback import ChainBackend

    def chain_supports(self, capability):
        if isinstance(self, ChainBackend) and capability == "custom_function":
            from adbackends.probes import Support

            return Support(capability, False, "pretended")
        return supports(self, capability)

    monkeypatch.setattr(Backend, "supports", chain_supports)
    selection._reset()
    assert selection._auto().backend.name == "loop"


def test_auto_keeps_the_loop_where_code_requires_what_natives_lack():
    """require("legacy_function") says ctx-style Functions are everywhere: no chain."""
    adbackends.require("legacy_function")
    natives_lack = all(
        not REGISTRY.get(n).supports("legacy_function") for n in LOADABLE if n != "loop"
    )
    choice = adbackends.explain()
    if natives_lack:
        assert choice.backend.name == "loop"
        assert [n for n, _ in choice.rejected] == [n for n in selection.AUTO_ORDER if n != "loop"]


def test_use_beats_env_and_auto(monkeypatch):
    env_choice = _other_than("loop")
    monkeypatch.setenv(selection.ENV_VAR, env_choice)
    assert adbackends.current().name == env_choice
    assert adbackends.use("loop").name == "loop"
    choice = adbackends.explain()
    assert (choice.backend.name, choice.source) == ("loop", "use")


def test_using_beats_use_and_env(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, "loop")
    other = _other_than("loop")
    adbackends.use("loop")
    with adbackends.using(other) as backend:
        assert backend.name == other
        assert adbackends.explain().source == "using"
        assert adbackends.current().name == other
    assert adbackends.current().name == "loop"
    assert adbackends.explain().source == "use"


def test_env_beats_auto(monkeypatch):
    target = _other_than(_auto_name())
    monkeypatch.setenv(selection.ENV_VAR, target)
    choice = adbackends.explain()
    assert (choice.backend.name, choice.source) == (target, "env")


def test_use_none_falls_back_to_env(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, "loop")
    adbackends.use(_other_than("loop"))
    assert adbackends.use(None) is None
    assert adbackends.current().name == "loop"


def test_use_auto_overrides_env(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, _other_than(_auto_name()))
    adbackends.use("auto")
    choice = adbackends.explain()
    assert choice.backend.name == _auto_name()
    assert choice.source == "use"


def test_using_auto_overrides_use():
    adbackends.use(_other_than(_auto_name()))
    with adbackends.using("auto") as backend:
        assert backend.name == _auto_name()
        assert adbackends.current().name == _auto_name()


def test_nested_using_restores_each_level():
    names = []
    with adbackends.using("loop"):
        names.append(adbackends.current().name)
        with adbackends.using(LOADABLE[0]):
            names.append(adbackends.current().name)
            with adbackends.using("loop"):
                names.append(adbackends.current().name)
            names.append(adbackends.current().name)
        names.append(adbackends.current().name)
    names.append(adbackends.explain().source)
    assert names == ["loop", LOADABLE[0], "loop", LOADABLE[0], "loop", "auto"]


def test_using_restores_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with adbackends.using("loop"):
            raise ZeroDivisionError
    assert adbackends.explain().source == "auto"


def test_leaving_using_never_touches_use():
    adbackends.use("loop")
    with adbackends.using(LOADABLE[0]):
        adbackends.use(LOADABLE[0])  # a process-wide change inside the block...
    # ...survives the block: using() restores only its own context.
    assert adbackends.explain().source == "use"
    assert adbackends.current().name == LOADABLE[0]


def test_transform_binds_backend_when_created():
    x = torch.tensor([0.5, 1.0])
    with adbackends.using("loop"):
        jac = adbackends.jacrev(torch.sin)
    assert jac.__module__ != "torch._functorch.eager_transforms" or LOADABLE[0] != "loop"
    assert torch.allclose(jac(x), torch.diag(x.cos()))


def test_fjacrev_uses_native_transforms_even_under_loop():
    native = [n for n in LOADABLE if REGISTRY.get(n).supports("transforms")]
    if not native:
        with adbackends.using("loop"), pytest.raises(adbackends.BackendUnavailableError) as info:
            adbackends.fjacrev(torch.sin)
        assert "torch" in str(info.value) and "functorch" in str(info.value)
        return
    calls = []

    def f(x):
        calls.append(None)
        return x.sin()

    with adbackends.using("loop"):
        assert adbackends.current().native().name == native[0]
        out = adbackends.fvmap(f)(torch.ones(4, 2))
    assert len(calls) == 1  # vectorised, not looped
    assert torch.allclose(out, torch.ones(4, 2).sin())


def test_fjacrev_is_the_active_backends_own_when_native():
    for name in LOADABLE:
        backend = REGISTRY.get(name)
        if backend.supports("transforms"):
            assert backend.native() is backend


# -- the environment variable -----------------------------------------------------


@pytest.mark.parametrize("value", ["", "   ", "\t", " , "])
def test_empty_env_counts_as_unset(monkeypatch, value):
    monkeypatch.setenv(selection.ENV_VAR, value)
    choice = adbackends.explain()
    assert choice.source == "auto"


def test_env_is_trimmed(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, "  loop  ")
    assert adbackends.current().name == "loop"


def test_env_preference_list_takes_first_qualified(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, ",".join(selection.AUTO_ORDER))
    choice = adbackends.explain()
    assert choice.source == "env"
    # A list names backends, strictly: no fallback unless written as a chain,
    # so the first that passes custom_function on its own.
    first = next(n for n in LOADABLE if REGISTRY.get(n).supports("custom_function"))
    assert choice.backend.name == first


def test_env_preference_list_skips_failing_candidates(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, "functorch,loop")
    functorch_ok = REGISTRY.failure("functorch") is None and REGISTRY.get("functorch").supports(
        "custom_function"
    )
    choice = adbackends.explain()
    assert choice.backend.name == ("functorch" if functorch_ok else "loop")
    if not functorch_ok:
        assert choice.rejected and choice.rejected[0][0] == "functorch"


def test_env_preference_list_with_auto(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, "auto")
    assert adbackends.explain().source == "env"
    assert adbackends.current().name == _auto_name()


def test_env_change_at_runtime_is_seen(monkeypatch):
    monkeypatch.setenv(selection.ENV_VAR, "loop")
    assert adbackends.current().name == "loop"
    monkeypatch.setenv(selection.ENV_VAR, LOADABLE[0])
    assert adbackends.current().name == LOADABLE[0]


# -- in a fresh interpreter, the environment variable set from outside ------------------


REPORT_CHOICE = """
import json, adbackends
choice = adbackends.explain()
print(json.dumps([choice.backend.name, choice.source]))
"""


@pytest.mark.parametrize("name", ["loop", "torch.func", "functorch"])
def test_env_selects_backend_in_subprocess(name):
    if REGISTRY.failure(name) is not None:
        pytest.skip(f"{name} does not load here")
    proc = run_python(REPORT_CHOICE, env_value=name)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [name, "env"]


def test_use_beats_env_in_subprocess():
    code = "import adbackends\nadbackends.use('loop')\n" + REPORT_CHOICE
    proc = run_python(code, env_value=LOADABLE[0])
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["loop", "use"]


def test_using_beats_env_in_subprocess():
    code = (
        "import json, adbackends\n"
        "with adbackends.using('loop'):\n"
        "    c = adbackends.explain()\n"
        "print(json.dumps([c.backend.name, c.source]))\n"
    )
    proc = run_python(code, env_value=LOADABLE[0])
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["loop", "using"]


def test_auto_in_subprocess_without_env():
    proc = run_python(REPORT_CHOICE)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [_auto_name(), "auto"]


def test_bad_env_does_not_break_import_but_first_call_raises():
    ok = run_python("import adbackends", env_value="nope")
    assert ok.returncode == 0, ok.stderr
    proc = run_python(
        """
        import torch, adbackends
        try:
            adbackends.jacrev(torch.sin)(torch.ones(2))
        except adbackends.UnknownBackendError as exc:
            print(exc)
        """,
        env_value="nope",
    )
    message = proc.stdout
    assert "'nope'" in message and "TAD_AD_BACKEND" in message
    for name in ("torch.func", "functorch", "loop"):
        assert repr(name) in message
