"""What auto picks and which capabilities pass, for the torch installed here.

The expectations are DESIGN.md's table, keyed by the torch version actually
installed and by whether functorch imports, so every environment of the
matrix (tox.ini) checks its own row; nothing here is skipped because a
version is old.

| environment                  | jacrev / vmap | fjacrev / fvmap          |
|------------------------------|---------------|--------------------------|
| torch >= 2.0                 | torch.func    | torch.func               |
| torch 1.13 (functorch ships) | loop          | functorch                |
| torch 1.12 + functorch 0.2   | loop          | functorch                |
| torch without any functorch  | loop          | error naming the install |
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from typing import Dict, Optional

import pytest
import torch

import adbackends
from adbackends import selection
from adbackends.plugin import PROBES
from adbackends.registry import REGISTRY

TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
HAS_FUNCTORCH = importlib.util.find_spec("functorch") is not None

#: What every backend must pass or fail, per kind of environment.
_NATIVE_NEW = {  # torch.func, and functorch on torch >= 2.0 (the same machinery)
    "custom_function": True,
    "legacy_function": False,  # ctx-style Functions raise under every transform
    "transforms": True,
    "higher_order": True,
    "chunk_size": True,
    "randomness": True,
    "forward_mode": True,
    "hessian": True,
}
_NATIVE_OLD = {  # functorch 0.2 and the copy in torch 1.13
    "custom_function": False,  # every autograd.Function is refused
    "legacy_function": False,
    "transforms": True,
    "higher_order": True,
    "chunk_size": True,  # native on 1.13, emulated on 0.2
    "randomness": True,
    # jvp/jacfwd of plain functions work, but the probe's Function with a jvp
    # rule (ctx style: the only style before torch 2.0) is refused, as every
    # Function is (see custom_function).
    "forward_mode": False,
    "hessian": True,
}
_LOOP = {
    "custom_function": True,
    "legacy_function": True,
    "transforms": False,  # it loops: that is the point
    "higher_order": True,
    "chunk_size": True,
    "randomness": True,
    "forward_mode": True,  # two reverse passes, through the Function's backward
    "hessian": True,
}


def expected_loads() -> Dict[str, bool]:
    return {
        "torch.func": TORCH >= (2, 0),
        "functorch": HAS_FUNCTORCH,
        "loop": True,
    }


def expected_auto(has_functorch: bool = HAS_FUNCTORCH) -> str:
    # On torch >= 2, auto is torch.func with the loop backend as per-call fallback;
    # before, functorch fails custom_function alone but functorch>loop passes it.
    if TORCH >= (2, 0):
        return "torch.func>loop"
    return "functorch>loop" if has_functorch else "loop"


def expected_native(has_functorch: bool = HAS_FUNCTORCH) -> Optional[str]:
    if TORCH >= (2, 0):
        return "torch.func"
    return "functorch" if has_functorch else None


def expected_capabilities(name: str) -> Dict[str, bool]:
    if name == "loop":
        return _LOOP
    return _NATIVE_NEW if TORCH >= (2, 0) else _NATIVE_OLD


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(selection.ENV_VAR, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# -- the environment itself ----------------------------------------------------


def test_functorch_ships_with_torch_from_1_13():
    if TORCH >= (1, 13):
        assert HAS_FUNCTORCH, "torch >= 1.13 bundles functorch"


def test_torch_func_exists_exactly_from_2_0():
    assert (importlib.util.find_spec("torch.func") is not None) == (TORCH >= (2, 0))


@pytest.mark.parametrize("name", selection.AUTO_ORDER)
def test_which_backends_load(name):
    failure = REGISTRY.failure(name)
    assert (failure is None) == expected_loads()[name], failure
    if failure is not None:
        assert failure.hint, "an unavailable backend says what to install"


def test_available_lists_what_loads_in_auto_order():
    loads = expected_loads()
    assert adbackends.available()[: sum(loads.values())] == [
        n for n in selection.AUTO_ORDER if loads[n]
    ]


# -- what auto picks ------------------------------------------------------------


def test_auto_picks_the_design_table_choice():
    choice = adbackends.explain()
    assert choice.source == "auto"
    assert choice.backend.name == expected_auto()
    ruled_out = [name for name, _ in choice.rejected]
    first = expected_auto().split(">")[0]
    assert ruled_out == list(selection.AUTO_ORDER[: selection.AUTO_ORDER.index(first)])


def test_jacrev_and_vmap_resolve_to_auto_choice():
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert adbackends.current().name == expected_auto()
    assert torch.allclose(adbackends.jacrev(torch.sin)(x), torch.diag(x.cos()))
    assert torch.allclose(adbackends.vmap(torch.sin)(x[:, None]), x[:, None].sin())


def test_fjacrev_and_fvmap_resolve_to_the_native_backend():
    native = expected_native()
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    if native is None:
        with pytest.raises(adbackends.BackendUnavailableError, match="functorch"):
            adbackends.fjacrev(torch.sin)
        return
    assert adbackends.current().native().name == native
    for name in [n for n in selection.AUTO_ORDER if expected_loads()[n]]:
        with adbackends.using(name):
            assert adbackends.current().native().name == (name if name != "loop" else native)
            assert torch.allclose(adbackends.fjacrev(torch.sin)(x), torch.diag(x.cos()))
            assert torch.allclose(adbackends.fvmap(torch.sin)(x[:, None]), x[:, None].sin())


# -- which capabilities pass ------------------------------------------------------


@pytest.mark.parametrize("name", selection.AUTO_ORDER)
def test_capabilities(name):
    if not expected_loads()[name]:
        assert REGISTRY.failure(name) is not None
        return
    backend = REGISTRY.get(name)
    got = {cap: support.ok for cap, support in backend.capabilities().items()}
    reasons = {cap: s.reason for cap, s in backend.capabilities().items() if not s.ok}
    assert got == expected_capabilities(name), reasons


def test_report_agrees():
    """``python -m adbackends --json``, what the matrix script records, says the same."""
    result = subprocess.run(
        [sys.executable, "-m", "adbackends", "--json"],
        env={k: v for k, v in os.environ.items() if k != selection.ENV_VAR},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["torch"] == str(torch.__version__)
    assert data["active"]["name"] == expected_auto()
    assert data["native"]["name"] == expected_native()
    for item in data["backends"]:
        if item["name"] not in selection.AUTO_ORDER:
            continue
        assert (item["status"] == "ok") == expected_loads()[item["name"]]
        if item["status"] == "ok":
            got = {cap: res["ok"] for cap, res in item["capabilities"].items()}
            assert got == expected_capabilities(item["name"])


# -- torch without any functorch ---------------------------------------------------


def test_without_functorch():
    """Hide functorch (as on torch 1.12 without the package) and ask again."""
    result = _run(
        """
        import json, sys
        sys.modules["functorch"] = None  # import functorch now fails
        import torch, adbackends
        out = {"functorch": adbackends.registry.REGISTRY.failure("functorch") is None,
               "auto": adbackends.current().name}
        try:
            adbackends.fjacrev(torch.sin)
            out["native"] = adbackends.current().native().name
        except adbackends.BackendUnavailableError as exc:
            out["native"] = None
            out["error"] = str(exc)
        print(json.dumps(out))
        """
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["functorch"] is False
    assert out["auto"] == expected_auto(has_functorch=False)
    assert out["native"] == expected_native(has_functorch=False)
    if out["native"] is None:
        message = out["error"]
        assert "functorch" in message and "torch >= 2.0" in message
        assert "pip install functorch==0.2.1" in message


# -- the matrix script ---------------------------------------------------------------


def _matrix_script():
    import importlib.util as util
    from pathlib import Path

    path = Path(__file__).parent / "compat" / "run_matrix.py"
    spec = util.spec_from_file_location("run_matrix", path)
    assert spec is not None and spec.loader is not None
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matrix_script_condenses_and_renders_this_environment(tmp_path):
    matrix = _matrix_script()
    report = subprocess.run(
        [sys.executable, "-m", "adbackends", "--json"],
        env={k: v for k, v in os.environ.items() if k != selection.ENV_VAR},
        capture_output=True,
        text=True,
        timeout=600,
    )
    xml = tmp_path / "suite.xml"
    xml.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_x" name="test_ok"/>'
        '<testcase classname="tests.test_x" name="test_bad"><failure message="no"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert list(matrix.CAPABILITIES) == list(PROBES), "the table shows every probe"
    result = matrix.condense("here", report.stdout, str(xml), 1)
    assert result["auto"] == expected_auto()
    assert result["native"] == expected_native()
    assert result["suite"] == {"tests": 5, "passed": 2, "failed": 1, "errors": 0, "skipped": 2}
    assert result["failed_tests"] == ["tests.test_x::test_bad"]
    for name in selection.AUTO_ORDER:
        assert result["backends"][name]["loads"] == expected_loads()[name]
        if expected_loads()[name]:
            assert result["backends"][name]["capabilities"] == expected_capabilities(name)

    text = matrix.render([result])
    short = str(torch.__version__).split("+")[0]
    assert f"     - {short}\n     - " in text
    assert "2 passed, 1 failed, 2 skipped" in text
    row = text.split("   * - ``here``\n     - loop\n", 1)[1].split("\n   * -", 1)[0]
    marks = [line.strip()[2:] for line in row.splitlines() if line.strip().startswith("- ")]
    assert marks == [matrix.YES if _LOOP[c] else matrix.NO for c in matrix.CAPABILITIES]
