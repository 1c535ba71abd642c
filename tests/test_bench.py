"""The benchmark command runs and reports every backend; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import adbackends
from adbackends import bench
from adbackends.cli import main
from adbackends.registry import AUTO_ORDER


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bench.TINY_ENV, "1")


def _check_quick(data: dict) -> None:
    names = adbackends.available()
    assert set(data) >= {"machine", "sizes", "rows", "fastest"}
    assert data["machine"]["torch"]
    assert [(r["transform"], r["size"]) for r in data["rows"]] == [
        ("jacrev", data["sizes"]["small"]),
        ("jacrev", data["sizes"]["large"]),
        ("vmap", data["sizes"]["small"]),
        ("vmap", data["sizes"]["large"]),
    ]
    for row in data["rows"]:
        assert row["backends"] == names
        # a plugin may be unable to run a problem; a built-in may not
        assert not set(row["errors"]) & set(AUTO_ORDER), row["errors"]
        ran = [name for name in names if name not in row["errors"]]
        for key in ("seconds", "relative", "max_abs_diff"):
            assert list(row[key]) == ran, key
        assert row["fastest"] in names
        assert row["fastest"] not in row["inexact"]
        assert row["relative"][row["fastest"]] == 1.0
        assert all(t > 0 for t in row["seconds"].values())
    assert set(data["fastest"]) == {"jacrev", "vmap"}
    for kinds in data["fastest"].values():
        assert set(kinds) == {"small", "large"} and set(kinds.values()) <= set(names)


def test_bench_json_lists_every_backend(tiny: None, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--json"]) == 0
    _check_quick(json.loads(capsys.readouterr().out))


def test_bench_table_names_every_backend(tiny: None, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("transform"))
    assert header.split()[2:] == adbackends.available()
    assert "fastest jacrev: small problems" in out
    assert "fastest vmap: small problems" in out


def test_exact_backends_agree_with_the_first(tiny: None, capsys: pytest.CaptureFixture) -> None:
    main(["bench", "--json"])
    for row in json.loads(capsys.readouterr().out)["rows"]:
        for name in ("torch.func", "functorch", "loop"):
            if name in row["max_abs_diff"]:
                assert name not in row["inexact"]


def test_a_failing_backend_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = adbackends.get("loop")

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("cannot")

    monkeypatch.setattr(loop, "vmap", broken)
    rows = bench.grid([], [2], repeats=1, min_time=0.0)
    assert rows[0]["errors"] == {"loop": "RuntimeError: cannot"}
    assert "loop" not in rows[0]["seconds"] and rows[0]["fastest"] != "loop"
    assert "loop failed at vmap 2: RuntimeError: cannot" in bench._format_grid(rows, {})


def test_compare_interleaves_and_returns_every_repeat() -> None:
    calls: list = []
    times = bench.compare(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=4,
        min_time=0.0,
        warmup=False,
    )
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    # calibration calls each once, then the repeats: A B, B A, B A, A B
    assert "".join(calls) == "ab" + "ab" + "ba" + "ba" + "ab"


def test_median_ratio() -> None:
    assert bench.median_ratio([1.0, 2.0, 9.0], [1.0, 1.0, 1.0]) == 2.0


def test_a_part_that_cannot_run_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise RuntimeError("no torch.func here")

    monkeypatch.setattr(bench, "p3_loop_vmap", broken)
    data = bench.full(["P3"])
    assert data["P3"] == {"error": "RuntimeError: no torch.func here"}
    assert "P3 could not run here: RuntimeError: no torch.func here" in bench._format_full(data)


def test_suite_parts_check_their_results() -> None:
    if "torch.func" not in adbackends.available():
        pytest.skip("P1 and S compare with torch.func (torch >= 2.0)")
    p1 = bench.p1_dispatch(repeats=1, min_time=0.0)
    assert [r["transform"] for r in p1] == ["jacrev", "vmap"]
    p2 = bench.p2_loop_jacrev(sizes=(3,), repeats=1, min_time=0.0)
    assert p2[0]["max_abs_diff"] < 1e-12
    p3 = bench.p3_loop_vmap(sizes=(3,), repeats=1, min_time=0.0)
    assert p3[0]["equal"]
    strategy = bench.strategy(sizes=(3,), repeats=1, min_time=0.0)
    assert [r["kind"] for r in strategy] == ["elementwise", "dense"]
    assert all(r["max_abs_diff"] < 1e-12 for r in strategy)
    text = bench._format_full({"machine": bench._machine(), "P1": p1, "P2": p2, "P3": p3})
    assert "P1 dispatch overhead" in text and "P3 loop vmap" in text


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_measurement_runs_in_a_fresh_process() -> None:
    rows = bench.p6_memory(m=16, n=4, chunks=(None, 4), names=("loop",))
    assert [r["chunk_size"] for r in rows] == [None, 4]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["result_mib"] == 16 * 4 * 8 / 2**20
        assert row["peak_mib"] >= 0


@pytest.mark.slow
def test_module_entry_point_runs() -> None:
    env = dict(os.environ, **{bench.TINY_ENV: "1"})
    env.pop("TAD_AD_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "adbackends.bench", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _check_quick(json.loads(proc.stdout))
