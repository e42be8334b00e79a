"""The three jobs behind the CLI: train a dense base model, compress (search -> compress -> retrain -> evaluate ->
save), evaluate a saved model. Each writes its output directory atomically (staged, then renamed)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from upop.adapters import find_adapter
from upop.config import PruneConfig
from upop.core.files import atomic_write
from upop.core.plan import Plan, apply_plan, load_compressed, save_compressed
from upop.core.profile import measure_latency, profile
from upop.core.pruner import Pruner
from upop.engine import dist as D
from upop.engine.checkpoint import Checkpointer, Snapshot
from upop.engine.loop import JsonlLog, Phase, make_loaders, run_phase
from upop.errors import UPopError
from upop.models import build_model, default_image_size, load_weights, model_image_size
from upop.report import comparison_table, heatmap_png, kept_by_tower
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
        image_size = model_image_size(build_model(cfg.model, 1, kind=task.model_kind))
    train, val = task.datasets(dataclasses.replace(cfg.data, image_size=image_size))
    loaders = make_loaders(train, val, cfg.batch_size, info, cfg.seed)
    return Setup(info, task, loaders, task.num_outputs(train), image_size)


def new_model(cfg: RunConfig, setup: Setup, pretrained: str | None = None) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, setup.num_outputs, cfg.data.image_size, kind=setup.task.model_kind)
    if pretrained:
        load_weights(model, pretrained)
    return model.to(setup.info.device)


@dataclass(frozen=True)
class Checkpointing:
    """Checkpoints of a job: every ``every`` steps (0: only at epoch ends) and at every epoch end, the newest ``keep``
    kept; ``resume`` continues the run in the output directory from its newest good checkpoint (or starts it when
    there is none, so the same command serves the first start and every restart)."""

    every: int = 500
    keep: int = 2
    resume: bool = False

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise UPopError(
                f"--checkpoint-every must be >= 0 and --keep-checkpoints >= 1, got {self.every} and {self.keep}"
            )


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _config_difference(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key == "device" or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found = _config_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
            continue
        return f"{prefix}{key} (saved {a!r}, now {b!r})"
    return None


class RunDir:
    """The output directory of a job while it runs and after.

    While running it holds ``config.json`` (written first), ``log.jsonl`` and ``checkpoints/``; the results are
    written at the end, each file atomically, ``report.json`` last: a directory with ``report.json`` is complete, one
    without it is an interrupted run that ``resume`` continues. Bad input is found before the directory is created.
    """

    def __init__(
        self, path: str | os.PathLike, config: dict[str, Any], overwrite: bool, ckpt: Checkpointing, info: D.DistInfo
    ) -> None:
        self.path, self.info, self.done = Path(path), info, None
        config = _jsonable(config)
        occupied = self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir()))
        if occupied and ckpt.resume:
            saved = read_run_config(self.path)
            if not saved:
                raise UPopError(f"{self.path} holds no UPop run to resume (no {RUN_CONFIG_FILE})")
            diff = _config_difference(saved, config)
            if diff:
                raise UPopError(f"the run in {self.path} was started with other settings: {diff}")
            if (self.path / "report.json").is_file():
                self.done = json.loads((self.path / "report.json").read_text())
                if info.is_main:
                    print(f"upop: {self.path} is already complete (it has report.json); nothing to resume", flush=True)
        elif occupied and not overwrite:
            raise UPopError(
                f"output directory {self.path} exists and is not empty; pass --overwrite to replace it "
                "or --resume to continue an interrupted run in it"
            )
        D.barrier(info)  # every rank has looked before rank 0 writes
        if info.is_main and self.done is None:
            try:
                if occupied and not ckpt.resume:
                    shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
                self.path.mkdir(parents=True, exist_ok=True)
                if not (self.path / RUN_CONFIG_FILE).is_file():
                    atomic_write(self.path / RUN_CONFIG_FILE, _json_bytes(config))
            except OSError as e:
                raise UPopError(f"cannot write the output directory {self.path}: {e.strerror}") from None
        D.barrier(info)
        self.checkpointer = Checkpointer(self.path / "checkpoints", info, ckpt.every, ckpt.keep)
        self.snapshot = self.checkpointer.latest() if ckpt.resume and self.done is None else None
        self.log = JsonlLog(self.path / "log.jsonl", info)
        if self.snapshot is not None:
            self.log.truncate(self.snapshot.meta["log_size"])
        elif self.done is None:
            self.log.truncate(0)

    def resume_from(self, phase_index: int) -> Snapshot | None:
        """The checkpoint to continue phase ``phase_index`` from, if the run stopped in it."""
        snap = self.snapshot
        return snap if snap is not None and snap.key[0] == phase_index else None

    def finish(self, report: dict[str, Any], files: dict[str, bytes], write_model: Any = None) -> None:
        """Write the results atomically (``write_model(dir)`` for the weights), ``report.json`` last; then drop the
        checkpoints."""
        try:
            if self.info.is_main:
                if write_model is not None:
                    write_model(self.path)
                for name, data in files.items():
                    atomic_write(self.path / name, data)
                atomic_write(self.path / "report.json", _json_bytes(report))
        except OSError as e:
            raise UPopError(
                f"cannot write the results into {self.path}: {e.strerror} "
                "(the checkpoints are kept; rerun with --resume)"
            ) from None
        D.barrier(self.info)
        self.checkpointer.clear()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def train(
    cfg: RunConfig,
    epochs: int,
    lr: float,
    output_dir: str,
    overwrite: bool = False,
    ckpt: Checkpointing = Checkpointing(),
    max_nonfinite: float = 0.1,
) -> dict[str, Any]:
    """Train a dense base model; writes model.safetensors, config.json, log.jsonl, report.json."""
    setup = prepare(cfg)
    model = new_model(cfg, setup)
    config = {
        "run": dataclasses.asdict(cfg),
        "num_outputs": setup.num_outputs,
        "image_size": setup.image_size,
        "epochs": epochs,
        "lr": lr,
    }
    out = RunDir(output_dir, config, overwrite, ckpt, setup.info)
    if out.done is not None:
        return out.done
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
            max_nonfinite=max_nonfinite,
        ),
        log=out.log,
        checkpointer=out.checkpointer,
        resume=out.resume_from(0),
    )
    report = {
        "task": cfg.task,
        "model": cfg.model,
        "metrics": result["best"],
        "history": result["history"],
        "nonfinite_steps": {"train": result["nonfinite_steps"]},
    }
    weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    out.finish(report, {"model.safetensors": save(weights)})
    return report


def _example(task: Any, loaders: tuple, model: torch.nn.Module, info: D.DistInfo) -> Any:
    example = task.example_inputs(next(iter(loaders[1])), model)
    return example.to(info.device) if isinstance(example, torch.Tensor) else example


def batch_size_of(example: Any) -> int:
    """The batch size of model inputs (a tensor, or the first tensor of a tuple or dict)."""
    if isinstance(example, torch.Tensor):
        return int(example.shape[0])
    values = example.values() if isinstance(example, dict) else example
    return next(int(v.shape[0]) for v in values if isinstance(v, torch.Tensor))


def _measure(model: torch.nn.Module, task: Any, loaders: tuple, info: D.DistInfo, example: Any) -> dict[str, Any]:
    metrics = task.evaluate(model, loaders[1], info.device)
    stats = profile(model, example)
    batch = batch_size_of(example)
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
    ckpt: Checkpointing = Checkpointing(),
    max_nonfinite: float = 0.1,
) -> dict[str, Any]:
    """Search (T = epochs_search x steps per epoch), compress, retrain ``epochs`` keeping the best epoch, evaluate,
    save plan + weights + reports. ``prune.total_steps`` is replaced by the real T. With ``ckpt.resume`` an
    interrupted run continues from its newest checkpoint and ends as if it had never stopped."""
    if epochs_search < 1 or epochs < 0:
        raise UPopError(f"--epochs-search must be >= 1 and --epochs >= 0, got {epochs_search} and {epochs}")
    setup = prepare(cfg)
    info, task, loaders = setup.info, setup.task, setup.loaders
    model = new_model(cfg, setup, pretrained)
    find_adapter(model)  # fail before any work if the family is not supported
    prune = dataclasses.replace(prune, total_steps=epochs_search * len(loaders[0]))
    config = {
        "run": dataclasses.asdict(cfg),
        "prune": prune.to_dict(),
        "num_outputs": setup.num_outputs,
        "image_size": setup.image_size,
        "epochs_search": epochs_search,
        "epochs": epochs,
        "lr_search": lr_search,
        "lr": lr,
        "pretrained": pretrained,
    }
    out = RunDir(output_dir, config, overwrite, ckpt, info)
    if out.done is not None:
        return out.done
    example = _example(task, loaders, model, info)
    retrain_from = out.resume_from(1)
    if retrain_from is None:
        search_from = out.resume_from(0)
        dense = search_from.meta["extra"]["dense"] if search_from else _measure(model, task, loaders, info, example)
        pruner = Pruner(model, prune, example_inputs=example)
        search = run_phase(
            D.wrap(model, info),
            task,
            loaders,
            info,
            Phase("search", epochs_search, lr_search, amp=cfg.amp, index=0, max_nonfinite=max_nonfinite),
            pruner=pruner,
            log=out.log,
            evaluate_each_epoch=False,
            checkpointer=out.checkpointer,
            resume=search_from,
            extra={"dense": dense},
        )
        # evaluated after the last step, masks exactly 0/1: the subnet before retraining
        searched = {
            "metrics": {k: v for k, v in search["last"].items() if k != "epoch"},
            "kept": {"attn": pruner.kept_fraction("attn"), "mlp": pruner.kept_fraction("mlp")},
            "pruned_cost_fraction": pruner.pruned_cost_fraction(),
            "nonfinite_mask_steps": pruner.skipped_steps,
            "nonfinite_steps": search["nonfinite_steps"],
            "plan": pruner.plan().to_dict(),
        }
        model = pruner.compress()
    else:
        dense, searched = retrain_from.meta["extra"]["dense"], retrain_from.meta["extra"]["searched"]
        model = apply_plan(model, Plan.from_dict(searched["plan"]))
    retrain = {"nonfinite_steps": 0}
    if epochs > 0:
        retrain = run_phase(
            D.wrap(model, info),
            task,
            loaders,
            info,
            Phase("retrain", epochs, lr, amp=cfg.amp, keep_best=True, index=1, max_nonfinite=max_nonfinite),
            log=out.log,
            checkpointer=out.checkpointer,
            resume=retrain_from,
            extra={"dense": dense, "searched": searched},
        )
    compressed = _measure(model, task, loaders, info, example)
    report = {
        "task": cfg.task,
        "model": cfg.model,
        "p": prune.p,
        "cost": prune.cost,
        "device": str(info.device),
        "latency_batch": batch_size_of(example),
        "dense": dense,
        "compressed": compressed,
        "searched_metrics": searched["metrics"],
        "kept": searched["kept"],
        "pruned_cost_fraction": searched["pruned_cost_fraction"],
        "nonfinite_search_steps": searched["nonfinite_mask_steps"],
        "nonfinite_steps": {"search": searched["nonfinite_steps"], "retrain": retrain["nonfinite_steps"]},
        "per_structure": [
            {
                "name": s["name"],
                "kind": s["kind"],
                "tower": s.get("tower", "vision"),
                "kept": len(s["kept"]),
                "size": s["size"],
            }
            for s in model._upop_plan.structures
        ],
    }
    report["kept_by_tower"] = kept_by_tower(report["per_structure"])
    files = {"report.md": (comparison_table(report) + "\n").encode()}
    if info.is_main:
        files["kept.png"] = heatmap_png(report["per_structure"], f"{cfg.model}, p={prune.p} ({prune.allocation})")
    out.finish(report, files, lambda d: save_compressed(model, d))
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
        dense = build_model(cfg.model, setup.num_outputs, cfg.data.image_size, kind=setup.task.model_kind)
        model = load_compressed(dense, compressed)
        model = model.to(setup.info.device)
    else:
        model = new_model(cfg, setup, pretrained)
    example = _example(setup.task, setup.loaders, model, setup.info)
    return _measure(model, setup.task, setup.loaders, setup.info, example)
