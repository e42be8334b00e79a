"""What every job shares: its configuration, the set-up (process group, model bundle, task, data, loaders), the
dense model's measurement, messages and stop points. No job imports another; what two jobs need lives here.

Numbers are honest by construction: the best epoch is chosen on the task's selection split and every reported metric
is measured on its report split (the last epoch's too); each report says which splits and settings produced it."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np
import torch

from upop.adapters import find_adapter
from upop.core import plan as P
from upop.core.profile import batch_size_of, measure_latency, profile
from upop.data import augment
from upop.data.config import DataConfig
from upop.data.splits import ROLES
from upop.engine import signals
from upop.engine.loaders import Loaders, make_loaders
from upop.engine.loop import Phase
from upop.engine.selection import check_rule
from upop.errors import UPopError
from upop.jobs.pretrained import Loaded, load_bundle
from upop.jobs.report import Measurement
from upop.models import ModelBundle, build, checkpointing
from upop.models.regularise import regularise
from upop.tasks import Task, TaskOptions, task_class
from upop.utils import dist as D


@dataclass(frozen=True)
class RunConfig:
    """What every job shares: task, model, data and loop settings (saved beside every output)."""

    task: str = "classification"
    model: str = "vit-tiny"
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 128
    seed: int = 0
    amp: bool = False
    device: str | None = None
    options: TaskOptions = field(default_factory=TaskOptions)
    drop_path: float | None = None  # stochastic depth of the image encoder (None: the model's own)
    text_dropout: float | None = None  # dropout of the text tower (None: the model's own)
    config_file: str | None = None  # the --config file the settings were read from, if any
    workers: int | str = "auto"  # loader processes per rank (upop.engine.loaders.resolve_workers)
    grad_checkpointing: bool = False  # recompute the blocks in the backward (upop.models.checkpointing)
    log_dir: str | None = None  # TensorBoard events (None: the run's tb/ when tensorboard is installed; "none": off)
    selection: str = "guarded"  # which epoch a phase keeps (upop.engine.selection.SELECTION_RULES)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # read back from config.json
            object.__setattr__(self, "data", DataConfig(**self.data))
        if isinstance(self.options, dict):
            known = {k: v for k, v in self.options.items() if k in TaskOptions.__dataclass_fields__}
            object.__setattr__(self, "options", TaskOptions(**known))
        if self.batch_size < 1:
            raise UPopError(f"batch size must be a positive integer, got {self.batch_size}")
        augment.check_batch_size(augment.resolve(self.data.augment, self.data.builtin), self.batch_size)
        check_rule(self.selection)

    def task_options(self) -> TaskOptions:
        return self.options

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = self.data.to_dict()
        return d


@dataclass
class Setup:
    """A job's world: the process group, the model bundle (dense weights loaded when given), the task built for it,
    the loaders of its three splits, and how the splits were made."""

    info: D.DistInfo
    bundle: ModelBundle
    task: Task
    loaders: Loaders
    num_outputs: int
    image_size: int
    splits: dict[str, Any]
    loaded: Loaded | None = None  # what the --pretrained checkpoint held (None: a compressed directory)

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model


def dense_bundle(cfg: RunConfig, num_outputs: int, device: torch.device, pretrained: str | None = None) -> ModelBundle:
    """The model of ``cfg`` seeded by ``cfg.seed`` (identical initial weights on every rank), with the ``pretrained``
    checkpoint loaded (dense, or compressed as the original UPop code saves it), on ``device``."""
    return loaded_bundle(cfg, num_outputs, device, pretrained).bundle


def loaded_bundle(cfg: RunConfig, num_outputs: int, device: torch.device, pretrained: str | None = None) -> Loaded:
    """``dense_bundle``, with what was read from the checkpoint (``upop.jobs.pretrained.Loaded``)."""
    loaded = load_bundle(cfg.model, cfg.task, pretrained, cfg.data.image_size, num_outputs, seed=cfg.seed)
    loaded.bundle.model = loaded.bundle.model.to(device)
    return loaded


def compressed_bundle(cfg: RunConfig, num_outputs: int, device: torch.device, directory: str) -> ModelBundle:
    """The model of a compressed directory (plan + weights): the architecture ``cfg`` names built with its
    parameters on the meta device (no dense weights are read or allocated, and an ``hf:``/``open_clip:`` spec's
    weight files need not exist), sliced by the plan, filled from the compressed weights, on ``device``."""
    with P.parameters_on_meta():
        bundle = build(cfg.model, task_class(cfg.task).model_kind, num_outputs, cfg.data.image_size, weights=False)
    bundle.model = P.load_compressed(bundle.model, directory, find_adapter).to(device)
    return bundle


def prepare(
    cfg: RunConfig, pretrained: str | None = None, compressed: str | None = None, training: bool = True
) -> Setup:
    """Process group, model bundle (dense, with ``pretrained`` weights, or the ``compressed`` directory's), task,
    data (train, select and report splits; the report split alone without ``training``) and loaders for ``cfg``."""
    info = D.setup(cfg.device)
    cls = task_class(cfg.task)
    num_outputs = cls.num_outputs(cfg.data)
    if compressed is not None:
        bundle, loaded = compressed_bundle(cfg, num_outputs, info.device, compressed), None
    else:
        loaded = loaded_bundle(cfg, num_outputs, info.device, pretrained)
        bundle = loaded.bundle
    regularise(bundle.model, cfg.drop_path, cfg.text_dropout)
    if cfg.grad_checkpointing:
        checkpointing.enable(bundle.model)
    task = cls(bundle, cfg.task_options())
    data = dataclasses.replace(cfg.data, image_size=bundle.image_size)
    if training and data.select_on == "report":  # the paper's protocol: nothing carved, the report split selects
        splits = task.datasets(dataclasses.replace(data, select_size=0), ROLES).selecting_on_report()
    else:
        splits = task.datasets(data, ROLES if training else ("report",))
    loaders = make_loaders(splits, cfg.batch_size, info, cfg.seed, cfg.workers)
    np.random.seed((cfg.seed * 1000 + info.rank) % 2**32)  # batch augmentation (Mixup) draws from numpy
    for note in bundle.notes:
        say(info, note)
    return Setup(info, bundle, task, loaders, num_outputs, int(bundle.image_size), splits.about, loaded)


def stop_point(info: D.DistInfo, where: str) -> None:
    """Between the steps of a job: stop cleanly if SIGTERM/SIGINT arrived (collective). The newest checkpoint is the
    one a resume continues from."""
    signum, _ = signals.requested(info)
    if signum:
        raise signals.Interrupted(signum, where)


def say(info: D.DistInfo, message: str) -> None:
    if info.is_main:
        print(f"upop: {message}", flush=True)


def warn(info: D.DistInfo, message: str) -> None:
    if info.is_main:
        print(f"upop: warning: {message}", file=sys.stderr, flush=True)


def provenance(cfg: RunConfig, setup: Setup, verdict: dict[str, Any] | None = None) -> dict[str, Any]:
    """What produced a report (the fields of ``upop.jobs.report.Report``): task, model, data, splits, how the kept
    epoch was chosen (the split, metric and rule, and the rule's ``verdict``: ``upop.engine.selection``), seed,
    device, versions, date."""
    return {
        "task": cfg.task,
        "model": cfg.model,
        "data": cfg.data.to_dict(),
        "splits": setup.splits,
        "selection": {
            "split": "select" if setup.loaders.select is not None else None,
            "metric": setup.task.main_metric,
            "rule": cfg.selection,
            **(verdict or {}),
        },
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "amp": cfg.amp,
        "device": str(setup.info.device),
        "world_size": setup.info.world_size,
        "upop_version": version("upop"),
        "torch_version": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report_eval(setup: Setup) -> Any:
    """The ``last`` callback of a phase: the task's metrics on the report split."""
    return lambda model: setup.task.evaluate(model, setup.loaders.report, setup.info.device)


def selected_metrics(result: dict[str, Any], phase: Phase, evaluate: Any, model: torch.nn.Module) -> dict:
    """Report-split metrics of the weights the phase kept: the last epoch's, unless another epoch was selected."""
    if result["selected_epoch"] == phase.epochs:
        return result["last"]
    return evaluate(model)


def example_inputs(setup: Setup, model: torch.nn.Module) -> Any:
    """The model's inputs for the first report-split batch (profiling, FLOPs cost, latency)."""
    example = setup.task.example_inputs(next(iter(setup.loaders.report)), model)
    return example.to(setup.info.device) if isinstance(example, torch.Tensor) else example


def measure(model: torch.nn.Module, setup: Setup, example: Any, metrics: dict[str, float] | None = None) -> Measurement:
    """Report-split metrics (unless given), params, FLOPs per sample and latency of ``model``."""
    if metrics is None:
        metrics = setup.task.evaluate(model, setup.loaders.report, setup.info.device)
    stats = profile(model, example)
    return Measurement(
        metrics=metrics,
        params=stats["params"],
        flops=stats["flops"] // batch_size_of(example),
        latency_ms=1000 * measure_latency(model, example),
    )


def device_name(device: str | None) -> str:
    info = D.setup(device)
    return torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else info.device.type
