"""The three jobs behind the CLI: train a dense base model, compress (search -> compress -> retrain -> evaluate ->
save), evaluate a saved model.

Numbers are honest by construction: the best epoch is chosen on the task's selection split and every reported metric
is measured on its report split (the last epoch's too); each report says which splits and settings produced it."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

import upop
from upop.adapters import Pruner, apply_plan, find_adapter
from upop.core.config import MIN_RERANKINGS, PruneConfig
from upop.utils.files import atomic_write
from upop.core.plan import Plan, check_base, plan_choice, save_compressed
from upop.core.profile import batch_size_of, measure_latency, paired_latency, profile
from upop.core.ranking import schedule_summary
from upop.data import augment
from upop.deploy import load_compressed
from upop.utils import dist as D
from upop.engine import signals
from upop.engine.loop import LR_SCHEDULES, Loaders, Phase, make_loaders, run_phase
from upop.engine.rundir import Checkpointing, RunDir, json_bytes, read_run_config  # noqa: F401  (the jobs' API)
from upop.errors import UPopError
from upop.models import build_model, default_image_size, load_weights, model_image_size
from upop.report import comparison_table, heatmap_png, kept_by_tower, report_header, speed_text, unit_of
from upop.tasks import get_task
from upop.tasks.base import DataConfig


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
    vqa_inference: str = "rank"

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # read back from config.json
            object.__setattr__(self, "data", DataConfig(**self.data))
        if self.batch_size < 1:
            raise UPopError(f"batch size must be a positive integer, got {self.batch_size}")
        augment.check_batch_size(augment.resolve(self.data.augment, self.data.builtin), self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = self.data.to_dict()
        return d


@dataclass(frozen=True)
class Recipe:
    """How a compress job trains: search and retraining epochs and learning rates, the search's LR schedule
    ("constant", the reference's, or "cosine"), and distillation from the dense model during retraining
    (``distill`` = alpha of (1 - alpha) task + alpha KD, 0 = off; ``temperature`` T)."""

    epochs_search: int = 2
    epochs: int = 2
    lr_search: float = 5e-4
    lr: float = 5e-4
    search_schedule: str = "constant"
    distill: float = 0.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.epochs_search < 0 or self.epochs < 0:
            raise UPopError(
                f"--epochs-search and --epochs must be >= 0, got {self.epochs_search} and {self.epochs} (a search "
                "needs at least 1 epoch; 0 only with --plan, which retrains a given plan)"
            )
        if not (self.lr_search > 0 and self.lr > 0):
            raise UPopError(f"learning rates must be positive, got --lr-search {self.lr_search} and --lr {self.lr}")
        if self.search_schedule not in LR_SCHEDULES:
            raise UPopError(
                f"the search LR schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.search_schedule!r}"
            )
        if not 0.0 <= self.distill <= 1.0:
            raise UPopError(f"--distill-weight must lie in [0, 1], got {self.distill}")
        if self.temperature <= 0:
            raise UPopError(f"--distill-temperature must be positive, got {self.temperature}")


@dataclass
class Setup:
    info: D.DistInfo
    task: Any
    loaders: Loaders
    num_outputs: int
    image_size: int
    splits: dict[str, Any]


def prepare(cfg: RunConfig) -> Setup:
    """Process group, task, data (train, select and report splits) and loaders for ``cfg``."""
    info = D.setup(cfg.device)
    task = get_task(cfg.task)
    task.configure({"vqa_inference": cfg.vqa_inference, "model": cfg.model})
    image_size = cfg.data.image_size or default_image_size(cfg.model)
    if image_size is None:
        image_size = model_image_size(build_model(cfg.model, 1, kind=task.model_kind))
    splits = task.datasets(dataclasses.replace(cfg.data, image_size=image_size))
    loaders = make_loaders(splits, cfg.batch_size, info, cfg.seed)
    np.random.seed((cfg.seed * 1000 + info.rank) % 2**32)  # batch augmentation (Mixup) draws from numpy
    return Setup(info, task, loaders, task.num_outputs(splits.train), image_size, splits.about)


def new_model(cfg: RunConfig, setup: Setup, pretrained: str | None = None) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, setup.num_outputs, cfg.data.image_size, kind=setup.task.model_kind)
    if pretrained:
        load_weights(model, pretrained)
    return model.to(setup.info.device)


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


def _provenance(cfg: RunConfig, setup: Setup) -> dict[str, Any]:
    """What produced a report: task, model, data, splits, seed, device, versions, date."""
    return {
        "task": cfg.task,
        "model": cfg.model,
        "data": cfg.data.to_dict(),
        "splits": setup.splits,
        "selection": {
            "split": "select" if setup.loaders.select is not None else None,
            "metric": setup.task.main_metric,
        },
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "amp": cfg.amp,
        "device": str(setup.info.device),
        "world_size": setup.info.world_size,
        "upop_version": upop.__version__,
        "torch_version": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _report_eval(task: Any, loaders: Loaders, info: D.DistInfo) -> Any:
    """The ``last`` callback of a phase: the task's metrics on the report split."""
    return lambda model: task.evaluate(model, loaders.report, info.device)


def _selected_metrics(result: dict[str, Any], phase: Phase, evaluate: Any, model: torch.nn.Module) -> dict:
    """Report-split metrics of the weights the phase kept: the last epoch's, unless another epoch was selected."""
    if result["selected_epoch"] == phase.epochs:
        return result["last"]
    return evaluate(model)


def train(
    cfg: RunConfig,
    epochs: int,
    lr: float,
    output_dir: str,
    overwrite: bool = False,
    ckpt: Checkpointing | None = None,
    max_nonfinite: float = 0.1,
) -> dict[str, Any]:
    """Train a dense base model, keeping the epoch best on the selection split; writes model.safetensors,
    config.json, log.jsonl, report.json (metrics on the report split, of the selected and of the last epoch)."""
    if not (isinstance(epochs, int) and epochs >= 1):
        raise UPopError(f"--epochs must be a positive integer, got {epochs}")
    if not lr > 0:
        raise UPopError(f"--lr must be positive, got {lr}")
    setup = prepare(cfg)
    model = new_model(cfg, setup)
    config = {
        "run": cfg.to_dict(),
        "num_outputs": setup.num_outputs,
        "image_size": setup.image_size,
        "epochs": epochs,
        "lr": lr,
    }
    with RunDir(output_dir, config, overwrite, ckpt or Checkpointing(), setup.info) as out:
        if out.done is not None:
            return out.done
        phase = Phase(
            "train",
            epochs,
            lr,
            warmup_steps=min(200, epochs * len(setup.loaders.train) // 10),
            amp=cfg.amp,
            keep_best=True,
            max_nonfinite=max_nonfinite,
        )
        evaluate = _report_eval(setup.task, setup.loaders, setup.info)
        result = run_phase(
            D.wrap(model, setup.info),
            setup.task,
            setup.loaders,
            setup.info,
            phase,
            log=out.log,
            checkpointer=out.checkpointer,
            resume=out.resume_from(0),
            last=evaluate,
        )
        stop_point(setup.info, "after training")
        report = {
            **_provenance(cfg, setup),
            "epochs": epochs,
            "lr": lr,
            "metrics": _selected_metrics(result, phase, evaluate, model),
            "selected_epoch": result["selected_epoch"],
            "metrics_last": result["last"],
            "history": result["history"],
            "nonfinite_steps": {"train": result["nonfinite_steps"]},
        }
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        files = {"model.safetensors": save(weights)}
        if setup.info.is_main:
            files.update(setup.task.extra_files(model, setup.info.device, cfg.batch_size))
        out.finish(report, files)
    return report


def _example(task: Any, loaders: Loaders, model: torch.nn.Module, info: D.DistInfo) -> Any:
    example = task.example_inputs(next(iter(loaders.report)), model)
    return example.to(info.device) if isinstance(example, torch.Tensor) else example


def _measure(
    model: torch.nn.Module,
    task: Any,
    loaders: Loaders,
    info: D.DistInfo,
    example: Any,
    metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Report-split metrics (unless given), params, FLOPs per sample and latency of ``model``."""
    metrics = metrics if metrics is not None else task.evaluate(model, loaders.report, info.device)
    stats = profile(model, example)
    return {
        "metrics": metrics,
        "params": stats["params"],
        "flops": stats["flops"] // batch_size_of(example),
        "latency_ms": 1000 * measure_latency(model, example),
    }


def _search(
    setup: Setup,
    model: torch.nn.Module,
    prune: PruneConfig,
    recipe: Recipe,
    out: RunDir,
    example: Any,
    dense: dict[str, Any],
    max_nonfinite: float,
    amp: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The search phase: masks, progressive schedule, one ranking; returns the compressed model and what the
    report needs of the search (metrics on the report split right after it, kept fractions, plan)."""
    info, task, loaders = setup.info, setup.task, setup.loaders
    pruner = Pruner(model, prune, example_inputs=example)
    say(info, schedule_summary(prune.p, prune.total_steps, prune.rank_steps(), pruner.interval))
    if prune.total_steps < MIN_RERANKINGS:
        warn(
            info,
            f"the search has only {prune.total_steps} steps, too few for progressive pruning to rank "
            "reliably; use more --epochs-search or a smaller --batch-size",
        )
    phase = Phase(
        "search",
        recipe.epochs_search,
        recipe.lr_search,
        schedule=recipe.search_schedule,
        amp=amp,
        index=0,
        max_nonfinite=max_nonfinite,
    )
    search = run_phase(
        D.wrap(model, info),
        task,
        loaders,
        info,
        phase,
        pruner=pruner,
        log=out.log,
        evaluate_each_epoch=False,
        checkpointer=out.checkpointer,
        resume=out.resume_from(0),
        extra={"dense": dense},
        last=_report_eval(task, loaders, info),
    )
    searched = {  # measured after the last step, masks exactly 0/1: the subnet before retraining
        "metrics": search["last"],
        "kept": {"attn": pruner.kept_fraction("attn"), "mlp": pruner.kept_fraction("mlp")},
        "pruned_cost_fraction": pruner.pruned_cost_fraction(),
        "nonfinite_mask_steps": pruner.skipped_steps,
        "nonfinite_steps": search["nonfinite_steps"],
        "plan": pruner.plan().to_dict(),
        "rerankings": prune.rerankings(),
        "interval": pruner.interval,
        "alignment": pruner.alignment.to_dict(),
        "latency_cost": pruner.latency_summary(),
        "stability": pruner.stability_summary(),
    }
    for message in searched["stability"]["warnings"]:
        warn(info, message)
    return pruner.compress(), searched


def _given(
    setup: Setup, model: torch.nn.Module, prune: PruneConfig, plan: Plan, example: Any
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """No search: the dense model sliced to a given plan; returns what the report needs, as ``_search`` does."""
    pruner = Pruner(model, dataclasses.replace(prune, align_attn=1, align_mlp=1), example_inputs=example)
    chosen = plan_choice(pruner.structures, plan)
    pruner.set_choice(chosen, 0.0)
    searched = {
        "metrics": None,
        "kept": {"attn": pruner.kept_fraction("attn"), "mlp": pruner.kept_fraction("mlp")},
        "pruned_cost_fraction": pruner.pruned_cost_fraction(),
        "nonfinite_mask_steps": 0,
        "nonfinite_steps": 0,
        "plan": pruner.plan().to_dict(),
        "given_plan": True,
    }
    model = pruner.compress(force=True)
    searched["metrics"] = setup.task.evaluate(model, setup.loaders.report, setup.info.device)
    return model, searched


def compress(
    cfg: RunConfig,
    prune: PruneConfig,
    pretrained: str | None,
    recipe: Recipe,
    output_dir: str,
    overwrite: bool = False,
    ckpt: Checkpointing | None = None,
    max_nonfinite: float = 0.1,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """Search (T = epochs_search x steps per epoch), compress, retrain keeping the epoch best on the selection split,
    evaluate on the report split, save plan + weights + reports. ``prune.total_steps`` is replaced by the real T.
    With ``ckpt.resume`` an interrupted run continues from its newest checkpoint and ends as if it had never
    stopped. With a ``plan`` (another search's decision, or another tool's, for the same base architecture) there
    is no search: the dense model is sliced to it, then retrained and evaluated the same way."""
    if plan is None and recipe.epochs_search < 1:
        raise UPopError("a search needs --epochs-search >= 1 (0 only with --plan, which retrains a given plan)")
    setup = prepare(cfg)
    info, loaders = setup.info, setup.loaders
    model = new_model(cfg, setup, pretrained)
    find_adapter(model)  # fail before any work if the family is not supported
    if plan is not None:
        check_base(plan, model, cfg.model)
        prune = dataclasses.replace(prune, granularity=plan.config.get("granularity", prune.granularity))
        found = find_adapter(model).structures(model, prune.granularity)
        plan_choice([s for s in found if prune.searches(s)], plan)  # refused before any output exists
    prune = dataclasses.replace(prune, total_steps=max(1, recipe.epochs_search * len(loaders.train)))
    if plan is None:
        prune.check_schedule()
    if prune.latency_table is not None:  # before the output directory exists
        try:
            json.loads(Path(prune.latency_table).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UPopError(f"cannot read the latency table {prune.latency_table}: {e}") from None
    config = {
        "run": cfg.to_dict(),
        "prune": prune.to_dict(),
        "recipe": dataclasses.asdict(recipe),
        "num_outputs": setup.num_outputs,
        "image_size": setup.image_size,
        "pretrained": pretrained,
    }
    with RunDir(output_dir, config, overwrite, ckpt or Checkpointing(), info) as out:
        if out.done is not None:
            return out.done
        return _compress_in(setup, cfg, prune, recipe, model, out, max_nonfinite, pretrained, plan)


def _speed(cfg: RunConfig, setup: Setup, pretrained: str | None, model: torch.nn.Module, example: Any) -> dict:
    """The compressed model against the dense one on the run's device, called back to back (median of per-call
    ratios); a warning when the compressed model is slower."""
    reference = new_model(cfg, setup, pretrained)
    pairs = 30
    latency, speedup = paired_latency({"dense": reference, "compressed": model}, example, iters=pairs)
    del reference
    speed = {
        "dense_ms": 1000 * latency["dense"],
        "compressed_ms": 1000 * latency["compressed"],
        "speedup": speedup["compressed"],
        "pairs": pairs,
        "batch": batch_size_of(example),
        "device": str(setup.info.device),
    }
    if speed["speedup"] < 1:
        warn(
            setup.info,
            f"the compressed model is {speed_text(speed['speedup'])} than dense on {speed['device']} (batch "
            f"{speed['batch']}, median of {pairs} back-to-back pairs): its widths run below full speed here; try "
            "--align-attn 8 --align-mlp 8, or --align-attn auto --align-mlp auto on the device it will run on",
        )
    return speed


def _compress_in(
    setup: Setup,
    cfg: RunConfig,
    prune: PruneConfig,
    recipe: Recipe,
    model: torch.nn.Module,
    out: RunDir,
    max_nonfinite: float,
    pretrained: str | None,
    plan: Plan | None = None,
) -> dict[str, Any]:
    info, task, loaders = setup.info, setup.task, setup.loaders
    teacher = copy.deepcopy(model).requires_grad_(False) if recipe.distill > 0 and recipe.epochs > 0 else None
    example = _example(task, loaders, model, info)
    retrain_from = out.resume_from(1)
    if retrain_from is None:
        search_from = out.resume_from(0)
        dense = search_from.meta["extra"]["dense"] if search_from else _measure(model, task, loaders, info, example)
        stop_point(info, "after measuring the dense model")
        if plan is not None:
            model, searched = _given(setup, model, prune, plan, example)
        else:
            model, searched = _search(setup, model, prune, recipe, out, example, dense, max_nonfinite, cfg.amp)
    else:
        dense, searched = retrain_from.meta["extra"]["dense"], retrain_from.meta["extra"]["searched"]
        model = apply_plan(model, Plan.from_dict(searched["plan"]))
    stop_point(info, "after the search")
    retrain = {"nonfinite_steps": 0, "history": [], "selected_epoch": 0, "last": searched["metrics"]}
    metrics = searched["metrics"]
    if recipe.epochs > 0:
        phase = Phase(
            "retrain",
            recipe.epochs,
            recipe.lr,
            amp=cfg.amp,
            keep_best=True,
            index=1,
            max_nonfinite=max_nonfinite,
            distill=recipe.distill,
            temperature=recipe.temperature,
        )
        evaluate = _report_eval(task, loaders, info)
        retrain = run_phase(
            D.wrap(model, info),
            task,
            loaders,
            info,
            phase,
            log=out.log,
            checkpointer=out.checkpointer,
            resume=retrain_from,
            extra={"dense": dense, "searched": searched},
            teacher=teacher,
            last=evaluate,
        )
        metrics = _selected_metrics(retrain, phase, evaluate, model)
    stop_point(info, "after retraining")
    compressed = _measure(model, task, loaders, info, example, metrics)
    speed = _speed(cfg, setup, pretrained, model, example)
    report = {
        **_provenance(cfg, setup),
        "p": prune.p,
        "cost": prune.cost,
        "allocation": prune.allocation,
        "granularity": prune.granularity,
        "prune": prune.to_dict(),
        "recipe": dataclasses.asdict(recipe),
        "given_plan": bool(searched.get("given_plan")),
        "rerankings": searched.get("rerankings"),
        "alignment": searched.get("alignment"),
        "latency_cost": searched.get("latency_cost"),
        "stability": searched.get("stability"),
        "latency_batch": batch_size_of(example),
        "speed": speed,
        "slower_than_dense": speed["speedup"] < 1,
        "dense": dense,
        "compressed": {**compressed, "epoch": retrain["selected_epoch"]},
        "compressed_last": {"metrics": retrain["last"], "epoch": recipe.epochs},
        "retrain_history": retrain["history"],
        "searched_metrics": searched["metrics"],
        "kept": searched["kept"],
        "pruned_cost_fraction": searched["pruned_cost_fraction"],
        "nonfinite_search_steps": searched["nonfinite_mask_steps"],
        "nonfinite_steps": {"search": searched["nonfinite_steps"], "retrain": retrain["nonfinite_steps"]},
        "per_structure": [
            {
                "name": s["name"],
                "kind": s["kind"],
                "unit": unit_of(s["kind"], prune.granularity),
                "tower": s.get("tower", "vision"),
                "kept": len(s["kept"]),
                "size": s["size"],
                **_grid_kept(s, prune.granularity),
            }
            for s in model._upop_plan.structures
        ],
    }
    report["kept_by_tower"] = kept_by_tower(report["per_structure"])
    files = {"report.md": (report_header(report) + "\n\n" + comparison_table(report) + "\n").encode()}
    if info.is_main:
        files["kept.png"] = heatmap_png(report["per_structure"], f"{cfg.model}, p={prune.p} ({prune.allocation})")
        dense = new_model(cfg, setup, pretrained).eval() if task.pictures_need_dense else None
        files.update(task.extra_files(model, info.device, cfg.batch_size, dense))
        del dense
    out.finish(report, files, lambda d: save_compressed(model, d))
    return report


def device_name(device: str | None) -> str:
    info = D.setup(device)
    return torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else info.device.type


def _grid_kept(entry: dict[str, Any], granularity: str) -> dict[str, int]:
    """For an attention structure of mixed granularity, the heads and head dims it keeps (its plan keeps pairs)."""
    if granularity != "mixed" or entry["kind"] != "attn" or "grid" not in entry:
        return {}
    dims = entry["grid"][1]
    return {"heads": len({k // dims for k in entry["kept"]}), "head_dim": len({k % dims for k in entry["kept"]})}


def latency_table(cfg: RunConfig, granularity: str, output: str) -> dict[str, Any]:
    """Measure the latency table of ``cfg.model``'s structures at the run's batch and input size on this machine and
    write it to ``output`` (for ``compress --cost latency --latency-table`` elsewhere)."""
    info = D.setup(cfg.device)
    task = get_task(cfg.task)
    size = cfg.data.image_size or default_image_size(cfg.model)
    outputs = {"classifier": 1000, "segmenter": 150}.get(task.model_kind, 0)
    model = build_model(cfg.model, outputs, size, kind=task.model_kind)
    size = size or model_image_size(model)
    model = model.to(info.device)
    example = task.example_inputs(torch.randn(cfg.batch_size, 3, size, size, device=info.device), model)
    config = PruneConfig(cost="latency", granularity=granularity, align_attn=1, align_mlp=1)
    pruner = Pruner(model, config, example_inputs=example)
    pruner.detach()
    try:
        atomic_write(Path(output), json_bytes(pruner.latency_tables))
    except OSError as e:
        raise UPopError(f"cannot write {output}: {e.strerror or e}") from None
    return pruner.latency_tables


def evaluate(cfg: RunConfig, compressed: str | None = None, pretrained: str | None = None) -> dict[str, Any]:
    """Metrics on the report split, params, FLOPs and latency of a compressed directory (plan + weights) or a dense
    checkpoint."""
    if (compressed is None) == (pretrained is None):
        raise UPopError("evaluate needs exactly one of --compressed DIR or --pretrained FILE")
    setup = prepare(cfg)
    if compressed is not None:

        def build() -> torch.nn.Module:  # the architecture the flags name, on meta: no dense weights are read
            return build_model(cfg.model, setup.num_outputs, cfg.data.image_size, setup.task.model_kind, False)

        model = load_compressed(build, compressed).to(setup.info.device)
    else:
        model = new_model(cfg, setup, pretrained)
    example = _example(setup.task, setup.loaders, model, setup.info)
    return {**_measure(model, setup.task, setup.loaders, setup.info, example), "split": setup.splits["report"]}
