"""The three jobs behind the CLI: train a dense base model, compress (search -> compress -> retrain -> evaluate ->
save), evaluate a saved model. Each writes its output directory atomically (staged, then renamed)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from upop.adapters import find_adapter
from upop.config import PruneConfig
from upop.core.plan import load_compressed, save_compressed
from upop.core.profile import measure_latency, profile
from upop.core.pruner import Pruner
from upop.engine import dist as D
from upop.engine.loop import JsonlLog, Phase, make_loaders, run_phase
from upop.errors import UPopError
from upop.models import build_model, default_image_size, load_weights, model_image_size
from upop.report import comparison_table
from upop.tasks import get_task
from upop.tasks.base import DataConfig

RUN_CONFIG_FILE = "config.json"


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

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # read back from config.json
            object.__setattr__(self, "data", DataConfig(**self.data))
        if self.batch_size < 1:
            raise UPopError(f"batch size must be a positive integer, got {self.batch_size}")


@dataclass
class Setup:
    info: D.DistInfo
    task: Any
    loaders: tuple
    num_outputs: int
    image_size: int


def prepare(cfg: RunConfig) -> Setup:
    """Process group, task, data and loaders for ``cfg``."""
    info = D.setup(cfg.device)
    task = get_task(cfg.task)
    image_size = cfg.data.image_size or default_image_size(cfg.model)
    if image_size is None:
        image_size = model_image_size(build_model(cfg.model, 1))
    train, val = task.datasets(dataclasses.replace(cfg.data, image_size=image_size))
    loaders = make_loaders(train, val, cfg.batch_size, info, cfg.seed)
    return Setup(info, task, loaders, task.num_outputs(train), image_size)


def new_model(cfg: RunConfig, setup: Setup, pretrained: str | None = None) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, setup.num_outputs, cfg.data.image_size)
    if pretrained:
        load_weights(model, pretrained)
    return model.to(setup.info.device)


@contextmanager
def staged_output(path: str | os.PathLike, overwrite: bool, info: D.DistInfo) -> Iterator[Path]:
    """Yield a staging directory beside ``path``; on success it replaces ``path``, on failure it is removed, so
    ``path`` never holds a half-written result."""
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise UPopError(f"output directory {final} exists and is not empty; pass --overwrite or choose another")
    staging = final.parent / f".{final.name}.partial"
    if info.is_main:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as e:
            raise UPopError(f"cannot write the output directory {final}: {e.strerror}") from None
    D.barrier(info)
    try:
        yield staging
    except BaseException:
        if info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    D.barrier(info)
    if info.is_main:
        if final.is_dir():
            shutil.rmtree(final)
        elif final.exists():
            final.unlink()
        os.replace(staging, final)


def _write_json(path: Path, obj: Any, info: D.DistInfo) -> None:
    if info.is_main:
        path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def train(cfg: RunConfig, epochs: int, lr: float, output_dir: str, overwrite: bool = False) -> dict[str, Any]:
    """Train a dense base model; writes model.safetensors, config.json, log.jsonl, report.json."""
    setup = prepare(cfg)
    with staged_output(output_dir, overwrite, setup.info) as out:
        model = new_model(cfg, setup)
        log = JsonlLog(out / "log.jsonl", setup.info)
        result = run_phase(
            D.wrap(model, setup.info),
            setup.task,
            setup.loaders,
            setup.info,
            Phase(
                "train",
                epochs,
                lr,
                warmup_steps=min(200, epochs * len(setup.loaders[0]) // 10),
                amp=cfg.amp,
                keep_best=True,
            ),
            log=log,
        )
        report = {"task": cfg.task, "model": cfg.model, "metrics": result["best"], "history": result["history"]}
        if setup.info.is_main:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                str(out / "model.safetensors"),
            )
        _write_json(
            out / RUN_CONFIG_FILE,
            {
                "run": dataclasses.asdict(cfg),
                "num_outputs": setup.num_outputs,
                "image_size": setup.image_size,
                "epochs": epochs,
                "lr": lr,
            },
            setup.info,
        )
        _write_json(out / "report.json", report, setup.info)
    return report


def _measure(model: torch.nn.Module, task: Any, loaders: tuple, info: D.DistInfo, example: Any) -> dict[str, Any]:
    metrics = task.evaluate(model, loaders[1], info.device)
    stats = profile(model, example)
    batch = example.shape[0] if isinstance(example, torch.Tensor) else 1
    return {
        "metrics": metrics,
        "params": stats["params"],
        "flops": stats["flops"] // batch,
        "latency_ms": 1000 * measure_latency(model, example),
    }


def compress(
    cfg: RunConfig,
    prune: PruneConfig,
    pretrained: str | None,
    epochs_search: int,
    epochs: int,
    lr_search: float,
    lr: float,
    output_dir: str,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Search (T = epochs_search x steps per epoch), compress, retrain ``epochs`` keeping the best epoch, evaluate,
    save plan + weights + reports. ``prune.total_steps`` is replaced by the real T."""
    if epochs_search < 1 or epochs < 0:
        raise UPopError(f"--epochs-search must be >= 1 and --epochs >= 0, got {epochs_search} and {epochs}")
    setup = prepare(cfg)
    info, task, loaders = setup.info, setup.task, setup.loaders
    model = new_model(cfg, setup, pretrained)
    find_adapter(model)  # fail before any work if the family is not supported
    with staged_output(output_dir, overwrite, info) as out:
        log = JsonlLog(out / "log.jsonl", info)
        example = task.example_inputs(next(iter(loaders[1])))
        example = example.to(info.device) if isinstance(example, torch.Tensor) else example
        dense = _measure(model, task, loaders, info, example)
        prune = dataclasses.replace(prune, total_steps=epochs_search * len(loaders[0]))
        pruner = Pruner(model, prune, example_inputs=example)
        search = run_phase(
            D.wrap(model, info),
            task,
            loaders,
            info,
            Phase("search", epochs_search, lr_search, amp=cfg.amp),
            pruner=pruner,
            log=log,
            evaluate_each_epoch=False,
        )
        # evaluated after the last step, masks exactly 0/1: the subnet before retraining
        searched = {k: v for k, v in search["last"].items() if k != "epoch"}
        kept = {"attn": pruner.kept_fraction("attn"), "mlp": pruner.kept_fraction("mlp")}
        pruned_cost, skipped = pruner.pruned_cost_fraction(), pruner.skipped_steps
        model = pruner.compress()
        if epochs > 0:
            run_phase(
                D.wrap(model, info),
                task,
                loaders,
                info,
                Phase("retrain", epochs, lr, amp=cfg.amp, keep_best=True),
                log=log,
            )
        compressed = _measure(model, task, loaders, info, example)
        report = {
            "task": cfg.task,
            "model": cfg.model,
            "p": prune.p,
            "cost": prune.cost,
            "device": str(info.device),
            "latency_batch": int(example.shape[0]) if isinstance(example, torch.Tensor) else 1,
            "dense": dense,
            "compressed": compressed,
            "searched_metrics": searched,
            "kept": kept,
            "pruned_cost_fraction": pruned_cost,
            "nonfinite_search_steps": skipped,
            "per_structure": [
                {"name": s["name"], "kind": s["kind"], "kept": len(s["kept"]), "size": s["size"]}
                for s in model._upop_plan.structures
            ],
        }
        if info.is_main:
            save_compressed(model, out)
            (out / "report.md").write_text(comparison_table(report) + "\n")
        _write_json(
            out / RUN_CONFIG_FILE,
            {
                "run": dataclasses.asdict(cfg),
                "prune": prune.to_dict(),
                "num_outputs": setup.num_outputs,
                "image_size": setup.image_size,
                "epochs_search": epochs_search,
                "epochs": epochs,
                "lr_search": lr_search,
                "lr": lr,
                "pretrained": pretrained,
            },
            info,
        )
        _write_json(out / "report.json", report, info)
    return report


def read_run_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UPopError(f"{path} is not valid JSON") from None


def evaluate(cfg: RunConfig, compressed: str | None = None, pretrained: str | None = None) -> dict[str, Any]:
    """Metrics, params, FLOPs and latency of a compressed directory (plan + weights) or a dense checkpoint."""
    if (compressed is None) == (pretrained is None):
        raise UPopError("evaluate needs exactly one of --compressed DIR or --pretrained FILE")
    setup = prepare(cfg)
    if compressed is not None:
        model = load_compressed(build_model(cfg.model, setup.num_outputs, cfg.data.image_size), compressed)
        model = model.to(setup.info.device)
    else:
        model = new_model(cfg, setup, pretrained)
    example = setup.task.example_inputs(next(iter(setup.loaders[1])))
    example = example.to(setup.info.device) if isinstance(example, torch.Tensor) else example
    return _measure(model, setup.task, setup.loaders, setup.info, example)
