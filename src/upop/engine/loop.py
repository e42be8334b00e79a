"""One training loop for base training, search and retraining: DDP-aware data loading, cosine LR, optional
bf16/fp16 autocast, progress bars, JSON-lines logs. It knows tasks only through the Task interface and pruning only
through ``Pruner.sparsity_loss`` / ``Pruner.step``."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler
from tqdm import tqdm

from upop.core.pruner import Pruner
from upop.engine.dist import DistInfo, unwrap
from upop.tasks.base import Task


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r + W, ... with no padding, so metrics summed over ranks count
    every sample exactly once."""

    def __init__(self, n: int, info: DistInfo) -> None:
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loaders(
    train: Dataset, val: Dataset, batch_size: int, info: DistInfo, seed: int
) -> tuple[DataLoader, DataLoader]:
    """``batch_size`` is per rank. The training order depends only on ``seed`` and the epoch."""
    if info.distributed:
        sampler: Sampler = DistributedSampler(
            train, info.world_size, info.rank, shuffle=True, seed=seed, drop_last=True
        )
    else:
        sampler = RandomSampler(train, generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True)
    val_loader = DataLoader(val, batch_size=batch_size, sampler=ShardSampler(len(val), info))
    if len(train_loader) == 0:
        from upop.errors import UPopError

        raise UPopError(f"the training set has {len(train)} samples, fewer than one batch of {batch_size} per rank")
    return train_loader, val_loader


class JsonlLog:
    """Appends one JSON object per line (main rank only)."""

    def __init__(self, path: Path | None, info: DistInfo) -> None:
        self.path = path if info.is_main else None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def amp_context(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    """(autocast context factory, grad scaler or None). bf16 where supported (CPU, Ampere+), else fp16 + scaler."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> Any:
    """Linear warm-up then cosine decay to 1% of the base LR."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> float:
    """Backward, optimizer step (through the fp16 scaler if any), zero grads. Returns the loss scale the gradients
    carried (1.0 without a scaler), which ``Pruner.step`` divides out of the mask gradients."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 1.0
    scaler.scale(loss).backward()
    scale = float(scaler.get_scale())
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass
class Phase:
    """One run of the loop: ``name`` labels the log ("train", "search", "retrain")."""

    name: str
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_steps: int = 0
    amp: bool = False
    log_every: int = 10
    keep_best: bool = False


def run_phase(
    model: nn.Module,
    task: Task,
    loaders: tuple[DataLoader, DataLoader],
    info: DistInfo,
    phase: Phase,
    pruner: Pruner | None = None,
    log: JsonlLog | None = None,
    evaluate_each_epoch: bool = True,
) -> dict[str, Any]:
    """Train ``model`` (DDP-wrapped or not) for ``phase.epochs`` epochs; returns {"history": [...], "best": metrics,
    "last": metrics}. With ``keep_best`` the best epoch's weights (by the task's main metric) are restored at the end.
    With a ``pruner`` the sparsity loss is added and ``pruner.step()`` follows every optimizer step."""
    train_loader, val_loader = loaders
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=phase.weight_decay)
    total_steps = phase.epochs * len(train_loader)
    scheduler = cosine_schedule(optimizer, total_steps, phase.warmup_steps)
    autocast, scaler = amp_context(info.device, phase.amp)
    log = log or JsonlLog(None, info)
    history, best, best_state = [], None, None
    step = 0
    model.train()
    for epoch in range(phase.epochs):
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        bar = tqdm(
            train_loader,
            desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
            disable=None if info.is_main else True,
            leave=False,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for batch in bar:
            batch = to_device(batch, info.device)
            with autocast():
                task_loss = task.loss(model, batch)
            sparsity = pruner.sparsity_loss() if pruner is not None else task_loss.new_zeros(())
            loss = task_loss.float() + sparsity
            grad_scale = backward_and_step(loss, optimizer, scaler)
            scheduler.step()
            if pruner is not None:
                pruner.step(grad_scale=grad_scale)
            step += 1
            if step % phase.log_every == 0 or step == total_steps:
                record = {
                    "phase": phase.name,
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": float(loss.detach()),
                    "task_loss": float(task_loss.detach()),
                    "sparsity_loss": float(sparsity.detach()),
                    "lr": scheduler.get_last_lr()[0],
                }
                if pruner is not None:
                    record.update(pruner.log_record())
                log.write(record)
                bar.set_postfix(
                    loss=f"{float(task_loss.detach()):.3f}", **({"pi": f"{pruner.pi:.3f}"} if pruner else {})
                )
        epoch_seconds = time.perf_counter() - start
        if not evaluate_each_epoch and epoch + 1 < phase.epochs:
            continue
        metrics = task.evaluate(model, val_loader, info.device)
        history.append({"epoch": epoch + 1, **metrics})
        log.write({"phase": phase.name, "epoch": epoch + 1, "step": step, "eval": metrics, "seconds": epoch_seconds})
        if best is None or metrics[task.main_metric] > best[task.main_metric]:
            best = metrics
            if phase.keep_best:
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()})
    if phase.keep_best and best_state is not None:
        unwrap(model).load_state_dict(best_state)
    return {"history": history, "best": best, "last": history[-1] if history else None}
