"""The train job: a dense base model, keeping the epoch best on the selection split."""

from __future__ import annotations

from typing import Any

from safetensors.torch import save

from upop.engine.loop import Phase, run_phase
from upop.engine.rundir import Checkpointing, RunDir
from upop.errors import UPopError
from upop.jobs.common import RunConfig, prepare, provenance, report_eval, selected_metrics, stop_point
from upop.jobs.report import TrainReport
from upop.utils import dist as D


def train(
    cfg: RunConfig,
    epochs: int,
    lr: float,
    output_dir: str,
    overwrite: bool = False,
    ckpt: Checkpointing | None = None,
    max_nonfinite: float = 0.1,
) -> TrainReport:
    """Train a dense base model, keeping the epoch best on the selection split; writes model.safetensors,
    config.json, log.jsonl, report.json (metrics on the report split, of the selected and of the last epoch)."""
    if not (isinstance(epochs, int) and epochs >= 1):
        raise UPopError(f"--epochs must be a positive integer, got {epochs}")
    if not lr > 0:
        raise UPopError(f"--lr must be positive, got {lr}")
    setup = prepare(cfg)
    model, info = setup.model, setup.info
    config = dict(run=cfg.to_dict(), num_outputs=setup.num_outputs, image_size=setup.image_size, epochs=epochs, lr=lr)
    with RunDir(output_dir, config, overwrite, ckpt or Checkpointing(), info) as out:
        if out.done is not None:
            return TrainReport.from_dict(out.done)
        phase = Phase(
            "train",
            epochs,
            lr,
            warmup_steps=min(200, epochs * len(setup.loaders.train) // 10),
            amp=cfg.amp,
            keep_best=True,
            max_nonfinite=max_nonfinite,
            selection=cfg.selection,
        )
        evaluate = report_eval(setup)
        result = run_phase(
            D.wrap(model, info),
            setup.task,
            setup.loaders,
            info,
            phase,
            log=out.log,
            checkpointer=out.checkpointer,
            resume=out.resume_from(0),
            last=evaluate,
        )
        stop_point(info, "after training")
        report = TrainReport(
            **provenance(cfg, setup, result["selection"]),
            epochs=epochs,
            lr=lr,
            metrics=selected_metrics(result, phase, evaluate, model),
            selected_epoch=result["selected_epoch"],
            metrics_last=result["last"],
            history=result["history"],
            nonfinite_steps={"train": result["nonfinite_steps"]},
        )
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        files: dict[str, Any] = {"model.safetensors": save(weights)}
        if info.is_main:
            files.update(setup.task.extra_files(model, info.device, cfg.batch_size))
        out.finish(report.to_dict(), files)
    return report
