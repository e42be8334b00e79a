"""Timing shared by the benchmarks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import upop
from upop.core.profile import paired_latency  # noqa: F401  (the benchmarks' timing, shared with the library)
from upop.jobs.report import CompressReport, TrainReport


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo on Linux, else what ``platform`` says), so a table says where it ran:
    some bases (classification, NLVR) did not rebuild bit for bit on another machine while CLIP retrieval's did; why
    is not established (kernels chosen by the processor's vector instructions are the suspect)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown processor"


def emit_json(result: dict, out: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def variant_row(runs: Path, name: str) -> dict:
    """What a benchmark table reads from a run: the report-split metrics (after retraining), the metrics right after
    the search, the kept fraction per tower and the FLOPs, of the compress run ``runs/name``, or of the dense
    ``runs/base`` for ``name`` "dense"."""
    if name == "dense":
        return {"metrics": TrainReport.read(runs / "base").metrics, "searched": None, "kept": {}, "flops": None}
    r = CompressReport.read(runs / name)
    return {
        "metrics": r.compressed.metrics,
        "searched": r.searched_metrics,
        "kept": r.kept_by_tower,
        "flops": r.compressed.flops,
        "dense_flops": r.dense.flops,
    }


@dataclass
class Runner:
    """A model, its optimizer, a Pruner for a search (None for plain training), and one training step of them."""

    step: Callable[[], None]
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    pruner: upop.Pruner | None


def training_runner(build: Callable, loss: Callable, search: bool) -> Runner:
    """``build()`` trained with ``loss(model)`` by AdamW, plain or as a UPop search (masks, sparsity loss,
    ``Pruner.step``; a schedule too long to re-rank in a benchmark's steps)."""
    torch.manual_seed(0)
    model = build().train()
    config = upop.PruneConfig(p=0.5, total_steps=10**6, align_attn=1, align_mlp=1)
    pruner = upop.Pruner(model, config) if search else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        value = loss(model) + (pruner.sparsity_loss() if pruner is not None else 0)
        opt.zero_grad()
        value.backward()
        opt.step()
        if pruner is not None:
            pruner.step()

    return Runner(step, model, opt, pruner)


def step_ratio(build: Callable, loss: Callable, rounds: int = 4, steps: int = 10) -> dict[str, float]:
    """Seconds per training step of ``build()`` with ``loss(model)``, plain vs a UPop search step: the fastest of
    interleaved rounds, fp32 on this machine; and their ratio."""
    runners = {"plain": training_runner(build, loss, False).step, "search": training_runner(build, loss, True).step}
    best = {k: float("inf") for k in runners}
    for r in range(rounds + 1):  # round 0 warms up
        for name, step in list(runners.items())[:: 1 if r % 2 else -1]:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if r:
                best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return {**best, "ratio": best["search"] / best["plain"]}
