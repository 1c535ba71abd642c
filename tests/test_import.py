"""``import adbackends`` is cheap and never fails because of the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from adbackends import selection


def _run(code: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(selection.ENV_VAR, None)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_loads_no_torch_func_functorch_or_metadata():
    proc = _run(
        """
        import json, sys
        import adbackends
        heavy = sorted(m for m in sys.modules
                       if m == "torch" or m.startswith(("torch.", "functorch")))
        print(json.dumps(heavy))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# torch itself reads entry points when imported (device backends), so the
# counter goes in after torch and before adbackends.
COUNT_SCANS = """
import os, traceback
import torch
import importlib.metadata as md
SCANS = []
def _counting(original):
    def wrapper(*a, **k):
        # Count only scans made by adbackends: torch's own lazy imports
        # (triton, device backends) may read entry points too.
        caller = traceback.extract_stack(limit=2)[0].filename
        if os.sep + "adbackends" + os.sep in caller:
            SCANS.append(original.__name__)
        return original(*a, **k)
    return wrapper
md.entry_points = _counting(md.entry_points)
md.distributions = _counting(md.distributions)
"""


def test_import_and_builtin_selection_scan_no_entry_points():
    proc = _run(
        COUNT_SCANS
        + """
import adbackends
x = torch.ones(2)
adbackends.get("loop")
adbackends.use("loop")
with adbackends.using("torch.func" if hasattr(torch, "func") else "loop"):
    pass
adbackends.use(None)
adbackends.jacrev(torch.sin)(x)   # automatic choice: built-ins only
print(len(SCANS))
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


def test_unknown_name_needs_the_scan():
    proc = _run(
        COUNT_SCANS
        + """
import adbackends
try:
    adbackends.get("some-plugin")
except adbackends.UnknownBackendError:
    pass
print(len(SCANS) > 0)
"""
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_bad_env_value_does_not_break_import():
    for value in ("nope", "loop,nope", ",", "torch.func,,loop", "\u00e9"):
        proc = _run("import adbackends; print('imported')", TAD_AD_BACKEND=value)
        assert proc.returncode == 0, (value, proc.stderr)
        assert proc.stdout.strip() == "imported"


def test_import_runs_no_probe():
    proc = _run(
        """
        import adbackends.probes as probes
        calls = []
        original = probes._run_uncached
        probes._run_uncached = lambda *a: calls.append(a) or original(*a)
        import adbackends
        adbackends.get("loop")
        adbackends.use("loop")
        print(len(calls))
        """
    )
    assert proc.stdout.strip() == "0", proc.stderr
