"""The ``upop`` command's flags: one table per group, and the help lists the tasks, models, model families and
metrics from their registries, so it cannot drift from the code."""

from __future__ import annotations

import argparse
from typing import Any

from upop.adapters import registered_adapters
from upop.core.config import ALLOCATIONS, PruneConfig
from upop.engine.selection import SELECTION_RULES
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


def _workers(text: str) -> int | str:
    from upop.engine.loaders import parse_workers

    try:
        return parse_workers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--workers ")) from None


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
    arg(
        "--vqa-train-files",
        nargs="+",
        default=None,
        help="VQA: the annotation files in --data that make the training split (default: its *train.json), e.g. "
        'BLIP\'s vqa_train.json vqa_val.json vg_qa.json; an entry with "dataset": "vg" weighs its answer 0.2',
    )
    arg("--vg-image-root", default=None, help="VQA: where Visual Genome's images are (default: --image-root)")
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
        "--select-on",
        choices=("select", "report"),
        default="select",
        help="the split that picks the best epoch: select (default: one never reported) or report (the paper's "
        "protocol: the reported split itself, nothing carved from train; the report's header says so)",
    )
    arg(
        "--augment",
        choices=("auto", "none", "light", "deit", "blip", "segmenter"),
        default="auto",
        help="training augmentation. Classification (timm transforms): none; light = RandomResizedCrop scale 0.5-1 + "
        "flip; deit = the DeiT recipe (RandAugment, random erasing, Mixup/CutMix, label smoothing 0.1); auto = none "
        "on the built-in world, light on image folders. The image-text tasks: none (auto) or blip (BLIP's: random "
        "resized crop 0.5-1, flip, RandomAugment). Segmentation: light (auto: resize, crop, flip) or segmenter (the "
        "original's: class-ratio crop, photometric distortion, padding after normalising)",
    )
    arg(
        "--drop-path",
        type=float,
        default=None,
        help="stochastic depth of the image encoder, rising linearly over its blocks to this rate (BLIP, Segmenter, "
        "timm ViTs; the original's: 0.1 for BLIP's NLVR2 and VQA and for Segmenter); default: the model's own",
    )
    arg(
        "--text-dropout",
        type=float,
        default=None,
        help="dropout of the text tower (BLIP's BERT: hidden and attention probabilities; the original's: 0.1; HF's "
        "BLIP configs: 0); default: the model's own",
    )
    arg("--batch-size", type=int, default=128, help="batch size per rank")
    arg(
        "--global-batch-size",
        type=int,
        default=None,
        help="batch size over all ranks, divided by the world size (the paper's recipes give it so: 32 x 8 GPUs = "
        "256); --batch-size on the command line overrides one from --config",
    )
    arg("--seed", type=int, default=0, help="seed of initialisation and data order")
    arg(
        "--selection",
        choices=SELECTION_RULES,
        default="guarded",
        help="which epoch a training or retraining phase keeps: guarded (default) the best on the selection split "
        "only when it beats the last by more than that split's noise (its standard error, corrected for the number "
        "of epochs compared), else the last; best: the best on the selection split however small the difference "
        "(the paper's scripts); last: the last epoch",
    )
    arg(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bf16 autocast where supported, else fp16 with a grad scaler",
    )
    arg("--device", default=None, help="cpu | cuda (default: cuda if available)")
    arg(
        "--workers",
        type=_workers,
        default="auto",
        help="data loading processes per rank; auto: on a GPU the CPU cores of the rank's share of the node less "
        "one, on the CPU 0 (loading in the main process). Results do not depend on it",
    )
    arg(
        "--log-dir",
        default=None,
        help="TensorBoard event files of every logged scalar, the selection metrics and the kept widths; default: "
        "the output directory's tb/ when tensorboard is installed; none: no events",
    )
    arg(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute each transformer block in the backward pass instead of keeping its activations: less memory "
        "for about one more forward pass; the same gradients and choices",
    )
    _task_flags(arg)


def _task_flags(arg: Any) -> None:
    """The tasks' own settings (``upop.tasks.TaskOptions``); each task reads its own, the others ignore them."""
    arg(
        "--vqa-inference",
        choices=("rank", "generate"),
        default="rank",
        help="how the VQA task answers: rank (default, as BLIP: the 128 answers of answer_list.json likeliest by "
        "their first token, re-ranked by BLIP's label-smoothed loss) or generate (beam search, 3 beams)",
    )
    arg(
        "--answer-grouping",
        choices=("normalised", "raw"),
        default="normalised",
        help="VQA training: answers weighted by their share of a question's human answers, grouped after the metric's "
        "normalisation (default) or as raw strings (the original's)",
    )
    arg(
        "--rerank-k",
        type=int,
        default=128,
        help="BLIP retrieval: candidates per query rescored by ITM (default 128; the original's: 256 COCO, 128 Flickr)",
    )
    arg(
        "--momentum-distill",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="retrieval: BLIP's momentum distillation (a 0.995 moving-average model, a feature queue, soft targets "
        "0.4 x its similarities, ramped over the first epoch); off by default, on in the paper's configs",
    )
    arg("--queue-size", type=int, default=57600, help="with --momentum-distill: the feature queue (default 57600)")
    arg(
        "--clamp-temperature",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="retrieval: clamp the temperature to BLIP's [0.001, 0.5] (CLIP's logit scale to <= 100) at every step",
    )
    arg(
        "--negatives-all-ranks",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="BLIP retrieval: ITM hard negatives drawn from every rank's batch (the original's), not the rank's own",
    )
    arg(
        "--nlvr-swap",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="NLVR2 training: swap the two images with probability 0.5, and 'left'/'right' in the sentence with them",
    )
    arg(
        "--window-stride",
        type=int,
        default=None,
        help="segmentation: the sliding window's stride in pixels (default: the window minus 32, the original's)",
    )
    arg(
        "--multiscale-mode",
        choices=("true", "reference"),
        default="true",
        help="segmentation's multi-scale evaluation: true (default: each scale at its size) or reference (the "
        "original's: scales whose shorter side falls below the window are upsampled back to it)",
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


def _ratio(text: str) -> float:
    """A positive number, written as one (36, 12.5) or as a fraction (9234/769)."""
    wrong = argparse.ArgumentTypeError(f"expected a positive number or fraction like 9234/769, got {text!r}")
    try:
        top, _, bottom = text.partition("/")
        value = float(top) / float(bottom) if bottom else float(top)
    except (ValueError, ZeroDivisionError):
        raise wrong from None
    if not value > 0:
        raise wrong
    return value


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
    for p in (t, c, e):
        p.add_argument(
            "--config",
            default=None,
            help="a YAML file of flag: value lines (e.g. configs/*.yaml, the paper's recipes); flags given on the "
            "command line override it; keys of another command are not applied, unknown keys are refused",
        )

    lt = sub.add_parser(
        "latency-table", help="measure a model's latency per structure shape and kept width on this machine"
    )
    _common(lt)
    lt.add_argument("--granularity", choices=("dim", "head"), default="dim", help="dims (default) or whole heads")
    lt.add_argument("--output", required=True, help="the JSON table to write (pass it to compress --latency-table)")

    r = sub.add_parser("report", help="print a run's report; --plot draws its search's progress")
    r.add_argument("directory", help="a directory written by `upop compress` (or `upop train`)")
    r.add_argument(
        "--plot",
        action="store_true",
        help="also draw pi and the kept fraction per kind and tower over the search steps, from log.jsonl, as "
        "search.png in the directory (beside kept.png)",
    )

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
        default="constant",
        choices=("constant", "cosine", "epoch-cosine", "poly"),
        help="LR schedule of the search: constant (default, the reference's) or a decay as --lr-schedule",
    )
    c.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of retraining (see --lr-schedule)")
    c.add_argument(
        "--lr-schedule",
        choices=("cosine", "epoch-cosine", "poly", "constant"),
        default="cosine",
        help="LR schedule of retraining: cosine (default, per step), epoch-cosine (per epoch: BLIP's and DeiT's), "
        "poly ((1 - t)^0.9 per step: Segmenter's) or constant; the decaying ones end at --min-lr",
    )
    c.add_argument(
        "--min-lr", type=float, default=None, help="where the decaying LR schedules end (default: 1%% of the LR)"
    )
    c.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        default="adamw",
        help="of search and retraining: adamw (default; BLIP's, CLIP's, DeiT's) or sgd with Nesterov momentum 0.9 "
        "(Segmenter's)",
    )
    c.add_argument("--weight-decay", type=float, default=0.05, help="of search and retraining (default 0.05)")


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
        action=argparse.BooleanOptionalAction,
        default=False,
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
        choices=("params", "flops", "latency", "paper"),
        default="params",
        help="what an element's removal saves: params (default), flops, latency (measured on this run's device "
        "per structure shape and kept width, or read from --latency-table) or paper (the original scripts' "
        "constants: --attn-cost per head dim, 1 per MLP neuron)",
    )
    c.add_argument(
        "--attn-cost",
        type=_ratio,
        default=None,
        help="with --cost paper: an attention element's cost against an MLP neuron's, a number or a fraction (the "
        "original's: 36 for BLIP and CLIP, 9234/769 for DeiT and Segmenter)",
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
        choices=ALLOCATIONS,
        default=None,
        help="tower: one ranking over the structures of each tower, p of each tower's cost; unified (the paper's): "
        "one budget ranked over every structure of every tower; uniform: p in each structure; default "
        f"{PruneConfig.allocation}",
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
        action=argparse.BooleanOptionalAction,
        default=False,
        help="UPop's ranking exactly as published: --score gradient --standardise kind --floor 0 --allocation unified",
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
