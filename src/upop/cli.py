"""The ``upop`` command: train | compress | evaluate | latency-table | export. Flags follow the paper's scripts where
they make sense; the tasks, models, model families and metrics the help lists come from the registries, so it cannot
drift from the code. Runs unchanged under ``torchrun --nproc_per_node=N`` (DDP)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from upop.adapters import registered_adapters
from upop.core.config import PAPER_RANKING, PruneConfig
from upop.errors import UPopError
from upop.models import MODEL_KINDS, model_names
from upop.tasks import registered_tasks


def tasks_help() -> str:
    """Every registered task with the metric that selects and headlines it."""
    return ", ".join(f"{name} ({cls.main_metric})" for name, cls in registered_tasks().items())


def models_help() -> str:
    """Every model spec the registered families build, per kind of model, with the tasks that need that kind."""
    lines = []
    for kind in MODEL_KINDS:
        tasks = [name for name, cls in registered_tasks().items() if cls.model_kind == kind]
        if tasks:
            lines.append(f"{'/'.join(tasks)}: {model_names(kind)}")
    return "; ".join(lines)


def families_help() -> str:
    """Every registered adapter: the model families the Pruner prunes."""
    return "model families the Pruner prunes: " + "; ".join(
        f"{a.name} ({a.description})" for a in registered_adapters().values()
    )


def _common(p: argparse.ArgumentParser, fallback_to_saved: bool = False) -> None:
    """The flags every job shares. With ``fallback_to_saved`` (evaluate), a flag not given is left out of the
    namespace, so the value saved by the run that made the directory applies."""

    def arg(*names: str, **kw: Any) -> None:
        if fallback_to_saved:
            kw["default"] = argparse.SUPPRESS
        p.add_argument(*names, **kw)

    arg(
        "--task",
        default="classification",
        help=f"the task, with its main metric: {tasks_help()} (default: classification)",
    )
    arg("--model", default="vit-tiny", help=f"the model, per task: {models_help()} (default: vit-tiny)")
    arg(
        "--data",
        default=None,
        help="dataset folder in the task's format (classification: ImageNet-style root/train, root/val; retrieval: "
        "Karpathy-format root/*train.json and root/*val.json, *test.json; caption: the same; nlvr: BLIP's NLVR2 "
        "files; vqa: BLIP's VQA files *train.json, *val.json, answer_list.json, optional *test.json; "
        "segmentation: ADE20K's images/ and annotations/ folders); default: the built-in shapes world",
    )
    arg("--image-root", default=None, help="folder the annotation files' image paths are relative to (default: --data)")
    arg("--image-size", type=int, default=None, help="input side in pixels (default: the model's)")
    arg("--train-size", type=int, default=20000, help="built-in scenes in the training split (default 20000)")
    arg("--val-size", type=int, default=2000, help="built-in scenes in the report split (default 2000)")
    arg(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the built-in world and of the selection split carved from train (default 0)",
    )
    arg(
        "--select-size",
        type=int,
        default=None,
        help="samples in the selection split that picks the best epoch, never the reported one (classification: "
        "carved from train, stratified; default 5%% of train, at most 10000; retrieval: the built-in selection "
        "scenes (default --val-size) or *val.json; 0: no selection, keep the last epoch)",
    )
    arg(
        "--augment",
        choices=("auto", "none", "light", "deit"),
        default="auto",
        help="training augmentation of classification images (timm transforms): none; light = RandomResizedCrop "
        "scale 0.5-1 + flip; deit = the DeiT recipe (RandAugment, random erasing, Mixup/CutMix, label smoothing "
        "0.1); auto (default) = none on the built-in world, light on image folders",
    )
    arg("--batch-size", type=int, default=128, help="batch size per rank")
    arg("--seed", type=int, default=0, help="seed of initialisation and data order")
    arg("--amp", action="store_true", help="bf16 autocast where supported, else fp16 with a grad scaler")
    arg("--device", default=None, help="cpu | cuda (default: cuda if available)")
    arg(
        "--vqa-inference",
        choices=("rank", "generate"),
        default="rank",
        help="how the VQA task answers: rank (default, as BLIP: the 128 answers of answer_list.json likeliest by "
        "their first token, re-ranked by BLIP's label-smoothed loss) or generate (beam search, 3 beams)",
    )


def _run_flags(p: argparse.ArgumentParser, what: str) -> None:
    """Output, checkpoint and resume flags of the jobs that train (train, compress)."""
    p.add_argument("--output-dir", required=True, help=f"where {what} and the reports go")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --output-dir from its newest good checkpoint (starts it if there is "
        "none: use the same command for the first start and every restart, e.g. under torchrun --max-restarts)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="steps between checkpoints, besides every epoch end (0: only those)",
    )
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    p.add_argument(
        "--max-nonfinite",
        type=float,
        default=0.1,
        help="stop when more than this share of a phase's steps have non-finite loss or gradients (default 0.1)",
    )


def _auto_or_int(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def _ranking(args: argparse.Namespace) -> dict[str, Any]:
    """The ranking settings the flags name: --paper-ranking, or the defaults with any of --score, --standardise,
    --floor changed (refused together with --paper-ranking, which fixes all three)."""
    given = {k: getattr(args, k) for k in PAPER_RANKING if getattr(args, k) is not None}
    if args.paper_ranking:
        if given:
            raise UPopError(
                f"--paper-ranking fixes --score, --standardise and --floor; drop --{next(iter(given))} or "
                "--paper-ranking"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upop",
        description="Unified and Progressive Pruning (UPop) of vision and vision-language Transformers",
        epilog=families_help(),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a dense base model")
    _common(t)
    t.add_argument("--epochs", type=int, default=12, help="training epochs")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warm-up + cosine)")
    _run_flags(t, "model.safetensors")

    c = sub.add_parser("compress", help="search, compress, retrain, evaluate, save")
    _common(c)
    _recipe_flags(c)
    _search_flags(c)
    _run_flags(c, "plan.json, model.safetensors")

    e = sub.add_parser("evaluate", help="evaluate a compressed directory or a dense checkpoint")
    _common(e, fallback_to_saved=True)
    e.add_argument("--compressed", default=None, help="a directory written by `upop compress`")
    e.add_argument("--pretrained", default=None, help="a dense checkpoint instead")

    lt = sub.add_parser(
        "latency-table", help="measure a model's latency per structure shape and kept width on this machine"
    )
    _common(lt)
    lt.add_argument("--granularity", choices=("dim", "head"), default="dim", help="dims (default) or whole heads")
    lt.add_argument("--output", required=True, help="the JSON table to write (pass it to compress --latency-table)")

    x = sub.add_parser("export", help="export a compressed directory to ONNX (checked against PyTorch)")
    x.add_argument("compressed", help="a directory written by `upop compress`")
    x.add_argument("--onnx", required=True, help="the .onnx file to write (dynamic batch dimension)")
    return parser


def _recipe_flags(c: argparse.ArgumentParser) -> None:
    """How compress trains: the dense weights, the budget, search and retraining epochs and rates, distillation."""
    c.add_argument("--pretrained", default=None, help="dense weights: .safetensors, or a torch state dict file")
    c.add_argument("--p", type=float, default=0.5, help="fraction of the prunable cost to remove, in (0, 1)")
    c.add_argument(
        "--epochs-search",
        type=int,
        default=None,
        help="search epochs (T = epochs x steps per epoch); default 2, and 0 (no search) with --plan",
    )
    c.add_argument("--epochs", type=int, default=2, help="retraining epochs of the compressed model")
    c.add_argument("--lr-search", type=float, default=5e-4, help="learning rate of the weights during search")
    c.add_argument(
        "--lr-schedule-search",
        choices=("constant", "cosine"),
        default="constant",
        help="LR schedule of the search: constant (default, the reference's) or cosine decay",
    )
    c.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of retraining (cosine)")


def _search_flags(c: argparse.ArgumentParser) -> None:
    """How compress searches: re-ranking, cost, widths, granularity, allocation, ranking, a given plan, scope."""
    c.add_argument(
        "--interval",
        type=_auto_or_int,
        default="auto",
        help="re-rank every N search steps; auto (default) = min(50, T // 10): at least 10 re-rankings. An interval "
        "giving fewer than min(10, T) re-rankings is refused",
    )
    weights_note = (
        "; kept for the paper's scripts: it does not change the ranking (the masks are not optimised, so the penalty "
        "adds the same constant to every mask gradient of a kind, which the per-kind standardisation removes)"
    )
    c.add_argument("--w-sp-attn", type=float, default=4.8e-3, help="L1 weight on attention masks" + weights_note)
    c.add_argument("--w-sp-mlp", type=float, default=2e-4, help="L1 weight on MLP masks" + weights_note)
    c.add_argument(
        "--distill",
        action="store_true",
        help="retrain with knowledge distillation from the dense model (KL on the logits, mixed into the loss)",
    )
    c.add_argument(
        "--distill-weight", type=float, default=0.5, help="with --distill: alpha of (1-alpha) task + alpha KD (0.5)"
    )
    c.add_argument(
        "--distill-temperature", type=float, default=2.0, help="with --distill: the softmax temperature (2.0)"
    )
    c.add_argument(
        "--cost",
        choices=("params", "flops", "latency"),
        default="params",
        help="what an element's removal saves: params (default), flops, or latency (measured on this run's device "
        "per structure shape and kept width, or read from --latency-table)",
    )
    c.add_argument(
        "--latency-table",
        default=None,
        help="with --cost latency: a table measured on the deploying machine by `upop latency-table`",
    )
    align_help = (
        "; auto (default): the smallest alignment whose widths this run's device runs at full speed, measured when "
        "the search starts (8 on an H200 in bf16, typically 1 on a CPU); 1 is the paper's element-wise setting"
    )
    c.add_argument(
        "--align-attn",
        type=_auto_or_int,
        default="auto",
        help="keep a multiple of this many head dims per attention module" + align_help,
    )
    c.add_argument(
        "--align-mlp",
        type=_auto_or_int,
        default="auto",
        help="keep a multiple of this many neurons per MLP" + align_help,
    )
    c.add_argument(
        "--granularity",
        choices=("dim", "head", "mixed"),
        default="dim",
        help="an attention element: dim (default, the paper's: one head dimension shared by all heads), head (whole "
        "heads: head_dim is kept, heads are removed) or mixed (whole heads, then aligned head dims, in one search)",
    )
    c.add_argument(
        "--allocation",
        choices=("unified", "uniform"),
        default="unified",
        help="unified: one budget ranked over every structure of every tower (UPop); uniform: p in each structure",
    )
    c.add_argument(
        "--score",
        choices=("gradient", "snr", "fisher"),
        default=None,
        help="what ranks an element: gradient (the paper's accumulated mask gradient), snr (that sum over its "
        "standard error: how consistently its removal lowers the loss) or fisher (the root mean square of the mask's "
        f"gradient: how much its removal moves the loss); default {PruneConfig.score}",
    )
    c.add_argument(
        "--standardise",
        choices=("kind", "tower", "structure"),
        default=None,
        help="standardise the scores per kind (the paper's), per kind and tower, or per structure; default "
        f"{PruneConfig.standardise}",
    )
    c.add_argument(
        "--floor",
        type=float,
        default=None,
        help="the least a structure keeps, as a fraction of the uniform share 1 - p (0 = the paper's one element; "
        f"in [0, 1]); default {PruneConfig.floor}",
    )
    c.add_argument(
        "--paper-ranking",
        action="store_true",
        help="UPop's ranking exactly as published: --score gradient --standardise kind --floor 0",
    )
    c.add_argument(
        "--plan",
        default=None,
        help="no search: retrain and evaluate this plan.json (another run's decision, or another tool's, for the "
        "same base architecture); use with --epochs-search 0",
    )
    c.add_argument(
        "--towers", default=None, help="prune only these towers, comma-separated (e.g. vision or text; default: all)"
    )
    c.add_argument("--exclude", action="append", default=[], help="module name or re:PATTERN not to prune (repeatable)")


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
}


def _run_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> Any:
    """RunConfig from the flags given, then the values ``saved`` beside a compressed dir, then the defaults."""
    from upop.data.config import DataConfig
    from upop.jobs.common import RunConfig

    saved = saved or {}
    data = dict(saved.get("data") or {})
    data.update({name: getattr(args, flag) for flag, name in _DATA_FLAGS.items() if hasattr(args, flag)})
    fields = [f for f in RunConfig.__dataclass_fields__ if f != "data"]
    values = {k: v for k, v in saved.items() if k in fields}
    values.update({f: getattr(args, f) for f in fields if hasattr(args, f)})
    return RunConfig(**values, data=DataConfig(**data))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from upop.engine import signals

    try:
        with signals.stop_on_signals():
            _run(args)
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

        teardown()
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
    _print(f"dense {args.model} (report split, epoch {report.selected_epoch}): {metrics}\nsaved to {args.output_dir}")


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
        allocation=args.allocation,
        granularity=args.granularity,
        latency_table=args.latency_table,
        towers=tuple(t for t in (args.towers or "").split(",") if t),
        **_ranking(args),
    )


def _compress(args: argparse.Namespace) -> None:
    from upop.jobs.compress import Recipe, compress
    from upop.jobs.render import comparison_table, report_header

    plan = _given_plan(args.plan)
    if args.epochs_search is None:
        args.epochs_search = 0 if plan is not None else 2
    elif plan is not None and args.epochs_search != 0:
        raise UPopError(
            f"--plan retrains a given plan without a search; --epochs-search must be 0, got {args.epochs_search}"
        )
    recipe = Recipe(
        epochs_search=args.epochs_search,
        epochs=args.epochs,
        lr_search=args.lr_search,
        lr=args.lr,
        search_schedule=args.lr_schedule_search,
        distill=args.distill_weight if args.distill else 0.0,
        temperature=args.distill_temperature,
    )
    report = compress(
        _run_config(args),
        _prune_config(args),
        args.pretrained,
        recipe,
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


COMMANDS = {
    "train": _train,
    "compress": _compress,
    "evaluate": _evaluate,
    "latency-table": _latency_table,
    "export": _export,
}


def _run(args: argparse.Namespace) -> None:
    COMMANDS[args.command](args)


def _print(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(text)


if __name__ == "__main__":
    sys.exit(main())
