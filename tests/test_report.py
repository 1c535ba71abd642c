"""The report: ``python -m adbackends`` and ``--json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import adbackends
from adbackends import cli, selection
from adbackends.plugin import PROBES
from adbackends.registry import REGISTRY

from .conftest import env_without_backend


def _cli(*args: str, env_value=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(selection.ENV_VAR, None)
    if env_value is not None:
        env[selection.ENV_VAR] = env_value
    return subprocess.run(
        [sys.executable, "-m", "adbackends", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_json_report_structure(capsys):
    assert cli.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [b["name"] for b in data["backends"]]
    assert names[:3] == list(selection.AUTO_ORDER)
    assert data["active"]["name"] == adbackends.current().name
    assert data["active"]["source"] == "auto"
    assert data["required"] == ["custom_function"]
    assert set(data["capabilities"]) == set(PROBES)
    for item in data["backends"]:
        failure = REGISTRY.failure(item["name"])
        if failure is None:
            backend = REGISTRY.get(item["name"])
            assert item["status"] == "ok"
            assert item["version"] == backend.version
            for cap, res in item["capabilities"].items():
                support = backend.supports(cap)
                assert res == {"ok": support.ok, "reason": support.reason}
        else:
            assert item["status"] == "unavailable"
            assert item["reason"] == failure.reason


def test_text_report_shows_every_backend_capability_and_the_active_one(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    active = adbackends.explain()
    assert f"Active backend: {active.backend.name} (source: auto)" in out
    for name in selection.AUTO_ORDER:
        assert f"  {name}  [built-in]" in out
    loop = REGISTRY.get("loop")
    for cap in PROBES:
        support = loop.supports(cap)
        line = f"\u2713 {cap}" if support else f"\u2717 {cap}  ({support.reason})"
        assert line in out
    assert "fjacrev/fvmap:" in out


def test_report_subcommand_matches_default(capsys):
    cli.main(["report", "--json"])
    first = json.loads(capsys.readouterr().out)
    cli.main(["--json"])
    assert json.loads(capsys.readouterr().out) == first


@pytest.mark.parametrize("name", ["loop", "functorch", "torch.func"])
def test_env_choice_is_reported_with_its_source(name):
    if REGISTRY.failure(name) is not None:
        pytest.skip(f"{name} does not load here")
    proc = _cli(env_value=name)
    assert proc.returncode == 0, proc.stderr
    assert f"Active backend: {name} (source: env)" in proc.stdout
    assert f"why: chosen by TAD_AD_BACKEND='{name}'" in proc.stdout
    assert f"TAD_AD_BACKEND: '{name}'" in proc.stdout


def test_bad_env_is_reported_not_a_traceback():
    proc = _cli("--json", env_value="nope")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["active"]["name"] is None
    assert "UnknownBackendError" in data["active"]["error"]
    assert "Traceback" not in proc.stderr
    # Every backend is still listed.
    assert [b["name"] for b in data["backends"]][:3] == list(selection.AUTO_ORDER)


def test_report_says_where_probe_answers_come_from(tmp_path):
    env = env_without_backend()
    env.pop("ADBACKENDS_NO_CACHE", None)
    env["ADBACKENDS_CACHE_DIR"] = str(tmp_path)
    runs = []
    for args in ([], [], ["--clear-cache"]):
        out = subprocess.run(
            [sys.executable, "-m", "adbackends", "--json", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout))
    assert runs[0]["probe_cache"] == str(tmp_path / "probes-v1.json")
    origins = [
        {b["name"]: b.get("probes") for b in r["backends"] if b["status"] == "ok"} for r in runs
    ]
    assert origins[0]["loop"] == "run"
    assert origins[1]["loop"] == "cache"  # the second process reads the first one's answers
    assert origins[2]["loop"] == "run"  # --clear-cache deleted them first
    env["ADBACKENDS_NO_CACHE"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "adbackends"], env=env, capture_output=True, text=True
    )
    assert "Probe cache: off" in out.stdout
