"""The short benchmark (``adbackends bench``) and the suite in benchmarks/; no timing asserted."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import adbackends
from adbackends import bench
from adbackends.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"
SENTENCE = re.compile(r"^auto uses \S+ here.*; .+\.$")
BUILT_IN = ("torch.func", "functorch", "loop")


@pytest.fixture(scope="module")
def tiny() -> Dict[str, Any]:
    return bench.run(tiny=True)


def test_the_short_run_times_every_backend_on_every_workload(tiny: Dict[str, Any]) -> None:
    names = adbackends.available()
    assert set(tiny) == {"machine", "selection", "rows", "summary"}
    assert [(r["workload"], r["size"]) for r in tiny["rows"]] == [
        (w, s) for w in ("jacrev", "vmap", "forces") for s in (2, 4)
    ]
    for row in tiny["rows"]:
        assert row["backends"] == names
        # a plugin may be unable to run a workload; a built-in may not
        assert not set(row["errors"]) & set(BUILT_IN), row["errors"]
        ran = [n for n in names if n not in row["errors"]]
        for key in ("seconds", "relative", "max_abs_diff"):
            assert list(row[key]) == ran, key
        assert row["fastest"] in ran and row["fastest"] not in row["inexact"]
        assert row["relative"][row["fastest"]] == 1.0
        assert all(t > 0 for t in row["seconds"].values())
        assert not set(row["inexact"]) & set(BUILT_IN)


def test_the_table_ends_with_one_sentence(tiny: Dict[str, Any]) -> None:
    text = bench.format_table(tiny)
    header = next(line for line in text.splitlines() if line.startswith("workload"))
    assert header.split()[2:] == adbackends.available()
    last = text.splitlines()[-1]
    assert last == tiny["summary"]
    assert SENTENCE.match(last), last
    assert "target" not in text.lower() and "P1" not in text


def test_the_command_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--tiny"]) == 0
    assert SENTENCE.match(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["bench", "--tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert SENTENCE.match(data["summary"]) and len(data["rows"]) == 6


def _data(times: Dict[str, List[float]], auto: str = "torch.func") -> Dict[str, Any]:
    """Rows for a made-up run: per backend, one time per row."""
    names = list(times)
    rows = []
    for i, size in enumerate((8, 256)):
        secs = {n: t[i] for n, t in times.items()}
        best = min(secs, key=secs.__getitem__)
        rows.append(
            {
                "workload": "vmap",
                "size": size,
                "backends": names,
                "seconds": secs,
                "relative": {n: s / secs[best] for n, s in secs.items()},
                "fastest": best,
                "inexact": [],
                "errors": {},
            }
        )
    return {"rows": rows, "selection": {"auto": auto, "active": auto, "source": "auto"}}


def test_summary_names_the_fastest_and_the_gap() -> None:
    times = {"torch.func": [1.0, 1.0], "functorch": [1.1, 1.0], "loop": [2.0, 8.3]}
    assert bench.summary(_data(times)) == (
        "auto uses torch.func here; for these workloads torch.func is fastest; "
        "loop is 8.3x slower for vmap at batch 256."
    )
    # auto's choice is not the fastest: the gap is auto's
    assert bench.summary(_data(times, auto="loop")).endswith(
        "torch.func is fastest; loop is 8.3x slower for vmap at batch 256."
    )
    # a fallback chain runs its first backend
    assert bench.summary(_data(times, auto="torch.func>loop")).startswith(
        "auto uses torch.func here (falling back to loop); for these workloads torch.func"
    )
    assert "too few backends" in bench.summary(_data({"loop": [1.0, 1.0]}, auto="loop"))


def test_a_failing_backend_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = adbackends.get("loop")

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("cannot")

    monkeypatch.setattr(loop, "vmap", broken)
    row = bench.time_backends("vmap", 2, repeats=1, min_time=0.0)
    assert row["errors"] == {"loop": "RuntimeError: cannot"}
    assert "loop" not in row["seconds"] and row["fastest"] != "loop"


def test_forces_and_hessians_agree_across_backends() -> None:
    xs = bench.geometries(3)
    # The reference uses plain autograd, which every supported torch has.
    ref = -torch.stack([torch.autograd.functional.jacobian(bench.lennard_jones, x) for x in xs])
    for name in [n for n in BUILT_IN if n in adbackends.available()]:
        backend = adbackends.get(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # functorch's deprecation notice
            forces = bench.workload("forces", 3)(backend)()
            hessians = bench.workload("hessians", 3)(backend)()
        assert forces.shape == (3, 8, 3) and hessians.shape == (3, 8, 3, 8, 3)
        torch.testing.assert_close(-forces, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hessians, hessians.transpose(1, 3).transpose(2, 4))
    with pytest.raises(ValueError, match="unknown workload"):
        bench.workload("nope", 1)


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
    assert bench.median_ratio([1.0, 2.0, 9.0], [1.0, 1.0, 1.0]) == 2.0


def test_the_library_parses_no_command_line_and_stays_out_of_import() -> None:
    assert "argparse" not in Path(bench.__file__).read_text(encoding="utf-8")
    code = "import sys, adbackends; print('adbackends.bench' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the suite in benchmarks/ ---------------------------------------------------------------


def _suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_the_suite_runs_quick_and_writes_its_tables(tmp_path: Path) -> None:
    proc = _suite(tmp_path, "--p1-runs", "2")
    assert "P2 loop jacrev (target" in proc.stdout  # the suite prints its targets
    data = json.loads((tmp_path / "results.json").read_text())
    if "torch.func" not in adbackends.available():  # torch 1.x: kept apart, P1 and P7a/b skipped
        version = ".".join(torch.__version__.split(".")[:2])
        assert data["parts"] == {}
        parts = data["older_torch"][version]["parts"]
        assert list(parts) == ["P1", "P2", "P3", "P5", "P7", "S"]
        assert "torch.func" in parts["P1"]["skipped"]
        assert "torch.func" in parts["P7"]["a"]["skipped"]
        assert len(parts["P7"]["c"]["rows"]) == 2
        return
    assert list(data["parts"]) == ["P1", "P2", "P3", "P5", "P7", "S"]
    for part, result in data["parts"].items():
        assert "error" not in result, (part, result)
    workloads = {r["workload"] for r in data["parts"]["P5"]}
    assert workloads == {"jacrev", "vmap", "forces", "hessians"}
    tables = (tmp_path / "performance_tables.rst").read_text()
    for title in ("P2 loop jacrev", "P5 forces", "P5 hessians", "S size-aware strategy"):
        assert f".. list-table:: {title}" in tables
    # P1: every run kept, in both modes, with its verdict
    p1 = data["parts"]["P1"]
    assert p1["runs"] == 2 and set(p1["modes"]) == {"auto", "strict"}
    assert p1["modes"]["strict"]["active"] == "torch.func"
    for mode in p1["modes"].values():
        for row in mode["transforms"]:
            assert len(row["ratios"]) == len(row["met"]) == len(row["controls"]) == 2
            assert row["max"] == max(row["ratios"]) and row["all_met"] == all(row["met"])
    assert {r["case"] for r in data["parts"]["P3"]} == {"tanh", "pair energy"}
    assert all(r["equal"] for r in data["parts"]["P3"])
    p7 = data["parts"]["P7"]
    for key, calls in (("a", 3), ("b", 2)):
        rows = p7[key]["rows"]
        assert len(rows) == calls and all(r["ratio"] > 0 and "met" in r for r in rows)
        assert all(r["max_abs_diff"] < 1e-12 for r in rows)
    assert p7["b"]["fell_back"]  # the .item() functions did fall back
    assert "torch < 2" in p7["c"]["skipped"]  # torch 1.13 only
    for title in ("P7a, calls that never fall back", "P3 loop vmap", "auto, what users get"):
        assert title in tables
    if importlib.util.find_spec("matplotlib") is not None:
        png = (tmp_path / "performance_grid.png").read_bytes()
        assert png.startswith(b"\x89PNG") and ".. figure:: /_static/performance_grid.png" in tables


def test_the_suite_keeps_the_parts_it_did_not_run(tmp_path: Path) -> None:
    _suite(tmp_path, "--parts", "P3")
    _suite(tmp_path, "--parts", "P2")
    data = json.loads((tmp_path / "results.json").read_text())
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    if int(major) < 2:  # torch 1.x results are kept apart, under their version
        data = data["older_torch"][f"{major}.{minor}"]
    assert list(data["parts"]) == list(data["runs"]) == ["P2", "P3"]


def _run_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("benchmarks_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def test_results_of_an_older_torch_are_kept_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_module(monkeypatch)
    run_meta = {"date": "d", "quick": True}

    def data(torch_version: str, parts: Dict[str, Any]) -> Dict[str, Any]:
        machine = {"torch": torch_version}
        return {
            "machine": machine,
            "parts": parts,
            "runs": {p: {**run_meta, "machine": machine} for p in parts},
        }

    new = data("2.13.0+cpu", {"P5": [1], "P1": {"x": 1}})
    old = run.merge({}, data("1.13.1+cu117", {"P5": [0], "P7": {}}))
    assert old["parts"] == {} and list(old["older_torch"]) == ["1.13"]
    merged = run.merge(old, new)
    assert merged["parts"] == {"P1": {"x": 1}, "P5": [1]}  # the suite's order
    assert merged["older_torch"]["1.13"]["parts"] == {"P5": [0], "P7": {}}
    again = run.merge(merged, data("1.13.1", {"P5": [2]}))
    assert again["parts"] == merged["parts"]
    assert again["older_torch"]["1.13"]["parts"] == {"P5": [2], "P7": {}}
    assert run.older_torch({"torch": "2.0.1"}) is None


def test_the_choice_on_an_older_torch_is_one_sentence() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import report
    finally:
        sys.path.remove(str(SCRIPT.parent))
    times = {"loop": [2.0, 8.0], "functorch": [1.1, 1.0], "functorch>loop": [1.0, 1.0]}
    text = report.choice_sentence(_data(times)["rows"], "1.13")
    assert text.startswith("On torch 1.13, choose **functorch>loop**")
    assert "loop takes 2 to 8 times as long" in text


def test_the_suite_rewrites_only_the_marked_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_module(monkeypatch)
    page = tmp_path / "page.rst"
    page.write_text(f"Title\n=====\n\n{run.START}\nold\n{run.END}\nafter\n")
    run.write_page(page, "new\n")
    assert page.read_text() == f"Title\n=====\n\n{run.START}\n\nnew\n\n{run.END}\nafter\n"
    page.write_text("no markers\n")
    with pytest.raises(SystemExit, match="missing"):
        run.write_page(page, "new\n")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_suite_starts_fresh_interpreters(tmp_path: Path) -> None:
    if importlib.util.find_spec("torch.func") is None:
        pytest.skip("P4 compares with plain torch.func, which this torch does not have")
    _suite(tmp_path, "--parts", "P4,P6")
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["P4"]["ratio"] > 0 and parts["P4"]["own_cost_ms"] > 0
    assert parts["P4"]["vmap_ratio"] > 0 and parts["P4"]["cold_cache_vmap_ratio"] > 0
    for row in parts["P6"]:
        assert "error" not in row, row
        assert row["result_mib"] == 16 * 4 * 8 / 2**20 and row["peak_mib"] >= 0
