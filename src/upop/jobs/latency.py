"""The latency-table job: a model's latency per structure shape and kept width, measured on this machine, for
``compress --cost latency --latency-table`` on another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from upop.adapters import Pruner
from upop.core.config import PruneConfig
from upop.engine.rundir import json_bytes
from upop.errors import UPopError
from upop.jobs.common import RunConfig
from upop.models import build
from upop.tasks import get_task, task_class
from upop.utils import dist as D
from upop.utils.files import atomic_write

OUTPUTS = {"classifier": 1000, "segmenter": 150}  # a head of the real data's size (its cost is not pruned)


def latency_table(cfg: RunConfig, granularity: str, output: str) -> dict[str, Any]:
    """Measure the latency table of ``cfg.model``'s structures at the run's batch and input size on this machine and
    write it to ``output`` (for ``compress --cost latency --latency-table`` elsewhere)."""
    info = D.setup(cfg.device)
    kind = task_class(cfg.task).model_kind
    bundle = build(cfg.model, kind, OUTPUTS.get(kind, 0), cfg.data.image_size)
    model, size = bundle.model.to(info.device), bundle.image_size
    task = get_task(cfg.task, bundle, cfg.task_options())
    example = task.example_inputs(torch.randn(cfg.batch_size, 3, size, size, device=info.device), model)
    config = PruneConfig(cost="latency", granularity=granularity, align_attn=1, align_mlp=1)
    pruner = Pruner(model, config, example_inputs=example)
    pruner.detach()
    try:
        atomic_write(Path(output), json_bytes(pruner.latency_tables))
    except OSError as e:
        raise UPopError(f"cannot write {output}: {e.strerror or e}") from None
    return pruner.latency_tables
