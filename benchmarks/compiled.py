"""The compiled tier's targets: ``python benchmarks/compiled.py [--quick]``.

Every ratio is of two things timed side by side in one run (interleaved,
median over repeats of the per-repeat ratios; see
:func:`adbackends.bench.compare`), single-threaded, in float64.

P9a
    Steady state: ``torch.compile>torch.func>loop`` / eager torch.func, for
    ``jacrev(jacrev(f))`` of ``f = sum(tanh(W x)**2)`` (n = 8, 32, 128), a
    batched force ``vmap(jacrev(e))`` (b = 16, 256 geometries of 8 atoms)
    and the Hessian of a dispersion-like energy (D3-style C6/C8 terms with
    rational damping and coordination numbers, 10 atoms). At most 0.5 where
    compilation pays, at most 1.02 everywhere (eager is kept where compiled
    is not faster).
P9b
    Break-even: calls after which the compiled variant has paid for its
    compilation, ``compile_s / (eager - compiled)``, in a first process
    (an empty inductor cache) and a second one (the cache the first wrote).
P9c
    A call of a transform that the tier refused (a failure recorded as a
    fallback; a grad-requiring call; a pattern never compiled) / eager
    torch.func: at most 1.05.

Prints a table and writes ``benchmarks/compiled_results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "compiled_results.json"
CHAIN = "torch.compile>torch.func>loop"


# -- workloads ----------------------------------------------------------------------------


def dense(n: int) -> Tuple[Callable[..., Any], Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    x = torch.randn(n, generator=gen, dtype=torch.float64)

    def f(t: Any) -> Any:
        return torch.tanh(w @ t).pow(2).sum()

    return f, x


def linear(n: int) -> Callable[..., Any]:
    import torch

    a = torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def f(t: Any) -> Any:
        return a @ t

    return f


def dispersion(pos: Any) -> Any:
    """A D3-like two-body dispersion energy of one ``(atoms, 3)`` geometry (atomic units)."""
    import torch

    n = pos.shape[0]
    eye = torch.eye(n, dtype=pos.dtype)
    diff = pos.unsqueeze(0) - pos.unsqueeze(1)
    r2 = (diff * diff).sum(-1) + eye  # 1 on the diagonal, masked out below
    r = r2.sqrt()
    off = 1.0 - eye
    rcov = 2.6
    cn = (off / (1.0 + torch.exp(-16.0 * (rcov / r - 1.0)))).sum(-1)
    c6 = 20.0 * torch.exp(-0.5 * (cn.unsqueeze(0) - 2.0) ** 2 - 0.5 * (cn.unsqueeze(1) - 2.0) ** 2)
    c8 = 3.0 * c6 * 4.5
    r0 = 0.4 * (c8 / c6).sqrt() + 4.8
    e6 = c6 / (r2**3 + r0**6)
    e8 = c8 / (r2**4 + r0**8)
    return -0.5 * (off * (e6 + 0.9 * e8)).sum()


def workloads(quick: bool) -> Dict[str, Tuple[str, Callable[..., Any], Tuple[Any, ...]]]:
    """``name -> (transform spelled out, function, arguments)``."""
    from adbackends.bench import geometries, pair_energy

    out: Dict[str, Tuple[str, Callable[..., Any], Tuple[Any, ...]]] = {}
    for n in (8,) if quick else (8, 32, 128):
        f, x = dense(n)
        out[f"jacrev(jacrev) n={n}"] = ("jacrev2", f, (x,))
    for b in (16,) if quick else (16, 256):
        out[f"vmap(jacrev) forces b={b}"] = ("forces", pair_energy, (geometries(b),))
    if not quick:
        molecule = geometries(1, atoms=10, seed=3)[0] * 2.2
        out["dispersion hessian 10 atoms"] = ("hessian", dispersion, (molecule,))
        # One large matrix product: nothing for the compiler to fuse.
        out["jacrev(A x) n=512"] = ("jacrev", linear(512), (dense(512)[1],))
    return out


#: P9a's target per kind of workload: 0.5 where compilation is known to pay
#: (the dense Hessian and the batched forces), 1.02 elsewhere.
TARGETS = {"jacrev2": 0.5, "forces": 0.5, "hessian": 1.02, "jacrev": 1.02}


def build(kind: str, f: Callable[..., Any], api: Any) -> Callable[..., Any]:
    """The transform of ``f`` on ``api`` (adbackends or torch.func).

    On torch.func the Hessian is ``jacrev(jacrev(f))``, the faster of its two
    forms on CPU and the one adbackends runs eagerly, not ``torch.func.hessian``.
    """
    if kind == "jacrev2":
        return api.jacrev(api.jacrev(f))  # type: ignore[no-any-return]
    if kind == "jacrev":
        return api.jacrev(f)  # type: ignore[no-any-return]
    if kind == "forces":
        return api.vmap(api.jacrev(f))  # type: ignore[no-any-return]
    if api.__name__ == "torch.func":
        return api.jacrev(api.jacrev(f))  # type: ignore[no-any-return]
    return api.hessian(f)  # type: ignore[no-any-return]


def warm(tier: Callable[..., Any], args: Tuple[Any, ...], calls: int = 12) -> None:
    for _ in range(calls):
        tier(*args)


def side_by_side(
    tier: Callable[..., Any],
    eager: Callable[..., Any],
    args: Tuple[Any, ...],
    repeats: int,
    min_time: float,
) -> Dict[str, List[float]]:
    from adbackends.bench import compare

    return compare(
        {"tier": lambda: tier(*args), "eager": lambda: eager(*args)},
        repeats=repeats,
        min_time=min_time,
    )


def row_of(tier: Callable[..., Any], args: Tuple[Any, ...]) -> Any:
    import adbackends
    from adbackends import compiled

    signature = compiled._describe(compiled._signature(args, {})[0])
    (row,) = [r for r in adbackends.compilations(tier) if r.signature == signature]
    return row


# -- P9a and P9c -------------------------------------------------------------------------------


def p9a(quick: bool, repeats: int, min_time: float) -> List[Dict[str, Any]]:
    import torch
    import torch.func as F

    import adbackends
    from adbackends.bench import median_ratio

    out = []
    for name, (kind, f, args) in workloads(quick).items():
        eager = build(kind, f, F)
        with adbackends.using(CHAIN):
            tier = build(kind, f, adbackends)
        warm(tier, args)
        row = row_of(tier, args)
        torch.testing.assert_close(tier(*args), eager(*args))
        times = side_by_side(tier, eager, args, repeats, min_time)
        ratio = median_ratio(times["tier"], times["eager"])
        target = TARGETS[kind]
        out.append(
            {
                "part": "P9a",
                "case": name,
                "ratio": ratio,
                "target": target,
                "met": ratio <= target,
                "state": row.state,
                "reason": row.reason,
                "compile_s": row.compile_s,
                "eager_us": sorted(times["eager"])[len(times["eager"]) // 2] * 1e6,
                "compiled_over_eager_in_trial": (
                    row.compiled_us / row.eager_us if row.eager_us and row.compiled_us else None
                ),
            }
        )
        print(f"  P9a {name}: {ratio:.3f} ({row.state}) target {target}", flush=True)
    return out


def p9c(repeats: int, min_time: float) -> List[Dict[str, Any]]:
    import torch
    import torch.func as F

    import adbackends
    from adbackends import compiled
    from adbackends.bench import median_ratio

    out = []
    f, x = dense(8)

    def broken(target: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any) -> Any:
            raise RuntimeError("refused for the benchmark")

        return run

    real = compiled._compile
    compiled._compile = broken
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with adbackends.using(CHAIN):
                failed = adbackends.jacrev(adbackends.jacrev(f))
            warm(failed, (x,), 6)
    finally:
        compiled._compile = real
    xg = x.clone().requires_grad_()
    with adbackends.using(CHAIN):
        grad_needed = adbackends.jacrev(adbackends.jacrev(f))
        never = adbackends.hessian(adbackends.hessian(lambda t: (t**3).sum()))
    eager = F.jacrev(F.jacrev(f))
    eager_never = F.jacrev(F.jacrev(F.jacrev(F.jacrev(lambda t: (t**3).sum()))))
    x3 = x[:3].clone()
    cases = {
        "failure recorded (jacrev(jacrev) n=8)": (failed, eager, (x,)),
        "grad-requiring call (jacrev(jacrev) n=8)": (grad_needed, eager, (xg,)),
        "never compiled: hessian(hessian) n=3": (never, eager_never, (x3,)),
    }
    for name, (tier, reference, args) in cases.items():
        torch.testing.assert_close(tier(*args), reference(*args))
        times = side_by_side(tier, reference, args, repeats, min_time)
        ratio = median_ratio(times["tier"], times["eager"])
        out.append(
            {"part": "P9c", "case": name, "ratio": ratio, "target": 1.05, "met": ratio <= 1.05}
        )
        print(f"  P9c {name}: {ratio:.3f}", flush=True)
    return out


# -- P9b: first and second process ------------------------------------------------------------


def child(quick: bool) -> None:
    """Compile every workload once; print compile time, eager and compiled time per call."""
    import torch.func as F

    import adbackends
    from adbackends import compiled

    compiled.settings.margin = 1e9  # keep every variant: the compile cost is measured
    out = {}
    for name, (kind, f, args) in workloads(quick).items():
        eager = build(kind, f, F)
        with adbackends.using(CHAIN):
            tier = build(kind, f, adbackends)
        warm(tier, args, 8)
        row = row_of(tier, args)

        times = side_by_side(tier, eager, args, 5, 0.05)
        out[name] = {
            "compile_s": row.compile_s,
            "state": row.state,
            "eager_us": min(times["eager"]) * 1e6,
            "compiled_us": min(times["tier"]) * 1e6,
        }
    print("RESULT " + json.dumps(out))


def p9b(quick: bool) -> List[Dict[str, Any]]:
    cache = tempfile.mkdtemp(prefix="adbackends-inductor-")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS="1")
    runs = []
    for _ in ("first", "second"):
        cmd = [sys.executable, __file__, "--child"] + (["--quick"] if quick else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        runs.append(json.loads(line[len("RESULT ") :]))
    out = []
    for name in runs[0]:
        entry: Dict[str, Any] = {"part": "P9b", "case": name}
        for which, run in zip(("first", "second"), runs):
            r = run[name]
            saved = (r["eager_us"] - r["compiled_us"]) * 1e-6
            entry[f"{which}_compile_s"] = r["compile_s"]
            entry[f"{which}_break_even_calls"] = (
                int(r["compile_s"] / saved) + 1 if saved > 0 else None
            )
            entry["eager_us"] = r["eager_us"]
            entry["compiled_us"] = r["compiled_us"]
        out.append(entry)
        print(f"  P9b {name}: {entry}", flush=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parts", default="P9a,P9b,P9c")
    ns = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)
    if ns.child:
        child(ns.quick)
        return 0
    repeats, min_time = (3, 0.01) if ns.quick else (15, 0.1)
    parts = ns.parts.split(",")
    rows: List[Dict[str, Any]] = []
    if "P9a" in parts:
        rows += p9a(ns.quick, repeats, min_time)
    if "P9c" in parts:
        rows += p9c(repeats, min_time)
    if "P9b" in parts:
        rows += p9b(ns.quick)
    data = {
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
    }
    if not ns.quick:
        if RESULTS.exists() and set(parts) != {"P9a", "P9b", "P9c"}:
            # A partial run keeps the other parts' rows of the last full one.
            old = json.loads(RESULTS.read_text())
            kept = [r for r in old["rows"] if r["part"] not in parts]
            data["rows"] = kept + rows
            data["measured_parts"] = {"this run": parts, "earlier": old["measured"]}
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    missed = [r for r in rows if r.get("met") is False]
    print(f"{len(rows)} rows, {len(missed)} targets missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
