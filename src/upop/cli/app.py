"""The ``upop`` command: train | compress | evaluate | latency-table | export, each from its flags (flags.py) and an
optional ``--config`` file (config_file.py). Runs unchanged under ``torchrun --nproc_per_node=N`` (DDP)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from upop.cli.config_file import apply_config, given_on_command_line, replace_listed
from upop.cli.flags import build_parser
from upop.core.config import PAPER_RANKING, PruneConfig
from upop.errors import UPopError
from upop.utils.files import atomic_write


def _ranking(args: argparse.Namespace) -> dict[str, Any]:
    """The ranking settings the flags name: --paper-ranking, or the defaults with any of --score, --standardise,
    --floor, --allocation changed (refused together with --paper-ranking on the command line, which fixes all four;
    a --config file's are replaced by it)."""
    given = {k: getattr(args, k) for k in PAPER_RANKING if getattr(args, k) is not None}
    if args.paper_ranking:
        typed = getattr(args, "given", set(given))
        given = {k: v for k, v in given.items() if k in typed}
        if given:
            raise UPopError(
                "--paper-ranking fixes --score, --standardise, --floor and --allocation; drop "
                f"--{next(iter(given))} or --paper-ranking"
            )
        return dict(PAPER_RANKING)
    return given


def _given_plan(path: str | None) -> Any:
    """The plan of --plan: a plan.json file or a compressed directory holding one."""
    if path is None:
        return None
    from pathlib import Path

    from upop.core.plan import PLAN_FILE, Plan, read_plan

    p = Path(path)
    if p.is_dir():
        return read_plan(p)
    if not p.is_file():
        raise UPopError(f"--plan {path}: no such file or directory (accepted: a plan.json, or a directory holding one)")
    try:
        return Plan.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UPopError(f"--plan {path} is not a {PLAN_FILE} (not valid JSON: {e})") from None


def _checkpointing(args: argparse.Namespace) -> Any:
    from upop.engine.rundir import Checkpointing

    return Checkpointing(args.checkpoint_every, args.keep_checkpoints, args.resume)


# CLI flag (argparse dest) -> DataConfig field
_DATA_FLAGS = {
    "data": "root",
    "image_root": "image_root",
    "image_size": "image_size",
    "train_size": "train_size",
    "val_size": "val_size",
    "data_seed": "seed",
    "select_size": "select_size",
    "augment": "augment",
    "select_on": "select_on",
    "vqa_train_files": "vqa_train_files",
    "vg_image_root": "vg_image_root",
}


def _per_rank_batch(args: argparse.Namespace, given: set[str]) -> None:
    """Resolve --global-batch-size into --batch-size for this world size (WORLD_SIZE, 1 without torchrun)."""
    total = getattr(args, "global_batch_size", None)
    if total is None or (args.command == "evaluate" and "global_batch_size" not in given):
        return  # (evaluate keeps the batch of the run it evaluates, not a --config file's training batch)
    if "batch_size" in given:
        if "global_batch_size" in given:
            raise UPopError("give --batch-size (per rank) or --global-batch-size (over all ranks), not both")
        return  # the command line's per-rank size overrides the config file's global one
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if total < world or total % world:
        raise UPopError(
            f"--global-batch-size {total} does not divide over {world} process(es); give a multiple of the world "
            "size, or --batch-size per rank"
        )
    args.batch_size = total // world


def _run_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> Any:
    """RunConfig from the flags given, then the values ``saved`` beside a compressed dir, then the defaults."""
    from upop.data.config import DataConfig
    from upop.jobs.common import RunConfig
    from upop.tasks import TaskOptions

    saved = saved or {}
    data = dict(saved.get("data") or {})
    data.update({name: getattr(args, flag) for flag, name in _DATA_FLAGS.items() if hasattr(args, flag)})
    data["vqa_train_files"] = tuple(data.get("vqa_train_files") or ())
    options = {k: v for k, v in (saved.get("options") or {}).items() if k in TaskOptions.__dataclass_fields__}
    options.update({f: getattr(args, f) for f in TaskOptions.__dataclass_fields__ if hasattr(args, f)})
    fields = [f for f in RunConfig.__dataclass_fields__ if f not in ("data", "options")]
    values = {k: v for k, v in saved.items() if k in fields}
    values.update({f: getattr(args, f) for f in fields if hasattr(args, f)})
    values["options"] = TaskOptions(**options)
    if getattr(args, "config", None) is not None:
        values["config_file"] = args.config
    return RunConfig(**values, data=DataConfig(**data))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        applied = apply_config(parser, argv)
    except UPopError as e:
        print(f"upop: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.given = given_on_command_line(parser, argv)
    replace_listed(args, applied)
    from upop.engine import signals

    finished = False
    try:
        _per_rank_batch(args, args.given)
        with signals.stop_on_signals():
            _run(args)
        finished = True
    except UPopError as e:
        print(f"upop: error: {e}", file=sys.stderr)
        return 2
    except signals.Interrupted as e:
        print(
            f"upop: stopped by {e.name} at {e.where}; rerun the same command with --resume to continue",
            file=sys.stderr,
        )
        return e.exit_code
    finally:
        from upop.utils.dist import teardown

        teardown(wait=finished)  # a rank that failed alone must not wait for the others at a barrier
    return 0


def _train(args: argparse.Namespace) -> None:
    from upop.jobs.train import train

    report = train(
        _run_config(args),
        args.epochs,
        args.lr,
        args.output_dir,
        args.overwrite,
        _checkpointing(args),
        args.max_nonfinite,
    )
    metrics = ", ".join(f"{k} {v:.2f}" for k, v in report.metrics.items())
    from upop.jobs.render import selection_text

    kept = f"epoch {report.selected_epoch}{selection_text(report.selection)}"
    _print(f"dense {args.model} (report split, {kept}): {metrics}\nsaved to {args.output_dir}")


def _prune_config(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        p=args.p,
        interval=args.interval,
        w_attn=args.w_sp_attn,
        w_mlp=args.w_sp_mlp,
        cost=args.cost,
        exclude=tuple(args.exclude),
        align_attn=args.align_attn,
        align_mlp=args.align_mlp,
        granularity=args.granularity,
        latency_table=args.latency_table,
        attn_cost=args.attn_cost if args.cost == "paper" or "attn_cost" in getattr(args, "given", ()) else None,
        towers=tuple(t for t in (args.towers or "").split(",") if t),
        **_ranking(args),
    )


def _recipe(args: argparse.Namespace, plan: Any) -> Any:
    """The compress job's Recipe from the flags (``--epochs-search`` defaults to 0 with a given plan, else 2)."""
    from upop.jobs.compress import Recipe

    if args.epochs_search is None:
        args.epochs_search = 0 if plan is not None else 2
    elif plan is not None and args.epochs_search != 0:
        raise UPopError(
            f"--plan retrains a given plan without a search; --epochs-search must be 0, got {args.epochs_search}"
        )
    return Recipe(
        epochs_search=args.epochs_search,
        epochs=args.epochs,
        lr_search=args.lr_search,
        lr=args.lr,
        search_schedule=args.lr_schedule_search,
        schedule=args.lr_schedule,
        min_lr=args.min_lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        distill=args.distill_weight if args.distill else 0.0,
        temperature=args.distill_temperature,
    )


def _compress(args: argparse.Namespace) -> None:
    from upop.jobs.compress import compress
    from upop.jobs.render import comparison_table, report_header

    plan = _given_plan(args.plan)
    report = compress(
        _run_config(args),
        _prune_config(args),
        args.pretrained,
        _recipe(args, plan),
        args.output_dir,
        args.overwrite,
        _checkpointing(args),
        args.max_nonfinite,
        plan,
    )
    _print(report_header(report) + "\n\n" + comparison_table(report) + f"\nsaved to {args.output_dir}")


def _latency_table(args: argparse.Namespace) -> None:
    from upop.jobs.common import device_name
    from upop.jobs.latency import latency_table

    table = latency_table(_run_config(args), args.granularity, args.output)
    _print(f"wrote {args.output}: {len(table)} structure shape(s) measured on {device_name(args.device)}")


def _export(args: argparse.Namespace) -> None:
    from upop.jobs.deploy import export_onnx

    result = export_onnx(args.compressed, args.onnx)
    _print(
        f"wrote {args.onnx}: onnxruntime matches PyTorch on example inputs (max abs difference "
        f"{result['max_abs_diff']:.2g} over {result['outputs']} output(s))"
    )


def _evaluate(args: argparse.Namespace) -> None:
    from upop.engine.rundir import read_run_config
    from upop.jobs.evaluate import evaluate

    saved = read_run_config(args.compressed).get("run", {}) if args.compressed else {}
    result = evaluate(_run_config(args, saved), args.compressed, args.pretrained)
    _print(json.dumps(result.to_dict(), indent=1))


def _report(args: argparse.Namespace) -> None:
    from upop.jobs.render import progress_png, read_log

    directory = Path(args.directory)
    report = directory / "report.md"
    if not report.is_file():
        raise UPopError(f"{directory} holds no report.md: give a directory written by `upop compress` or `upop train`")
    _print(report.read_text().rstrip())
    if args.plot:
        png = progress_png(read_log(directory / "log.jsonl"), directory.name)
        atomic_write(directory / "search.png", png)
        _print(f"wrote {directory / 'search.png'}")


COMMANDS = {
    "train": _train,
    "compress": _compress,
    "evaluate": _evaluate,
    "latency-table": _latency_table,
    "export": _export,
    "report": _report,
}


def _run(args: argparse.Namespace) -> None:
    COMMANDS[args.command](args)


def _print(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(text)
