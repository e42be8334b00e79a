"""Timing shared by the benchmarks."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def paired_latency(models: dict[str, Callable], x, iters: int, warmup: int = 5) -> tuple[dict, dict]:
    """Calls of every model (a module in eval mode, or any callable) on ``x`` back to back, ``iters`` times (the
    order alternating). Returns (median seconds per model, speedup of each model over models["dense"] as the median
    of the per-iteration ratios). Load from other tenants drifts slowly, so ratios of adjacent calls are far steadier
    than ratios of separate medians."""
    times: dict = {k: [] for k in models}
    for m in models.values():
        if isinstance(m, nn.Module):
            m.eval()
    with torch.inference_mode():
        for i in range(warmup + iters):
            for name, model in list(models.items())[:: 1 if i % 2 else -1]:
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    dense = times["dense"]
    speedup = {k: statistics.median(d / t for d, t in zip(dense, v)) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}, speedup


def emit_json(result: dict, out: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
