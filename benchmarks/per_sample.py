"""Per-sample gradients on the loop backend: ``python benchmarks/per_sample.py [--quick]``.

The workload of PyTorch's per-sample-gradients tutorial: a model called
through ``torch.func.functional_call`` in ``compute_loss(params, buffers,
sample, target)``, and ``vmap(grad(compute_loss), in_dims=(None, None, 0,
0))`` on the loop backend, against the tutorial's own hand loop (the model
called per sample, ``torch.autograd.grad`` of the loss with respect to its
parameters, the results stacked). Two models: the tutorial's CNN, and a
small MLP (784-128-10) on which a call is mostly per-operation overhead.

A third column, the hand loop written with ``functional_call`` as the
transform's function is (parameters made to require grad once), shows
what ``functional_call`` itself costs: the part of the ratio no backend can
remove.

Every figure is a ratio of two things timed side by side in one run
(interleaved, median over repeats of the per-repeat ratios; see
:func:`adbackends.bench.compare`), single-threaded, in float32 as in the
tutorial. Target: loop / hand loop <= 1.1. Prints a table and writes
``benchmarks/per_sample_results.json``; ``--docs`` also rewrites the table
in ``docs/performance.rst`` (between its per-sample markers); ``--quick``
runs a tiny batch once (it checks that everything works, the figures mean
nothing, and the docs are left alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "per_sample_results.json"
PAGE = HERE.parent / "docs" / "performance.rst"
#: The lines between which the table stands in ``docs/performance.rst``.
START = ".. per-sample table start"
END = ".. per-sample table end"
TARGET = 1.1
BATCHES = (16, 32, 64)
MODELS = ("cnn", "mlp")

Row = Dict[str, Any]


def make_model(kind: str) -> Any:
    """The tutorial's CNN (``"cnn"``), or a small MLP (``"mlp"``), seeded."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SimpleCNN(nn.Module):  # as in the tutorial
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x: Any) -> Any:
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2)
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            return F.log_softmax(self.fc2(x), dim=1)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(784, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x: Any) -> Any:
            x = torch.flatten(x, 1)
            return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)

    torch.manual_seed(0)
    if kind == "cnn":
        return SimpleCNN()
    if kind == "mlp":
        return MLP()
    raise ValueError(f"unknown model {kind!r}: expected one of {', '.join(MODELS)}")


def workload(kind: str, batch: int) -> Dict[str, Callable[[], Any]]:
    """The three things timed, each returning per-sample gradients per parameter name."""
    import torch
    import torch.nn.functional as F

    import adbackends

    try:
        from torch.func import functional_call
    except ImportError:  # torch < 2.0: one dict of parameters and buffers
        from torch.nn.utils.stateless import functional_call as _stateless

        def functional_call(module: Any, dicts: Any, args: Any) -> Any:
            merged = {}
            for part in dicts if isinstance(dicts, tuple) else (dicts,):
                merged.update(part)
            return _stateless(module, merged, args)

    model = make_model(kind)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(batch, 1, 28, 28, generator=gen)
    targets = torch.randint(10, (batch,), generator=gen)
    names = [name for name, _ in model.named_parameters()]

    def loss_fn(predictions: Any, labels: Any) -> Any:
        return F.nll_loss(predictions, labels)

    # The tutorial's hand loop.
    def compute_grad(sample: Any, target: Any) -> Any:
        prediction = model(sample.unsqueeze(0))
        loss = loss_fn(prediction, target.unsqueeze(0))
        return torch.autograd.grad(loss, list(model.parameters()))

    def hand() -> Dict[str, Any]:
        grads = [compute_grad(data[i], targets[i]) for i in range(batch)]
        return {name: torch.stack(shards) for name, shards in zip(names, zip(*grads))}

    # The tutorial's transform version.
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def compute_loss(params: Any, buffers: Any, sample: Any, target: Any) -> Any:
        predictions = functional_call(model, (params, buffers), (sample.unsqueeze(0),))
        return loss_fn(predictions, target.unsqueeze(0))

    loop = adbackends.get("loop")

    def loop_vmap_grad() -> Dict[str, Any]:
        per_sample = loop.vmap(loop.grad(compute_loss), in_dims=(None, None, 0, 0))
        return per_sample(params, buffers, data, targets)  # type: ignore[no-any-return]

    # The hand loop through functional_call, as compute_loss calls the model.
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}

    def hand_functional_call() -> Dict[str, Any]:
        grads = [
            torch.autograd.grad(
                compute_loss(leaves, buffers, data[i], targets[i]), list(leaves.values())
            )
            for i in range(batch)
        ]
        return {name: torch.stack(shards) for name, shards in zip(names, zip(*grads))}

    return {"loop": loop_vmap_grad, "hand": hand, "hand_functional_call": hand_functional_call}


def _check(results: Dict[str, Dict[str, Any]], what: str) -> None:
    """Every side computes the same gradients (a benchmark of a wrong result means nothing)."""
    import torch

    first = results["hand"]
    for name, result in results.items():
        if result.keys() != first.keys() or not all(
            torch.allclose(result[k], first[k], rtol=1e-4, atol=1e-6) for k in first
        ):
            raise AssertionError(f"{what}: {name} differs from the hand loop")


def measure(kind: str, batch: int, repeats: int, min_time: float) -> Row:
    """One model and batch: the ratios, interleaved in one run."""
    from adbackends.bench import compare, median_ratio

    fns = workload(kind, batch)
    _check({name: fn() for name, fn in fns.items()}, f"{kind} batch {batch}")
    times = compare(fns, repeats=repeats, min_time=min_time)
    ratio = median_ratio(times["loop"], times["hand"])
    return {
        "model": kind,
        "batch": batch,
        "ratio": ratio,
        "floor_ratio": median_ratio(times["hand_functional_call"], times["hand"]),
        "loop_over_functional_call": median_ratio(times["loop"], times["hand_functional_call"]),
        "target": TARGET,
        "met": ratio <= TARGET,
        "times_s": {name: statistics.median(ts) for name, ts in times.items()},
    }


def run(
    quick: bool = False, models: Sequence[str] = MODELS, batches: Sequence[int] = BATCHES
) -> Dict[str, Any]:
    """Every model at every batch size; plain data."""
    import torch

    import adbackends as ad

    torch.set_num_threads(1)
    repeats, min_time = (1, 0.001) if quick else (10, 0.2)
    if quick:
        batches = (2,)
    rows: List[Row] = [measure(m, b, repeats, min_time) for m in models for b in batches]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "repeats": repeats,
        "min_time_s": min_time,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "adbackends": ad.__version__,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        "target": TARGET,
        "rows": rows,
    }


def format_table(data: Dict[str, Any]) -> str:
    """The rows as a plain-text table."""
    header: Tuple[str, ...] = (
        "model",
        "batch",
        "loop",
        "hand loop",
        "loop / hand",
        "",
        "hand with functional_call / hand",
    )
    lines = [
        (
            r["model"],
            str(r["batch"]),
            f"{r['times_s']['loop'] * 1e3:.2f} ms",
            f"{r['times_s']['hand'] * 1e3:.2f} ms",
            f"{r['ratio']:.3f}",
            "met" if r["met"] else "MISSED",
            f"{r['floor_ratio']:.3f}",
        )
        for r in data["rows"]
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    met = sum(r["met"] for r in data["rows"])
    out.append(f"{met}/{len(data['rows'])} within loop / hand <= {data['target']:g}")
    return "\n".join(out)


def rst_table(data: Dict[str, Any]) -> str:
    """The rows as the reStructuredText table of the docs, with when and where."""
    m = data["machine"]
    lines = [
        f".. Written by benchmarks/per_sample.py from {RESULTS.name}.",
        "",
        f"Measured {data['date']}: {m['platform']}, {m.get('cpus', '?')} CPUs, "
        f"{m['threads']} torch thread(s); torch "
        f"{m['torch']}, Python {m['python']}, adbackends {m['adbackends']}; "
        f"{data['repeats']} interleaved repeats, medians.",
        "",
        ".. list-table:: Per-sample gradients: loop backend / the tutorial's hand loop "
        f"(target <= {data['target']:g})",
        "   :header-rows: 1",
        "",
    ]
    header = [
        "model",
        "batch",
        "loop",
        "hand loop",
        "loop / hand",
        "hand loop with functional_call / hand",
        "loop / hand loop with functional_call",
    ]
    lines.append("   * - " + header[0])
    lines += [f"     - {h}" for h in header[1:]]
    for r in data["rows"]:
        cells = [
            "CNN (the tutorial's)" if r["model"] == "cnn" else "MLP 784-128-10",
            str(r["batch"]),
            f"{r['times_s']['loop'] * 1e3:.2f} ms",
            f"{r['times_s']['hand'] * 1e3:.2f} ms",
            f"**{r['ratio']:.3f}** ({'met' if r['met'] else 'missed'})",
            f"{r['floor_ratio']:.3f}",
            f"{r['loop_over_functional_call']:.3f}",
        ]
        lines.append("   * - " + cells[0])
        lines += [f"     - {c}" for c in cells[1:]]
    return "\n".join(lines) + "\n"


def write_docs(data: Dict[str, Any], page: Path = PAGE) -> None:
    """Replace the table between the markers of ``page``."""
    text = page.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{page}: the lines {START!r} and {END!r} are missing")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    page.write_text(before + START + "\n\n" + rst_table(data) + "\n" + END + after)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/per_sample.py",
        description="Time the loop backend's per-sample gradients against a hand loop.",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny batch once: checks only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})"
    )
    parser.add_argument(
        "--docs", action="store_true", help="also rewrite the table in docs/performance.rst"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    data = run(quick=args.quick, models=models)
    print(format_table(data))
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.docs and not args.quick:
        write_docs(data)
        print(f"wrote the table in {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
