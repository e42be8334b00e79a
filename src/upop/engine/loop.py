"""One training loop for base training, search and retraining: DDP-aware data loading, cosine LR, optional
bf16/fp16 autocast, progress bars, JSON-lines logs. It knows tasks only through the ``Task`` protocol below and
pruning only through ``Pruner.sparsity_loss`` / ``Pruner.step``."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from upop.core.pruner import Pruner
from upop.engine import signals
from upop.engine.checkpoint import Checkpointer, Snapshot, set_rng_state
from upop.engine.loaders import EpochSampler, Loaders
from upop.engine.logs import JsonlLog, Progress
from upop.engine.selection import choose_epoch
from upop.errors import UPopError
from upop.utils.dist import DistInfo, unwrap


class Task(Protocol):
    """What the loop needs of a task (``upop.tasks.Task`` provides it): the outputs and loss of a batch, batch-level
    augmentation, distillation, its metrics on a loader and the main one of them; where a training step falls in its
    phase, and the training state the task carries between steps (saved in checkpoints)."""

    main_metric: str

    def outputs(self, model: nn.Module, batch: Any) -> Any: ...

    def loss_from(self, outputs: Any, batch: Any) -> torch.Tensor: ...

    def train_batch(self, batch: Any) -> Any: ...

    def distill_loss(self, student: Any, teacher: Any, temperature: float) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]: ...

    def begin_step(self, epoch: int, index: int, steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def amp_context(device: torch.device, enabled: bool) -> tuple[Any, torch.amp.GradScaler | None]:
    """(autocast context factory, grad scaler or None). bf16 where supported (CPU, Ampere+), else fp16 + scaler."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


LR_SCHEDULES = ("cosine", "epoch-cosine", "poly", "constant")
OPTIMIZERS = ("adamw", "sgd")
POLY_POWER = 0.9  # the polynomial decay of Segmenter's recipe (mmseg's default power)


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    min_lr_ratio: float = 0.01,
    steps_per_epoch: int = 1,
) -> Any:
    """Linear warm-up, then from the base LR down to ``min_lr_ratio`` of it: "cosine" (per step), "epoch-cosine" (the
    cosine of the epoch index, constant within an epoch: BLIP's ``cosine_lr_schedule``), "poly" ((1 - t)^0.9 per step,
    Segmenter's) or "constant" (the base LR throughout)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"LR schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    epochs = max(1, math.ceil(total_steps / max(1, steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "epoch-cosine":
            t = min(1.0, (step // max(1, steps_per_epoch)) / epochs)
        decay = (1 - t) ** POLY_POWER if kind == "poly" else 0.5 * (1 + math.cos(math.pi * t))
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params: Any, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (the default, BLIP's, CLIP's and DeiT's) or SGD with Nesterov momentum 0.9 (Segmenter's)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if kind != "adamw":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


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
    job for checkpoints; ``optimizer`` is "adamw" or "sgd" (Nesterov); ``schedule`` is the LR schedule (one of
    ``LR_SCHEDULES``, after ``warmup_steps``, down to ``min_lr_ratio`` of ``lr``);
    ``keep_best`` restores, at the end, the weights of the epoch best on the selection split when ``selection`` (one
    of ``upop.engine.selection.SELECTION_RULES``; "guarded" by default) lets it beat the last; ``max_nonfinite`` is the
    share of steps allowed to have non-finite gradients before the run stops; ``distill`` (alpha) mixes KL
    distillation from a teacher into the loss at ``temperature``: (1 - alpha) task + alpha KD."""

    name: str
    epochs: int
    lr: float
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: str = "cosine"
    optimizer: str = "adamw"
    min_lr_ratio: float = 0.01
    amp: bool = False
    log_every: int = 10
    keep_best: bool = False
    index: int = 0
    max_nonfinite: float = 0.1
    distill: float = 0.0
    temperature: float = 1.0
    selection: str = "guarded"


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


class _PhaseRun:
    """The state of one ``run_phase`` call, in short named steps: set-up and resume, one training step, logging,
    checkpoint policy, the end of an epoch (evaluation on the selection split, best so far), and the end."""

    def __init__(self, model, task, loaders, info, phase, pruner, log, checkpointer, extra, teacher) -> None:
        self.model, self.task, self.loaders, self.info, self.phase = model, task, loaders, info, phase
        self.pruner, self.checkpointer, self.extra, self.teacher = pruner, checkpointer, extra, teacher
        self.log = log or JsonlLog(None, info)
        self.optimizer = make_optimizer(model.parameters(), phase.optimizer, phase.lr, phase.weight_decay)
        if isinstance(loaders.train.sampler, EpochSampler):
            loaders.train.sampler.start = 0  # a resumed earlier phase may have left it mid-epoch; len() reads it
        self.steps_per_epoch = len(loaders.train)
        self.total_steps = phase.epochs * self.steps_per_epoch
        self.scheduler = lr_schedule(
            self.optimizer,
            self.total_steps,
            phase.warmup_steps,
            phase.schedule,
            phase.min_lr_ratio,
            self.steps_per_epoch,
        )
        self.autocast, self.scaler = amp_context(info.device, phase.amp)
        self.loop: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": None, "nonfinite": 0}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.saved: tuple[tuple[int, int], Path] | None = None  # the newest checkpoint this run wrote

    def restore(self, resume: Snapshot) -> None:
        unwrap(self.model).load_state_dict(resume.weights)
        self.optimizer.load_state_dict(resume.state["optimizer"])
        self.scheduler.load_state_dict(resume.state["scheduler"])
        if self.scaler is not None and resume.state.get("scaler"):
            self.scaler.load_state_dict(resume.state["scaler"])
        if self.pruner is not None:
            self.pruner.load_state_dict(resume.state["pruner"])
        self.task.load_state_dict(resume.state.get("task") or {})
        self.loop = dict(resume.meta["loop"])
        self.best_state = resume.best_weights
        if resume.rng:
            set_rng_state(resume.rng)

    def checkpoint(self) -> Path | None:
        if self.checkpointer is None:
            return None
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "pruner": self.pruner.state_dict() if self.pruner is not None else None,
            "task": self.task.state_dict(),
        }
        meta = {"loop": self.loop, "extra": self.extra or {}, "log_size": self.log.size()}
        key = (self.phase.index, self.loop["step"])
        if self.saved is not None and self.saved[0] == key:
            return self.saved[1]
        snap = Snapshot(key, self.phase.name, _weights(self.model), state, meta, self.best_state)
        self.saved = (key, self.checkpointer.save(snap))
        return self.saved[1]

    def losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """Task loss (mixed with distillation when asked), sparsity loss and their sum for one training batch."""
        batch = self.task.train_batch(to_device(batch, self.info.device))
        with self.autocast():
            out = self.task.outputs(self.model, batch)
            task_loss = self.task.loss_from(out, batch).float()
            losses = {"task_loss": task_loss}
            if self.teacher is not None and self.phase.distill > 0:
                with torch.no_grad():
                    teacher_out = self.task.outputs(self.teacher, batch)
                kd = self.task.distill_loss(out, teacher_out, self.phase.temperature).float()
                losses["distill_loss"] = kd
                task_loss = (1 - self.phase.distill) * task_loss + self.phase.distill * kd
        sparsity = self.pruner.sparsity_loss() if self.pruner is not None else task_loss.new_zeros(())
        losses.update(sparsity_loss=sparsity, loss=task_loss + sparsity)
        return losses

    def train_step(self, batch: Any) -> tuple[dict[str, torch.Tensor], bool]:
        losses = self.losses(batch)
        grad_scale, taken = backward_and_step(losses["loss"], self.optimizer, self.scaler)
        with warnings.catch_warnings():  # a skipped first optimizer step makes the scheduler warn; it is meant
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if self.pruner is not None:
            self.pruner.step(grad_scale=grad_scale, skip=not taken)
        self.loop["step"] += 1
        self.loop["batch"] += 1
        if not taken:
            self.loop["nonfinite"] += 1
            if self.loop["nonfinite"] > self.phase.max_nonfinite * self.total_steps:
                raise UPopError(
                    f"{self.phase.name}: {self.loop['nonfinite']} of {self.loop['step']} steps had non-finite loss or "
                    f"gradients, more than the allowed share {self.phase.max_nonfinite:g} of {self.total_steps} "
                    "steps; lower the learning rate, check the data, or run without --amp"
                )
        return losses, taken

    def log_step(self, epoch: int, losses: dict[str, torch.Tensor], taken: bool, progress: Progress) -> None:
        step = self.loop["step"]
        if step % self.phase.log_every == 0 or step == self.total_steps or not taken:
            record = {"phase": self.phase.name, "epoch": epoch + 1, "step": step}
            record.update({k: float(v.detach()) for k, v in losses.items()})
            record.update(lr=self.scheduler.get_last_lr()[0], nonfinite_steps=self.loop["nonfinite"])
            if self.pruner is not None:
                record.update(self.pruner.log_record())
            self.log.write(record)
        postfix = {"loss": lambda: f"{float(losses['task_loss'].detach()):.4f}"}
        if self.pruner is not None:
            postfix["pi"] = lambda: f"{self.pruner.pi:.3f}"
        progress.update(self.loop["batch"], postfix)

    def stop_if_asked(self) -> None:
        """Collective: stop every rank together on a signal (after a checkpoint) or on a log that cannot be written."""
        signum, log_failed = signals.requested(self.info, self.log.error is not None)
        if log_failed:
            why = self.log.error or "the main rank could not write its log"
            raise UPopError(f"{why} (the checkpoints are intact; free space, then rerun with --resume)")
        if signum:
            saved = self.checkpoint()
            where = f"checkpoint {saved}" if saved is not None else "no checkpoint (this loop writes none)"
            raise signals.Interrupted(signum, f"{self.phase.name} step {self.loop['step']}: {where}")

    def end_epoch(self, epoch: int, seconds: float) -> None:
        self.loop["epoch"], self.loop["batch"] = epoch + 1, 0
        select = self.loaders.select
        if select is not None and (self.phase.keep_best or self.evaluate_each_epoch):
            metrics = self.task.evaluate(self.model, select, self.info.device)
            self.loop["history"].append({"epoch": epoch + 1, **metrics})
            record = {"phase": self.phase.name, "epoch": epoch + 1, "step": self.loop["step"], "select": metrics}
            self.log.write({**record, "seconds": seconds})
            main = self.task.main_metric
            if self.loop["best"] is None or metrics[main] > self.loop["best"][main]:
                self.loop["best"] = {"epoch": epoch + 1, **metrics}
                if self.phase.keep_best:
                    self.best_state = _weights(self.model)
        if self.checkpointer is not None:
            self.checkpoint()

    def run(self, evaluate_each_epoch: bool, last: Callable[[nn.Module], Any] | None) -> dict[str, Any]:
        self.evaluate_each_epoch = evaluate_each_epoch
        train_loader = self.loaders.train
        sampler = train_loader.sampler
        self.model.train()
        for epoch in range(self.loop["epoch"], self.phase.epochs):
            if isinstance(sampler, EpochSampler):
                sampler.set_position(epoch, self.loop["batch"] * train_loader.batch_size)
            desc = f"{self.phase.name} epoch {epoch + 1}/{self.phase.epochs}"
            progress = Progress(train_loader, desc, self.info, self.steps_per_epoch, self.loop["batch"])
            start = time.perf_counter()
            for batch in progress:
                self.task.begin_step(epoch, self.loop["batch"], self.steps_per_epoch)
                losses, taken = self.train_step(batch)
                self.log_step(epoch, losses, taken, progress)
                every = self.checkpointer.every if self.checkpointer is not None else 0
                if every and self.loop["step"] % every == 0 and self.loop["batch"] < self.steps_per_epoch:
                    self.checkpoint()  # (the epoch-end checkpoint follows otherwise)
                self.stop_if_asked()
            progress.finish()
            self.end_epoch(epoch, time.perf_counter() - start)
            self.stop_if_asked()  # a signal during the evaluation: the epoch-end checkpoint is the one to resume
        last_metrics = last(self.model) if last is not None else None
        best = self.loop["best"]
        selection = self.selection() if self.phase.keep_best and best else None
        kept = selection["kept_epoch"] if selection else self.phase.epochs
        if kept != self.phase.epochs:
            if self.best_state is None or kept != best["epoch"]:
                raise RuntimeError(f"{self.phase.name}: no weights kept for epoch {kept}")
            unwrap(self.model).load_state_dict(self.best_state)
        return {
            "history": self.loop["history"],
            "best": best,
            "selected_epoch": kept,
            "selection": selection,
            "last": last_metrics,
            "nonfinite_steps": self.loop["nonfinite"],
        }

    def selection(self) -> dict[str, Any]:
        """The epoch to keep by the phase's rule (``upop.engine.selection``), the selection split's size and error."""
        history, main = self.loop["history"], self.task.main_metric
        size = len(self.loaders.select.dataset)
        error = self.task.standard_error(history[-1], size)
        return choose_epoch(history, main, error, self.phase.selection, size)


def run_phase(
    model: nn.Module,
    task: Task,
    loaders: Loaders,
    info: DistInfo,
    phase: Phase,
    pruner: Pruner | None = None,
    log: JsonlLog | None = None,
    evaluate_each_epoch: bool = True,
    checkpointer: Checkpointer | None = None,
    resume: Snapshot | None = None,
    extra: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    last: Callable[[nn.Module], Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (DDP-wrapped or not) for ``phase.epochs`` epochs; returns {"history": per-epoch metrics on the
    selection split, "best": the best of them (with its "epoch"), "selected_epoch", "selection": the rule's verdict
    (``upop.engine.selection.choose_epoch``; None without ``keep_best`` or a selection split), "last": ``last(model)``
    on the final weights (before others are restored; e.g. metrics on the report split), "nonfinite_steps"}.

    With ``keep_best`` the weights of the epoch best on the selection split (by the task's main metric) are restored
    at the end when ``phase.selection`` lets that epoch beat the last; without a selection split the last epoch is
    kept. With a ``pruner`` the sparsity loss is added and
    ``pruner.step()`` follows every optimizer step. With a ``teacher`` and ``phase.distill`` > 0 the loss mixes in
    KL distillation from it.

    With a ``checkpointer``, a checkpoint is written every ``checkpointer.every`` steps and at every epoch end
    (``extra``, JSON, is stored in it for the job). With ``resume`` (a checkpoint of this phase) the loop continues
    exactly where it was written: weights, optimizer, schedule, scaler, Pruner, RNG and position in the epoch.
    After every step the loop stops cleanly on SIGTERM/SIGINT (checkpoint, then ``signals.Interrupted``) and on a
    log that cannot be written (UPopError), every rank together."""
    state = _PhaseRun(model, task, loaders, info, phase, pruner, log, checkpointer, extra, teacher)
    if resume is not None:
        state.restore(resume)
    if teacher is not None:
        teacher.eval()
    return state.run(evaluate_each_epoch, last)
