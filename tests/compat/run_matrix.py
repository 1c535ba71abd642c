"""Run the compatibility matrix and write docs/compatibility.rst from the real runs.

For each tox environment (all of ``tox.ini``'s ``envlist``, or those named):

1. ``tox -e ENV`` runs the whole test suite, with a JUnit XML report;
2. the environment's own Python runs ``python -m adbackends --json``: the
   automatic choice, what serves fjacrev/fvmap, and every probe's result for
   every backend;
3. both are condensed into ``tests/compat/results/ENV.json`` (the full log
   and JUnit XML stay in ``--logs``).

The table is then written from every saved result, so running a few
environments updates their rows and keeps the others.

Usage::

    python tests/compat/run_matrix.py                    # every environment
    python tests/compat/run_matrix.py torch112 torch20   # just these
    python tests/compat/run_matrix.py --render-only      # rewrite the table only
    python tests/compat/run_matrix.py --tox /path/to/tox --workdir /tmp/tox

It needs tox 4 (``--tox``, default: ``tox`` on PATH) and the Pythons tox.ini
names; pyenv's interpreters are found without activating them.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "tests", "compat", "results")
OUTPUT = os.path.join(ROOT, "docs", "compatibility.rst")
BACKENDS = ("torch.func", "functorch", "loop")
CAPABILITIES = (
    "custom_function",
    "legacy_function",
    "transforms",
    "higher_order",
    "chunk_size",
    "randomness",
    "forward_mode",
    "hessian",
)
YES, NO = "\u2713", "\u2717"


# -- running ------------------------------------------------------------------------


def _environ() -> Dict[str, str]:
    """The caller's environment, without a backend choice, with pyenv's Pythons found."""
    env = dict(os.environ)
    env.pop("TAD_AD_BACKEND", None)
    root = env.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    extra = sorted(glob.glob(os.path.join(root, "versions", "*", "bin")), reverse=True)
    if extra:
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *extra])
    return env


def _tox_command(args: argparse.Namespace) -> List[str]:
    cmd = [args.tox, "-c", os.path.join(ROOT, "tox.ini")]
    if args.workdir:
        cmd += ["--workdir", args.workdir]
    return cmd


def envlist(args: argparse.Namespace) -> List[str]:
    """The environments tox.ini's ``envlist`` names, in order (not ``lint``)."""
    out = subprocess.run(
        [*_tox_command(args), "list", "--no-desc", "-d"],
        capture_output=True,
        text=True,
        env=_environ(),
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if re.fullmatch(r"[\w.-]+", line.strip())]


def env_dir(args: argparse.Namespace, env: str) -> str:
    out = subprocess.run(
        [*_tox_command(args), "config", "-e", env, "-k", "env_dir"],
        capture_output=True,
        text=True,
        env=_environ(),
        check=True,
    ).stdout
    match = re.search(r"^env_dir\s*=\s*(.+)$", out, re.MULTILINE)
    if not match:
        raise RuntimeError(f"tox did not say where {env} lives:\n{out}")
    return match.group(1).strip()


def run_env(args: argparse.Namespace, env: str) -> Dict[str, Any]:
    """Run one environment and return its condensed result."""
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(args.logs, exist_ok=True)
    log_path = os.path.join(args.logs, f"{env}.log")
    xml_path = os.path.join(args.logs, f"{env}.xml")
    if os.path.exists(xml_path):
        os.remove(xml_path)
    print(f"[{env}] running the test suite (log: {log_path})", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    with open(log_path, "w") as log:
        tox = subprocess.run(
            [
                *_tox_command(args),
                "-e",
                env,
                "--",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={xml_path}",
                *args.pytest_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_environ(),
            cwd=ROOT,
        )
    python = os.path.join(env_dir(args, env), "bin", "python")
    report = subprocess.run(
        [python, "-m", "adbackends", "--json"],
        capture_output=True,
        text=True,
        env=_environ(),
        cwd=ROOT,
    )
    versions = subprocess.run(
        [python, "-c", _VERSIONS],
        capture_output=True,
        text=True,
        env=_environ(),
        cwd=ROOT,
    )
    result = condense(
        env,
        report.stdout,
        xml_path,
        tox.returncode,
        versions.stdout,
        report.stderr,
    )
    result["date"] = started.strftime("%Y-%m-%d")
    with open(os.path.join(RESULTS, f"{env}.json"), "w") as fh:
        json.dump(result, fh, indent=2, sort_keys=True)
        fh.write("\n")
    suite = result["suite"]
    print(
        f"[{env}] tox exit {tox.returncode}: {suite['passed']} passed, {suite['failed']} failed, "
        f"{suite['errors']} errors, {suite['skipped']} skipped; auto -> {result['auto']}",
        flush=True,
    )
    return result


_VERSIONS = """
import json, platform
out = {"python": platform.python_version()}
try:
    import torch
    out["torch"] = torch.__version__
except Exception as exc:
    out["torch"] = None
try:
    import importlib.metadata as md
    out["functorch_dist"] = md.version("functorch")
except Exception:
    out["functorch_dist"] = None
print(json.dumps(out))
"""


def suite_counts(xml_path: str) -> Dict[str, int]:
    """pytest's counts from its JUnit XML report (all zero when there is none)."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    if not os.path.exists(xml_path):
        return counts
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for suite in suites:
        counts["tests"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def failed_tests(xml_path: str) -> List[str]:
    if not os.path.exists(xml_path):
        return []
    names = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.append(f"{case.get('classname')}::{case.get('name')}")
    return names


def condense(
    env: str,
    report_json: str,
    xml_path: str,
    tox_rc: int,
    versions_json: str = "",
    report_err: str = "",
) -> Dict[str, Any]:
    """One environment's result as plain data (what results/ENV.json holds)."""
    versions = json.loads(versions_json) if versions_json.strip() else {}
    try:
        report = json.loads(report_json)
    except ValueError:
        report = None
    backends: Dict[str, Any] = {}
    if report is not None:
        for item in report["backends"]:
            if item["name"] not in BACKENDS:
                continue
            if item["status"] != "ok":
                backends[item["name"]] = {"loads": False, "reason": item["reason"]}
                continue
            backends[item["name"]] = {
                "loads": True,
                "version": item["version"],
                "capabilities": {c: r["ok"] for c, r in item["capabilities"].items()},
                "reasons": {c: r["reason"] for c, r in item["capabilities"].items() if not r["ok"]},
            }
    native = (report or {}).get("native", {})
    return {
        "env": env,
        "python": (report or {}).get("python") or versions.get("python"),
        "torch": (report or {}).get("torch") or versions.get("torch"),
        "functorch_dist": versions.get("functorch_dist"),
        "auto": (report or {}).get("active", {}).get("name"),
        "native": native.get("name"),
        "native_error": native.get("error"),
        "report_error": None if report is not None else (report_err.strip()[-500:] or "no report"),
        "backends": backends,
        "suite": suite_counts(xml_path),
        "failed_tests": failed_tests(xml_path),
        "tox_exit": tox_rc,
    }


# -- writing the table -----------------------------------------------------------------


def load_results(order: Sequence[str]) -> List[Dict[str, Any]]:
    results = []
    for path in glob.glob(os.path.join(RESULTS, "*.json")):
        with open(path) as fh:
            results.append(json.load(fh))
    rank = {env: i for i, env in enumerate(order)}
    results.sort(key=lambda r: (rank.get(r["env"], len(rank)), r["env"]))
    return results


def _short_torch(version: Optional[str]) -> str:
    return (version or "?").split("+")[0]


def _functorch_cell(result: Dict[str, Any]) -> str:
    ft = result["backends"].get("functorch", {})
    if not ft.get("loads"):
        return "none"
    if result.get("functorch_dist"):
        return f"{result['functorch_dist']} (PyPI)"
    return "bundled"


def _suite_cell(result: Dict[str, Any]) -> str:
    s = result["suite"]
    if s["tests"] == 0:
        return f"did not run (tox exit {result['tox_exit']})"
    text = f"{s['passed']} passed, {s['failed'] + s['errors']} failed, {s['skipped']} skipped"
    return text


def _list_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = [f".. list-table:: {title}".rstrip(), "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    lines.append("")
    return lines


def render(results: Sequence[Dict[str, Any]]) -> str:
    lines = [
        ".. This file is written by tests/compat/run_matrix.py from real runs of",
        "   the tox environments; edit the script, not the table.",
        "",
        "Compatibility",
        "=============",
        "",
        "adbackends is tested on every torch in the table below: each row is one",
        "tox environment (see ``tox.ini``) that ran the whole test suite. The",
        "test suite checks, in each environment, that automatic selection picks",
        "what the design promises for that torch and that every backend passes",
        "exactly the capabilities listed here. Before torch 2.0 the differential",
        "tests compare the loop backend with functorch; what is skipped there is",
        "what no reference can check (setup_context-style Functions, torch.func",
        "itself, fallback chains with torch.func). Rows are regenerated with",
        "",
        ".. code-block:: console",
        "",
        "   $ python tests/compat/run_matrix.py            # every environment",
        "   $ python tests/compat/run_matrix.py torch112   # one row",
        "",
        "To see the same for the environment at hand, run ``python -m adbackends``;",
        ":doc:`capabilities` explains each probe.",
        "",
        "What the transforms resolve to",
        "------------------------------",
        "",
        "``jacrev``/``vmap`` use the automatic choice; ``fjacrev``/``fvmap`` use the",
        "best backend with native composable transforms.",
        "",
    ]
    rows = []
    for r in results:
        native = r["native"] or "error: install torch >= 2.0 or functorch"
        rows.append(
            [
                f"``{r['env']}``",
                r["python"] or "?",
                _short_torch(r["torch"]),
                _functorch_cell(r),
                r["auto"] or f"error: {r.get('report_error')}",
                native,
                _suite_cell(r),
            ]
        )
    lines += _list_table(
        "",
        ["env", "Python", "torch", "functorch", "jacrev / vmap", "fjacrev / fvmap", "test suite"],
        rows,
    )
    pythons = sorted(
        {".".join(r["python"].split(".")[:2]) for r in results if r["python"]},
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    torches = sorted(
        {_short_torch(r["torch"]) for r in results if r["torch"]},
        key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit()),
    )
    lines += [
        f"Python versions run: {', '.join(pythons)}. torch versions run: {', '.join(torches)}.",
        "",
        "Capabilities",
        "------------",
        "",
        f"{YES}: the probe passes; {NO}: it fails (the reason is below); a backend",
        "that does not load has a dash. functorch before torch 2.0 has no",
        "``chunk_size`` argument; the functorch backend computes it the way later",
        "functorch does (``vjp`` and ``vmap`` over chunks of rows, or of the",
        "batch), so its ``chunk_size`` probe passes there too.",
        "",
    ]
    rows = []
    for r in results:
        for name in BACKENDS:
            info = r["backends"].get(name)
            cells = [f"``{r['env']}``", name]
            if not info or not info.get("loads"):
                cells += ["\u2014"] * len(CAPABILITIES)
            else:
                cells += [YES if info["capabilities"].get(c) else NO for c in CAPABILITIES]
            rows.append(cells)
    lines += _list_table("", ["env", "backend", *CAPABILITIES], rows)

    lines += _old_functorch_section()
    lines += ["Why a probe fails or a backend does not load", "-" * 44, ""]
    for r in results:
        notes = []
        for name in BACKENDS:
            info = r["backends"].get(name, {})
            if info and not info.get("loads"):
                notes.append(f"* {name}: does not load: {_rst_text(info.get('reason'))}")
            for cap, why in sorted(info.get("reasons", {}).items()):
                why = _CAPABILITY_ERROR.sub("", why or "")
                notes.append(f"* {name}, ``{cap}``: {_rst_text(why)}")
        if r["failed_tests"]:
            shown = ", ".join(f"``{t}``" for t in r["failed_tests"][:10])
            more = len(r["failed_tests"]) - 10
            notes.append(f"* failing tests: {shown}" + (f" and {more} more" if more > 0 else ""))
        if notes:
            lines += [f"``{r['env']}`` (torch {_short_torch(r['torch'])})", ""]
            lines += notes
            lines.append("")
    dates = sorted({r.get("date", "") for r in results if r.get("date")})
    if dates:
        lines += [f"Last run: {', '.join(dates)}.", ""]
    return "\n".join(lines)


#: What old functorch gets wrong through the functorch backend, found by the
#: survey (tests/functorch_survey.py, tests/test_functorch_survey.py) on
#: torch 1.12.1 + functorch 0.2.1 and torch 1.13.1, and the guard for each:
#: (torch, pattern, what functorch does, what is right, guard).
OLD_FUNCTORCH = (
    (
        "1.12 (jacrev, jacfwd, hessian); 1.13 (jacfwd, hessian)",
        "negative ``argnums`` (``-1``, ``(0, -1)``)",
        "zeros, no error",
        "the derivative for the argument counted from the end",
        "rewritten: counted from the front once the arguments are known",
    ),
    (
        "1.12, 1.13",
        "``jacrev``/``jacfwd``/``hessian`` of a complex input",
        "a Jacobian, no error (``jacrev``'s is the conjugate of ``jacfwd``'s)",
        "``RuntimeError``: Expected all inputs to be real",
        "checked first: torch.func's error",
    ),
    (
        "1.12, 1.13",
        "``jacrev``/``jacfwd`` of a complex output of real inputs",
        "``jacrev``: the real part only, ``jacfwd``: a complex Jacobian; no error",
        "``RuntimeError``: Expected all outputs to be real",
        "checked: torch.func's error",
    ),
    (
        "1.12",
        "``jvp``/``jacfwd`` with an integer primal or tangent",
        "a result, no error",
        "``ValueError``: Expected primal (tangent) to be floating point or complex",
        "checked first: torch.func's error",
    ),
    (
        "1.12",
        "``vmap`` with no batched input (``in_dims`` all ``None``)",
        "``IndexError: list index out of range``",
        "``ValueError``: Expected at least one Tensor to vmap over",
        "translated: torch.func's error",
    ),
    (
        "1.12, 1.13",
        "``vmap(out_dims=None)``, or ``None`` inside ``out_dims``",
        "``ValueError`` at the call",
        "the output as it is, unbatched",
        "refused when built: a chain runs it on the loop",
    ),
    (
        "1.12, 1.13 (and torch.func on 2.x)",
        "``vmap`` of an output that does not depend on the batch, at ``out_dims`` other than 0",
        "a failed expand, a wrong shape, or (a 0-dim output, before torch 2.0) a crash "
        "of the process",
        "the output expanded along the batch at that dim",
        "refused from inside the call: a chain runs it on the loop",
    ),
    (
        "1.12, 1.13 (and torch.func on 2.x)",
        "``vmap`` over a batch of size 0 (most functions)",
        "``IndexError`` (or an assertion) from inside",
        "outputs with a batch of size 0",
        "refused: a chain runs it on the loop",
    ),
    (
        "1.12, 1.13",
        "forward mode over some 0-dim tensors",
        "``RuntimeError``: Could not allocate memory to change Tensor SizesAndStrides",
        "the derivative",
        "refused: a chain runs it on the loop",
    ),
    (
        "every functorch and torch.func",
        "a function that reads ``data_ptr()`` (dxtb's result cache)",
        "``RuntimeError``: Cannot access data pointer of Tensor that doesn't have storage",
        "the derivative",
        "refused: a chain runs it on the loop",
    ),
)


def _old_functorch_section() -> List[str]:
    lines = [
        "Old functorch: what it gets wrong, and the guards",
        "-" * 49,
        "",
        "On torch 1.12 and 1.13 ``auto`` is ``functorch>loop``. A survey runs every",
        "transform of the family through the functorch backend against the loop",
        "backend (values, shapes, dtype, ``requires_grad``, pytree structure,",
        "exception or not) over ``argnums`` (negative, tuples), ``has_aux``,",
        "``in_dims``/``out_dims``, ``chunk_size``, ``randomness``, nestings, closures",
        "over tensors that require grad, ``no_grad``/``enable_grad``, integer and",
        "complex inputs and zero-size batches: ``tests/functorch_survey.py`` (a table",
        "of cases) and ``tests/test_functorch_survey.py`` (the cases and a",
        "Hypothesis profile; ``ADBACKENDS_HYPOTHESIS_PROFILE=large`` for the deep",
        "run). ``jacrev`` and ``vmap`` are also drawn by ``tests/test_loop_hypothesis.py``,",
        "whose reference before torch 2.0 is the functorch backend. Every difference",
        "it found, and what the functorch backend does about it (the first four, and",
        "the wrong shapes of outputs that do not depend on the batch, were wrong",
        "results that raised nothing):",
        "",
    ]
    lines += _list_table(
        "",
        ["torch", "pattern", "old functorch", "right (torch.func, loop)", "guard"],
        [list(row) for row in OLD_FUNCTORCH],
    )
    lines += [
        "With the guards, the survey's deep profile (5,000 generated cases per torch)",
        "and its table of cases find no silent difference on either torch. What",
        "remains differs between the loop and torch.func on every torch, torch 2",
        "included, and is not old functorch's: under ``jacfwd``/``jvp`` a ``no_grad``",
        "block inside the function is differentiated through (forward-mode AD ignores",
        "grad mode) where the loop's two reverse passes stop at it; a float32 0-dim",
        "tensor times a Python number gets a float64 tangent; which forward-mode and",
        "Hessian results, results over a batch of size 0 and ``vmap`` of the",
        "identity under ``no_grad`` (functorch returns the input itself) require grad; the",
        "exception type for the Hessian of an",
        "integer input; under an outer ``no_grad``, ``vmap(jacrev)`` of an output that",
        "does not depend on the differentiated input (torch.func gives zeros, the loop",
        "raises); and ``vmap`` of an in-place write into an unbatched tensor, which",
        "torch.func cannot do and the loop can.",
        "",
    ]
    return lines


# The probe's reason when the backend raised adbackends.CapabilityError: the
# prefix repeats the row's backend and capability.
_CAPABILITY_ERROR = re.compile(
    r"^CapabilityError: autodiff backend '[^']*' lacks capability '[^']*'(?: \([^)]*\))?: "
)


def _rst_text(text: Optional[str]) -> str:
    text = (text or "").replace("\n", " ")
    if len(text) > 180:
        text = text[:177] + "..."
    # Keep inline markup characters from being read as markup.
    return re.sub(r"([*`|_\\])", r"\\\1", text)


# -- command line ---------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("envs", nargs="*", help="tox environments (default: tox.ini's envlist)")
    parser.add_argument("--tox", default=shutil.which("tox") or "tox", help="the tox to run")
    parser.add_argument("--workdir", help="tox's --workdir (where the environments live)")
    parser.add_argument("--output", default=OUTPUT, help="where to write the table")
    parser.add_argument(
        "--logs",
        default=os.path.join(tempfile.gettempdir(), "adbackends-matrix"),
        help="where each environment's log and JUnit XML go",
    )
    parser.add_argument(
        "--render-only", action="store_true", help="write the table from saved results, run nothing"
    )
    parser.add_argument(
        "--pytest-args", nargs=argparse.REMAINDER, default=[], help="extra pytest arguments"
    )
    args = parser.parse_args(argv)

    order = list(args.envs)
    if not args.render_only:
        order = args.envs or envlist(args)
        for env in order:
            run_env(args, env)
    else:
        try:
            order = envlist(args)
        except (OSError, subprocess.CalledProcessError):
            order = []
    results = load_results(order)
    if not results:
        print("no results to write", file=sys.stderr)
        return 1
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(render(results))
    print(f"wrote {os.path.relpath(args.output, ROOT)}")
    bad = [r["env"] for r in results if r["env"] in order and (r["tox_exit"] or not r["auto"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
