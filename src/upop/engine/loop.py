"""One training loop for base training, search and retraining: DDP-aware data loading, cosine LR, optional
bf16/fp16 autocast, progress bars, JSON-lines logs. It knows tasks only through the Task interface and pruning only
through ``Pruner.sparsity_loss`` / ``Pruner.step``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from upop.core.pruner import Pruner
from upop.engine.checkpoint import Checkpointer, Snapshot, set_rng_state
from upop.engine.dist import DistInfo, unwrap
from upop.errors import UPopError
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


class EpochSampler(DistributedSampler):
    """The training sampler on any number of ranks: the order is a function of (seed, epoch) alone, and an epoch can
    start at any position (``start``, in samples), which is how a resumed run continues mid-epoch without reading the
    batches it already trained on."""

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int) -> None:
        super().__init__(dataset, info.world_size, info.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_loaders(
    train: Dataset, val: Dataset, batch_size: int, info: DistInfo, seed: int
) -> tuple[DataLoader, DataLoader]:
    """``batch_size`` is per rank. The training order depends only on ``seed`` and the epoch."""
    sampler = EpochSampler(train, info, seed)
    # the loader's own generator: starting an epoch draws from it, not from the global RNG a resume restores
    train_loader = DataLoader(
        train, batch_size=batch_size, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    val_loader = DataLoader(val, batch_size=batch_size, sampler=ShardSampler(len(val), info))
    if len(train_loader) == 0:
        raise UPopError(f"the training set has {len(train)} samples, fewer than one batch of {batch_size} per rank")
    return train_loader, val_loader


class JsonlLog:
    """Appends one JSON object per line (main rank only)."""

    def __init__(self, path: Path | None, info: DistInfo) -> None:
        self.path = path if info.is_main else None

    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None and self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop what was logged after a checkpoint, so a resumed run's log reads like an uninterrupted one."""
        if self.path is not None and self.path.exists():
            os.truncate(self.path, min(size, self.path.stat().st_size))

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
) -> tuple[float, bool]:
    """Backward, optimizer step (through the fp16 scaler if any), zero grads. Returns (the loss scale the gradients
    carried, 1.0 without a scaler, which ``Pruner.step`` divides out of the mask gradients; whether the step was
    taken). A step whose gradients are not finite is not taken: the weights stay as they were. The test is on the
    gradients, which DDP has averaged, so every rank takes the same decision."""
    if scaler is None:
        loss.backward()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 1.0, finite
    scaler.scale(loss).backward()
    scale = float(scaler.get_scale())
    scaler.step(optimizer)  # skipped by the scaler when a gradient is inf/NaN; it then lowers the scale
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return scale, float(scaler.get_scale()) >= scale


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
    """One run of the loop: ``name`` labels the log ("train", "search", "retrain"); ``index`` orders the phases of a
    job for checkpoints; ``max_nonfinite`` is the share of steps allowed to have non-finite gradients before the run
    stops."""

    name: str
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_steps: int = 0
    amp: bool = False
    log_every: int = 10
    keep_best: bool = False
    index: int = 0
    max_nonfinite: float = 0.1


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def run_phase(
    model: nn.Module,
    task: Task,
    loaders: tuple[DataLoader, DataLoader],
    info: DistInfo,
    phase: Phase,
    pruner: Pruner | None = None,
    log: JsonlLog | None = None,
    evaluate_each_epoch: bool = True,
    checkpointer: Checkpointer | None = None,
    resume: Snapshot | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (DDP-wrapped or not) for ``phase.epochs`` epochs; returns {"history": [...], "best": metrics,
    "last": metrics, "nonfinite_steps": n}. With ``keep_best`` the best epoch's weights (by the task's main metric)
    are restored at the end. With a ``pruner`` the sparsity loss is added and ``pruner.step()`` follows every
    optimizer step.

    With a ``checkpointer``, a checkpoint is written every ``checkpointer.every`` steps and at every epoch end
    (``extra``, JSON, is stored in it for the job). With ``resume`` (a checkpoint of this phase) the loop continues
    exactly where it was written: weights, optimizer, schedule, scaler, Pruner, RNG and position in the epoch."""
    train_loader, val_loader = loaders
    sampler = train_loader.sampler
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, weight_decay=phase.weight_decay)
    if isinstance(sampler, EpochSampler):
        sampler.start = 0
    steps_per_epoch = len(train_loader)
    total_steps = phase.epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, total_steps, phase.warmup_steps)
    autocast, scaler = amp_context(info.device, phase.amp)
    log = log or JsonlLog(None, info)
    loop: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": None, "nonfinite": 0}
    best_state: dict[str, torch.Tensor] | None = None
    if resume is not None:
        unwrap(model).load_state_dict(resume.weights)
        optimizer.load_state_dict(resume.state["optimizer"])
        scheduler.load_state_dict(resume.state["scheduler"])
        if scaler is not None and resume.state.get("scaler"):
            scaler.load_state_dict(resume.state["scaler"])
        if pruner is not None:
            pruner.load_state_dict(resume.state["pruner"])
        loop = dict(resume.meta["loop"])
        best_state = resume.best_weights
        if resume.rng:
            set_rng_state(resume.rng)

    def checkpoint() -> None:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "pruner": pruner.state_dict() if pruner is not None else None,
        }
        meta = {"loop": loop, "extra": extra or {}, "log_size": log.size()}
        snap = Snapshot((phase.index, loop["step"]), phase.name, _weights(model), state, meta, best_state)
        checkpointer.save(snap)

    model.train()
    for epoch in range(loop["epoch"], phase.epochs):
        if isinstance(sampler, EpochSampler):
            sampler.set_position(epoch, loop["batch"] * train_loader.batch_size)
        elif isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
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
            grad_scale, taken = backward_and_step(loss, optimizer, scaler)
            with warnings.catch_warnings():  # a skipped first optimizer step makes the scheduler warn; it is meant
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            if pruner is not None:
                pruner.step(grad_scale=grad_scale, skip=not taken)
            loop["step"] += 1
            loop["batch"] += 1
            step = loop["step"]
            if not taken:
                loop["nonfinite"] += 1
                if loop["nonfinite"] > phase.max_nonfinite * total_steps:
                    raise UPopError(
                        f"{phase.name}: {loop['nonfinite']} of {step} steps had non-finite loss or gradients, more "
                        f"than the allowed share {phase.max_nonfinite:g} of {total_steps} steps; lower the learning "
                        "rate, check the data, or run without --amp"
                    )
            if step % phase.log_every == 0 or step == total_steps or not taken:
                record = {
                    "phase": phase.name,
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": float(loss.detach()),
                    "task_loss": float(task_loss.detach()),
                    "sparsity_loss": float(sparsity.detach()),
                    "lr": scheduler.get_last_lr()[0],
                    "nonfinite_steps": loop["nonfinite"],
                }
                if pruner is not None:
                    record.update(pruner.log_record())
                log.write(record)
                bar.set_postfix(
                    loss=f"{float(task_loss.detach()):.3f}", **({"pi": f"{pruner.pi:.3f}"} if pruner else {})
                )
            if (
                checkpointer is not None
                and checkpointer.every
                and step % checkpointer.every == 0
                and loop["batch"] < steps_per_epoch  # the epoch-end checkpoint follows otherwise
            ):
                checkpoint()
        epoch_seconds = time.perf_counter() - start
        loop["epoch"], loop["batch"] = epoch + 1, 0
        if evaluate_each_epoch or epoch + 1 == phase.epochs:
            metrics = task.evaluate(model, val_loader, info.device)
            loop["history"].append({"epoch": epoch + 1, **metrics})
            record = {"phase": phase.name, "epoch": epoch + 1, "step": loop["step"], "eval": metrics}
            log.write({**record, "seconds": epoch_seconds})
            if loop["best"] is None or metrics[task.main_metric] > loop["best"][task.main_metric]:
                loop["best"] = metrics
                if phase.keep_best:
                    best_state = _weights(model)
        if checkpointer is not None:
            checkpoint()
    if phase.keep_best and best_state is not None:
        unwrap(model).load_state_dict(best_state)
    history = loop["history"]
    return {
        "history": history,
        "best": loop["best"],
        "last": history[-1] if history else None,
        "nonfinite_steps": loop["nonfinite"],
    }
