"""The ``upop`` command: train | compress | evaluate. Flags follow the paper's scripts where they make sense.
Runs unchanged under ``torchrun --nproc_per_node=N`` (DDP)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from upop.errors import UPopError


def _common(p: argparse.ArgumentParser, fallback_to_saved: bool = False) -> None:
    """The flags every job shares. With ``fallback_to_saved`` (evaluate), a flag not given is left out of the
    namespace, so the value saved by the run that made the directory applies."""

    def arg(*names: str, **kw: Any) -> None:
        if fallback_to_saved:
            kw["default"] = argparse.SUPPRESS
        p.add_argument(*names, **kw)

    arg("--task", default="classification", help="classification | retrieval (default: classification)")
    arg(
        "--model",
        default="vit-tiny",
        help="vit-tiny | vit-micro | clip-tiny | clip-micro (built-in), timm:ARCH (e.g. timm:deit_small_patch16_224), "
        "hf:PATH, open_clip:ARCH:WEIGHTS (ARCH: an open_clip name or a model-config JSON)",
    )
    arg(
        "--data",
        default=None,
        help="dataset folder in the task's format (classification: ImageNet-style root/train, root/val; retrieval: "
        "Karpathy-format root/*train.json and root/*val.json); "
        "default: the built-in shapes world",
    )
    arg("--image-root", default=None, help="folder the annotation files' image paths are relative to (default: --data)")
    arg("--image-size", type=int, default=None, help="input side in pixels (default: the model's)")
    arg("--train-size", type=int, default=20000, help="built-in scenes in the training split")
    arg("--val-size", type=int, default=2000, help="built-in scenes in the validation split")
    arg("--data-seed", type=int, default=0, help="seed of the built-in world")
    arg("--batch-size", type=int, default=128, help="batch size per rank")
    arg("--seed", type=int, default=0, help="seed of initialisation and data order")
    arg("--amp", action="store_true", help="bf16 autocast where supported, else fp16 with a grad scaler")
    arg("--device", default=None, help="cpu | cuda (default: cuda if available)")


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


def _checkpointing(args: argparse.Namespace) -> Any:
    from upop.run import Checkpointing

    return Checkpointing(args.checkpoint_every, args.keep_checkpoints, args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upop", description="Unified and Progressive Pruning for vision Transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a dense base model")
    _common(t)
    t.add_argument("--epochs", type=int, default=12, help="training epochs")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warm-up + cosine)")
    _run_flags(t, "model.safetensors")

    c = sub.add_parser("compress", help="search, compress, retrain, evaluate, save")
    _common(c)
    c.add_argument("--pretrained", default=None, help="dense weights: .safetensors, or a torch state dict file")
    c.add_argument("--p", type=float, default=0.5, help="fraction of the prunable cost to remove, in (0, 1)")
    c.add_argument("--epochs-search", type=int, default=2, help="search epochs (T = epochs x steps per epoch)")
    c.add_argument("--epochs", type=int, default=2, help="retraining epochs of the compressed model")
    c.add_argument("--lr-search", type=float, default=5e-4, help="learning rate of the weights during search")
    c.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of retraining (cosine)")
    c.add_argument("--interval", type=int, default=50, help="re-rank every N search steps")
    c.add_argument("--w-sp-attn", type=float, default=4.8e-3, help="L1 weight on attention masks")
    c.add_argument("--w-sp-mlp", type=float, default=2e-4, help="L1 weight on MLP masks")
    c.add_argument("--cost", choices=("params", "flops"), default="params", help="what an element's removal saves")
    c.add_argument(
        "--align-attn",
        type=int,
        default=1,
        help="keep a multiple of this many head dims per attention module (e.g. 8; default 1)",
    )
    c.add_argument(
        "--align-mlp", type=int, default=1, help="keep a multiple of this many neurons per MLP (e.g. 32; default 1)"
    )
    c.add_argument(
        "--allocation",
        choices=("unified", "uniform"),
        default="unified",
        help="unified: one budget ranked over every structure of every tower (UPop); uniform: p in each structure",
    )
    c.add_argument(
        "--towers", default=None, help="prune only these towers, comma-separated (e.g. vision or text; default: all)"
    )
    c.add_argument("--exclude", action="append", default=[], help="module name or re:PATTERN not to prune (repeatable)")
    _run_flags(c, "plan.json, model.safetensors")

    e = sub.add_parser("evaluate", help="evaluate a compressed directory or a dense checkpoint")
    _common(e, fallback_to_saved=True)
    e.add_argument("--compressed", default=None, help="a directory written by `upop compress`")
    e.add_argument("--pretrained", default=None, help="a dense checkpoint instead")
    return parser


# CLI flag (argparse dest) -> DataConfig field
_DATA_FLAGS = {
    "data": "root",
    "image_root": "image_root",
    "image_size": "image_size",
    "train_size": "train_size",
    "val_size": "val_size",
    "data_seed": "seed",
}


def _run_config(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> Any:
    """RunConfig from the flags given, then the values ``saved`` beside a compressed dir, then the defaults."""
    from upop.run import RunConfig
    from upop.tasks import DataConfig

    saved = saved or {}
    data = dict(saved.get("data") or {})
    data.update({name: getattr(args, flag) for flag, name in _DATA_FLAGS.items() if hasattr(args, flag)})
    fields = [f for f in RunConfig.__dataclass_fields__ if f != "data"]
    values = {k: v for k, v in saved.items() if k in fields}
    values.update({f: getattr(args, f) for f in fields if hasattr(args, f)})
    return RunConfig(**values, data=DataConfig(**data))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from upop import run
        from upop.config import PruneConfig

        if args.command == "train":
            report = run.train(
                _run_config(args),
                args.epochs,
                args.lr,
                args.output_dir,
                args.overwrite,
                _checkpointing(args),
                args.max_nonfinite,
            )
            _print(
                f"dense {args.model}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in report["metrics"].items())
                + f"\nsaved to {args.output_dir}"
            )
        elif args.command == "compress":
            prune = PruneConfig(
                p=args.p,
                interval=args.interval,
                w_attn=args.w_sp_attn,
                w_mlp=args.w_sp_mlp,
                cost=args.cost,
                exclude=tuple(args.exclude),
                align_attn=args.align_attn,
                align_mlp=args.align_mlp,
                allocation=args.allocation,
                towers=tuple(t for t in (args.towers or "").split(",") if t),
            )
            report = run.compress(
                _run_config(args),
                prune,
                args.pretrained,
                args.epochs_search,
                args.epochs,
                args.lr_search,
                args.lr,
                args.output_dir,
                args.overwrite,
                _checkpointing(args),
                args.max_nonfinite,
            )
            from upop.report import comparison_table

            _print(comparison_table(report) + f"\nsaved to {args.output_dir}")
        else:
            saved = run.read_run_config(args.compressed).get("run", {}) if args.compressed else {}
            result = run.evaluate(_run_config(args, saved), args.compressed, args.pretrained)
            _print(json.dumps(result, indent=1))
    except UPopError as e:
        print(f"upop: error: {e}", file=sys.stderr)
        return 2
    finally:
        from upop.engine.dist import teardown

        teardown()
    return 0


def _print(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(text)


if __name__ == "__main__":
    sys.exit(main())
