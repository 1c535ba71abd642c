"""The command line: ``python -m adbackends`` (or ``adbackends``).

``python -m adbackends`` prints the report: every backend with its origin,
version, status and capabilities, and which backend is active and why.
``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "report"]


from . import _memory


def report() -> Dict[str, Any]:
    """Everything the report shows, as plain data (what ``--json`` prints)."""
    import torch

    from . import __version__
    from ._probe_cache import cache_file
    from .compiled import report_section
    from .errors import BackendError
    from .probes import PROBES, probe_origin, tolerance_of
    from .registry import REGISTRY
    from .selection import ENV_VAR, _choose, native_backend, require

    backends: List[Dict[str, Any]] = []
    for name in REGISTRY.names():
        entry = REGISTRY.entry(name)
        item: Dict[str, Any] = {
            "name": name,
            "origin": entry.origin,
            "distribution": entry.distribution,
            "distribution_version": entry.dist_version,
        }
        failure = REGISTRY.failure(name)
        if failure is not None:
            item.update(
                status="unavailable",
                reason=failure.reason,
                hint=failure.hint,
                version=None,
                capabilities={},
            )
        else:
            backend = REGISTRY.get(name)
            caps = backend.capabilities()
            item.update(
                status="ok",
                reason=None,
                hint=None,
                version=backend.version,
                probes=probe_origin(backend),  # "cache", "run" or None
                # What the probes (and the conformance kit) compare values with.
                tolerance=list(tolerance_of(backend)),
                approximate=getattr(backend, "tolerance", None) is not None,
                contract=backend.contract,
                transforms=backend.transforms(),
                capabilities={cap: {"ok": s.ok, "reason": s.reason} for cap, s in caps.items()},
            )
        backends.append(item)

    active: Dict[str, Any]
    try:
        choice = _choose()
        active = {
            "name": choice.backend.name,
            "source": choice.source,
            "reason": choice.reason,
            "rejected": [{"name": n, "reason": r} for n, r in choice.rejected],
            "error": None,
        }
    except BackendError as exc:
        active = {
            "name": None,
            "source": None,
            "reason": None,
            "rejected": [],
            "error": f"{type(exc).__name__}: {exc}",
        }
    try:
        served = choice.backend.native() if active["error"] is None else native_backend()
        native: Dict[str, Any] = {"name": served.name, "error": None}
    except BackendError as exc:
        native = {"name": None, "error": str(exc)}

    return {
        "adbackends": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "env": {ENV_VAR: os.environ.get(ENV_VAR)},
        "required": list(require()),
        "capabilities": {cap: probe.description for cap, probe in PROBES.items()},
        "backends": backends,
        "active": active,
        "native": native,
        "problems": REGISTRY.problems(),
        "probe_cache": cache_file(),  # None when ADBACKENDS_NO_CACHE is set
        "memory": _memory.report(),
        "compiled": report_section(),
    }


def _format(data: Dict[str, Any]) -> str:
    ok, no = "\u2713", "\u2717"
    env_value = data["env"]["TAD_AD_BACKEND"]
    lines = [
        f"adbackends {data['adbackends']}  (Python {data['python']}, torch {data['torch']})",
        f"TAD_AD_BACKEND: {env_value!r}" if env_value is not None else "TAD_AD_BACKEND: not set",
        f"Probe cache: {data['probe_cache'] or 'off'}",
        "",
        "Backends (automatic order):",
    ]
    for item in data["backends"]:
        origin = item["origin"]
        if item["distribution"]:
            origin += f" from {item['distribution']}"
            if item["distribution_version"]:
                origin += f" {item['distribution_version']}"
        if item["status"] == "ok":
            src = "  (probe results from cache)" if item.get("probes") == "cache" else ""
            lines.append(f"  {item['name']}  [{origin}]  version {item['version']}: ok{src}")
            if item.get("approximate"):
                rtol, atol = item["tolerance"]
                lines.append(
                    f"      approximate: values compared with rtol={rtol:g}, atol={atol:g}"
                )
            ways = item.get("transforms") or {}
            other = {n: how for n, how in ways.items() if how != "own"}
            if other:
                lines.append(
                    f"      contract {item['contract']}; "
                    + ", ".join(f"{n}: {how}" for n, how in other.items())
                )
            for cap, res in item["capabilities"].items():
                mark = ok if res["ok"] else no
                why = "" if res["ok"] else f"  ({res['reason']})"
                lines.append(f"      {mark} {cap}{why}")
        else:
            lines.append(f"  {item['name']}  [{origin}]: unavailable: {item['reason']}")
            if item["hint"]:
                lines.append(f"      fix: {item['hint']}")
    lines.append("")
    active = data["active"]
    if active["error"]:
        lines.append(f"Active backend: none. {active['error']}")
    else:
        lines.append(f"Active backend: {active['name']} (source: {active['source']})")
        lines.append(f"  why: {active['reason']}")
        for rej in active["rejected"]:
            lines.append(f"  ruled out {rej['name']}: {rej['reason']}")
    native = data["native"]
    if native["error"]:
        lines.append(f"fjacrev/fvmap: unavailable: {native['error']}")
    else:
        lines.append(f"fjacrev/fvmap: {native['name']}")
    lines.extend(_memory.format_report(data.get("memory")))
    if data.get("compiled"):
        from .compiled import report_lines

        lines.append("")
        lines.extend(report_lines(data["compiled"]))
    if data["problems"]:
        lines.append("")
        lines.append("Plugin problems:")
        lines.extend(f"  {p}" for p in data["problems"])
    return "\n".join(lines)


_CLEAR_HELP = "delete the probe results stored on disk first, so every probe runs again"


def _cmd_report(args: argparse.Namespace) -> int:
    if args.clear_cache:
        from .probes import clear_probe_cache

        clear_probe_cache()
    data = report()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_format(data))
    return 0 if data["active"]["error"] is None else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adbackends",
        description="Report the autodiff backends available here and which one is active.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--clear-cache", action="store_true", help=_CLEAR_HELP)
    parser.set_defaults(func=_cmd_report)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser("report", help="the backend report (the default command)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument("--clear-cache", action="store_true", help=_CLEAR_HELP)
    rep.set_defaults(func=_cmd_report)

    check = sub.add_parser("check", help="run the conformance kit against a backend")
    check.add_argument("name", help="the backend to check, e.g. loop or a plugin's name")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(func=_cmd_check)

    bench = sub.add_parser("bench", help="time every backend's jacrev and vmap here")
    bench.add_argument("--json", action="store_true", help="print the table as JSON")
    bench.add_argument(
        "--tiny", action="store_true", help="a minimal run that only checks that everything works"
    )
    bench.set_defaults(func=_cmd_bench)
    return parser


def _cmd_check(args: argparse.Namespace) -> int:
    from .testing import check_backend

    report = check_backend(args.name, raise_on_failure=False)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run

    data = run(tiny=args.tiny)
    print(json.dumps(data, indent=2) if args.json else format_table(data))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``adbackends --json | head``): stop quietly,
        # as Unix tools do, and keep the interpreter from complaining again
        # when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as a shell reports it
    except Exception as exc:  # one clear line instead of a traceback
        from .errors import BackendError

        if not isinstance(exc, BackendError):
            raise
        print(f"adbackends: error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
