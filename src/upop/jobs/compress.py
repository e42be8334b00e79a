"""The compress job: search (or a given plan) -> compress -> retrain -> evaluate -> save plan, weights and reports.
An interrupted run continues from its newest checkpoint and ends as if it had never stopped."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from upop.adapters import Pruner, apply_plan, find_adapter
from upop.core.config import MIN_RERANKINGS, PruneConfig
from upop.core.plan import Plan, check_base, plan_choice, save_compressed
from upop.core.profile import batch_size_of, paired_latency
from upop.core.ranking import schedule_summary
from upop.engine.loop import LR_SCHEDULES, OPTIMIZERS, Phase, run_phase
from upop.engine.rundir import Checkpointing, RunDir
from upop.errors import UPopError
from upop.jobs import render
from upop.jobs.common import (
    RunConfig,
    Setup,
    dense_bundle,
    example_inputs,
    measure,
    prepare,
    provenance,
    report_eval,
    say,
    selected_metrics,
    stop_point,
    warn,
)
from upop.jobs.report import CompressReport, LastEpoch, Measurement, Speed
from upop.utils import dist as D
from upop.utils.extras import available

LATENCY_PAIRS = 30  # back-to-back dense/compressed calls the speed-up is the median of


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
    schedule: str = "cosine"
    min_lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.05

    def min_lr_ratio(self, lr: float) -> float:
        """The floor of the decaying schedules as a fraction of ``lr``: ``min_lr / lr``, or 1% without ``min_lr``."""
        return 0.01 if self.min_lr is None else min(1.0, self.min_lr / lr)

    def __post_init__(self) -> None:
        if self.epochs_search < 0 or self.epochs < 0:
            raise UPopError(
                f"--epochs-search and --epochs must be >= 0, got {self.epochs_search} and {self.epochs} (a search "
                "needs at least 1 epoch; 0 only with --plan, which retrains a given plan)"
            )
        if not (self.lr_search > 0 and self.lr > 0):
            raise UPopError(f"learning rates must be positive, got --lr-search {self.lr_search} and --lr {self.lr}")
        for name, value in (("--lr-schedule-search", self.search_schedule), ("--lr-schedule", self.schedule)):
            if value not in LR_SCHEDULES:
                raise UPopError(f"{name} must be one of {', '.join(LR_SCHEDULES)}, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UPopError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.weight_decay < 0 or (self.min_lr is not None and self.min_lr < 0):
            raise UPopError(f"--weight-decay and --min-lr must be >= 0, got {self.weight_decay} and {self.min_lr}")
        if not 0.0 <= self.distill <= 1.0:
            raise UPopError(f"--distill-weight must lie in [0, 1], got {self.distill}")
        if self.temperature <= 0:
            raise UPopError(f"--distill-temperature must be positive, got {self.temperature}")


@dataclass(frozen=True)
class Settings:
    """One compress job's settings beyond the run's: the search, the recipe, the dense weights, a given plan."""

    prune: PruneConfig
    recipe: Recipe
    pretrained: str | None = None
    plan: Plan | None = None
    max_nonfinite: float = 0.1


@dataclass
class Searched:
    """What the report needs of the search (or of a given plan): the subnet's report-split metrics right after it,
    the kept fractions and the plan, and the search's own record."""

    metrics: dict[str, float] | None
    kept: dict[str, float]
    pruned_cost_fraction: float
    plan: dict[str, Any]
    nonfinite_mask_steps: int = 0
    nonfinite_steps: int = 0
    given_plan: bool = False
    rerankings: int | None = None
    interval: int | None = None
    alignment: dict[str, Any] | None = None
    latency_cost: dict[str, float] | None = None
    stability: dict[str, Any] | None = None


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
) -> CompressReport:
    """Search (T = epochs_search x steps per epoch), compress, retrain keeping the epoch best on the selection split,
    evaluate on the report split, save plan + weights + reports. ``prune.total_steps`` is replaced by the real T.
    With ``ckpt.resume`` an interrupted run continues from its newest checkpoint and ends as if it had never
    stopped. With a ``plan`` (another search's decision, or another tool's, for the same base architecture) there
    is no search: the dense model is sliced to it, then retrained and evaluated the same way."""
    if plan is None and recipe.epochs_search < 1:
        raise UPopError("a search needs --epochs-search >= 1 (0 only with --plan, which retrains a given plan)")
    if recipe.distill and cfg.options.momentum_distill:
        raise UPopError(
            "--distill (from the dense model) and --momentum-distill (BLIP's, from a moving average) are two "
            "teachers for one loss; choose one"
        )
    setup = prepare(cfg, pretrained)
    find_adapter(setup.model)  # fail before any work if the family is not supported
    if setup.loaded is not None and setup.loaded.compressed:
        raise UPopError(
            f"{pretrained} is a compressed checkpoint ({len(setup.loaded.summary()['structures'])} structures narrower "
            "than the dense model); compress starts from a dense one. Evaluate it with upop evaluate --pretrained"
        )
    prune = _checked(setup, cfg, prune, recipe, plan)
    settings = Settings(prune, recipe, pretrained, plan, max_nonfinite)
    config = {
        "run": cfg.to_dict(),
        "prune": prune.to_dict(),
        "recipe": dataclasses.asdict(recipe),
        "num_outputs": setup.num_outputs,
        "image_size": setup.image_size,
        "pretrained": pretrained,
    }
    with RunDir(output_dir, config, overwrite, ckpt or Checkpointing(), setup.info) as out:
        if out.done is not None:
            return CompressReport.from_dict(out.done)
        return _compress_in(setup, cfg, settings, out)


def _checked(setup: Setup, cfg: RunConfig, prune: PruneConfig, recipe: Recipe, plan: Plan | None) -> PruneConfig:
    """The search's configuration with the real T, after every check that must fail before the output exists."""
    model = setup.model
    if plan is not None:
        check_base(plan, model, cfg.model)
        prune = dataclasses.replace(prune, granularity=plan.config.get("granularity", prune.granularity))
        found = find_adapter(model).structures(model, prune.granularity)
        plan_choice([s for s in found if prune.searches(s)], plan)
    prune = dataclasses.replace(prune, total_steps=max(1, recipe.epochs_search * len(setup.loaders.train)))
    if plan is None:
        prune.check_schedule()
    if prune.latency_table is not None:
        try:
            json.loads(Path(prune.latency_table).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UPopError(f"cannot read the latency table {prune.latency_table}: {e}") from None
    return prune


def _compress_in(setup: Setup, cfg: RunConfig, settings: Settings, out: RunDir) -> CompressReport:
    """The job inside its output directory: dense measurement, search, retraining, measurement, files."""
    info, recipe = setup.info, settings.recipe
    model = setup.model
    teacher = copy.deepcopy(model).requires_grad_(False) if recipe.distill > 0 and recipe.epochs > 0 else None
    example = example_inputs(setup, model)
    retrain_from = out.resume_from(1)
    if retrain_from is None:
        search_from = out.resume_from(0)
        if search_from:
            dense = Measurement.from_dict(search_from.meta["extra"]["dense"])
        else:
            dense = measure(model, setup, example)
        stop_point(info, "after measuring the dense model")
        if settings.plan is not None:
            model, searched = _given(setup, model, settings, example)
        else:
            model, searched = _search(setup, model, settings, out, example, dense, cfg.amp)
    else:
        dense = Measurement.from_dict(retrain_from.meta["extra"]["dense"])
        searched = Searched(**retrain_from.meta["extra"]["searched"])
        model = apply_plan(model, Plan.from_dict(searched.plan))
    stop_point(info, "after the search")
    retrain, metrics = _retrain(setup, cfg, settings, model, out, dense, searched, teacher)
    stop_point(info, "after retraining")
    compressed = measure(model, setup, example, metrics)
    speed = _speed(cfg, setup, settings.pretrained, model, example)
    report = _report(cfg, setup, settings, dense, searched, retrain, compressed, speed, batch_size_of(example))
    _write(cfg, setup, settings, model, out, report)
    return report


def _search(
    setup: Setup,
    model: torch.nn.Module,
    settings: Settings,
    out: RunDir,
    example: Any,
    dense: Measurement,
    amp: bool,
) -> tuple[torch.nn.Module, Searched]:
    """The search phase: masks, progressive schedule, one ranking; returns the compressed model and what the
    report needs of the search (metrics on the report split right after it, kept fractions, plan)."""
    info, prune, recipe = setup.info, settings.prune, settings.recipe
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
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        min_lr_ratio=recipe.min_lr_ratio(recipe.lr_search),
        amp=amp,
        index=0,
        max_nonfinite=settings.max_nonfinite,
    )
    search = run_phase(
        D.wrap(model, info),
        setup.task,
        setup.loaders,
        info,
        phase,
        pruner=pruner,
        log=out.log,
        evaluate_each_epoch=False,
        checkpointer=out.checkpointer,
        resume=out.resume_from(0),
        extra={"dense": dense.to_dict()},
        last=report_eval(setup),
    )
    searched = _searched(pruner, search["last"], search["nonfinite_steps"])
    for message in searched.stability["warnings"]:
        warn(info, message)
    return pruner.compress(), searched


def _searched(pruner: Pruner, metrics: dict[str, float], nonfinite_steps: int) -> Searched:
    """What a finished search leaves for the report (masks exactly 0/1: the subnet before retraining)."""
    prune = pruner.config
    return Searched(
        metrics=metrics,
        kept={"attn": pruner.kept_fraction("attn"), "mlp": pruner.kept_fraction("mlp")},
        pruned_cost_fraction=pruner.pruned_cost_fraction(),
        plan=pruner.plan().to_dict(),
        nonfinite_mask_steps=pruner.skipped_steps,
        nonfinite_steps=nonfinite_steps,
        rerankings=prune.rerankings(),
        interval=pruner.interval,
        alignment=pruner.alignment.to_dict(),
        latency_cost=pruner.latency_summary(),
        stability=pruner.stability_summary(),
    )


def _given(setup: Setup, model: torch.nn.Module, settings: Settings, example: Any) -> tuple[torch.nn.Module, Searched]:
    """No search: the dense model sliced to a given plan; returns what the report needs, as ``_search`` does."""
    prune = dataclasses.replace(settings.prune, align_attn=1, align_mlp=1)
    pruner = Pruner(model, prune, example_inputs=example)
    pruner.set_choice(plan_choice(pruner.structures, settings.plan), 0.0)
    searched = Searched(
        metrics=None,
        kept={"attn": pruner.kept_fraction("attn"), "mlp": pruner.kept_fraction("mlp")},
        pruned_cost_fraction=pruner.pruned_cost_fraction(),
        plan=pruner.plan().to_dict(),
        given_plan=True,
    )
    model = pruner.compress(force=True)
    searched.metrics = setup.task.evaluate(model, setup.loaders.report, setup.info.device)
    return model, searched


def _retrain(
    setup: Setup,
    cfg: RunConfig,
    settings: Settings,
    model: torch.nn.Module,
    out: RunDir,
    dense: Measurement,
    searched: Searched,
    teacher: torch.nn.Module | None,
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Retrain the compressed model keeping the epoch best on the selection split; (the phase's result, the
    report-split metrics of the kept weights). Without retraining epochs, the subnet's."""
    recipe = settings.recipe
    retrain = {"nonfinite_steps": 0, "history": [], "selected_epoch": 0, "selection": None, "last": searched.metrics}
    if recipe.epochs == 0:
        return retrain, searched.metrics
    phase = Phase(
        "retrain",
        recipe.epochs,
        recipe.lr,
        schedule=recipe.schedule,
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        min_lr_ratio=recipe.min_lr_ratio(recipe.lr),
        amp=cfg.amp,
        keep_best=True,
        selection=cfg.selection,
        index=1,
        max_nonfinite=settings.max_nonfinite,
        distill=recipe.distill,
        temperature=recipe.temperature,
    )
    evaluate = report_eval(setup)
    retrain = run_phase(
        D.wrap(model, setup.info),
        setup.task,
        setup.loaders,
        setup.info,
        phase,
        log=out.log,
        checkpointer=out.checkpointer,
        resume=out.resume_from(1),
        extra={"dense": dense.to_dict(), "searched": dataclasses.asdict(searched)},
        teacher=teacher,
        last=evaluate,
    )
    return retrain, selected_metrics(retrain, phase, evaluate, model)


def _speed(cfg: RunConfig, setup: Setup, pretrained: str | None, model: torch.nn.Module, example: Any) -> Speed:
    """The compressed model against the dense one on the run's device, called back to back (median of per-call
    ratios); a warning when the compressed model is slower."""
    reference = dense_bundle(cfg, setup.num_outputs, setup.info.device, pretrained).model
    latency, speedup = paired_latency({"dense": reference, "compressed": model}, example, iters=LATENCY_PAIRS)
    del reference
    speed = Speed(
        dense_ms=1000 * latency["dense"],
        compressed_ms=1000 * latency["compressed"],
        speedup=speedup["compressed"],
        pairs=LATENCY_PAIRS,
        batch=batch_size_of(example),
        device=str(setup.info.device),
    )
    if speed.speedup < 1:
        warn(
            setup.info,
            f"the compressed model is {render.speed_text(speed.speedup)} than dense on {speed.device} (batch "
            f"{speed.batch}, median of {LATENCY_PAIRS} back-to-back pairs): its widths run below full speed here; "
            "try --align-attn 8 --align-mlp 8, or --align-attn auto --align-mlp auto on the device it will run on",
        )
    return speed


def _per_structure(model: torch.nn.Module, granularity: str) -> list[dict[str, Any]]:
    """One row per structure of the compressed model's plan: kept and dense sizes, unit, tower (and, for mixed
    granularity, the kept heads x head_dim)."""
    rows = []
    for s in model._upop_plan.structures:
        row = {
            "name": s["name"],
            "kind": s["kind"],
            "unit": render.unit_of(s["kind"], granularity),
            "tower": s.get("tower", "vision"),
            "kept": len(s["kept"]),
            "size": s["size"],
        }
        if granularity == "mixed" and s["kind"] == "attn" and "grid" in s:
            dims = s["grid"][1]
            row.update(heads=len({k // dims for k in s["kept"]}), head_dim=len({k % dims for k in s["kept"]}))
        rows.append(row)
    return rows


def _report(
    cfg: RunConfig,
    setup: Setup,
    settings: Settings,
    dense: Measurement,
    searched: Searched,
    retrain: dict[str, Any],
    compressed: Measurement,
    speed: Speed,
    latency_batch: int,
) -> CompressReport:
    prune, recipe = settings.prune, settings.recipe
    compressed.epoch = retrain["selected_epoch"]
    per_structure = _per_structure(setup.model, prune.granularity)
    return CompressReport(
        **provenance(cfg, setup, retrain["selection"]),
        p=prune.p,
        cost=prune.cost,
        allocation=prune.allocation,
        granularity=prune.granularity,
        prune=prune.to_dict(),
        recipe=dataclasses.asdict(recipe),
        given_plan=searched.given_plan,
        rerankings=searched.rerankings,
        alignment=searched.alignment,
        latency_cost=searched.latency_cost,
        stability=searched.stability,
        latency_batch=latency_batch,
        speed=speed,
        slower_than_dense=speed.speedup < 1,
        dense=dense,
        compressed=compressed,
        compressed_last=LastEpoch(retrain["last"], recipe.epochs),
        retrain_history=retrain["history"],
        searched_metrics=searched.metrics,
        kept=searched.kept,
        pruned_cost_fraction=searched.pruned_cost_fraction,
        nonfinite_search_steps=searched.nonfinite_mask_steps,
        nonfinite_steps={"search": searched.nonfinite_steps, "retrain": retrain["nonfinite_steps"]},
        per_structure=per_structure,
        kept_by_tower=render.kept_by_tower(per_structure),
    )


def _write(
    cfg: RunConfig, setup: Setup, settings: Settings, model: torch.nn.Module, out: RunDir, report: CompressReport
) -> None:
    """report.md, kept.png and the task's files, then plan + weights and report.json (last)."""
    info, task = setup.info, setup.task
    text = render.report_header(report) + "\n\n" + render.comparison_table(report) + "\n"
    files = {"report.md": text.encode()}
    pictures = available("matplotlib")
    if info.is_main:
        if pictures:
            title = f"{cfg.model}, p={settings.prune.p} ({settings.prune.allocation})"
            files["kept.png"] = render.heatmap_png(report.per_structure, title)
            out.log.image("kept widths", files["kept.png"])
        else:
            warn(info, "matplotlib is not installed, so no pictures are written (kept.png); pip install 'upop[plots]'")
        dense = None
        if task.pictures_need_dense and pictures:
            dense = dense_bundle(cfg, setup.num_outputs, info.device, settings.pretrained).model.eval()
        files.update(task.extra_files(model, info.device, cfg.batch_size, dense))
        del dense
    out.finish(report.to_dict(), files, lambda d: save_compressed(model, d))
