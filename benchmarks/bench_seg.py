"""`make bench` (segmentation): dense vs UPop at p = 0.2 and p = 0.5 with the built-in segmenter-tiny (Segmenter: ViT
encoder width 64, 4 layers, patch 4, mask-transformer decoder 2 layers, 32 px crops, CPU) on 20000 scenes of
the built-in shapes world (classes: background and five shapes), encoder and decoder in one budget (unified)
beside uniform allocation (p in every structure), same search and retraining.

Reports single-scale and multi-scale mIoU on the report split (after retraining, and right after the search), pixel
accuracy, params and FLOPs, the kept fraction per tower, the latency speedup of the whole model (median ratio of
back-to-back calls at batch 64, fresh process), the all-background baseline, and the cost of a search step against a
plain training step. A second dense model trained from scratch for as many epochs as a compressed model had in all
(base + search + retraining) shows what the extra epochs alone give. Writes benchmarks/results/segmentation.md and
.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

import upop
from upop.data.ade20k import IGNORE
from upop.data.config import DataConfig
from upop.data.shapes import SEGMENTATION_CLASSES
from upop.jobs.common import RunConfig
from upop.jobs.compress import Recipe, compress
from upop.jobs.report import TrainReport
from upop.jobs.train import train
from upop.models import build_model, load_weights
from upop.tasks import get_task
from upop.tasks.segmentation import scores

sys.path.insert(0, str(Path(__file__).parent))
from common import paired_latency, variant_row  # noqa: E402
from common import step_ratio as common_step_ratio  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"  # the tables and raw values the docs include
LR = 1e-3
CFG = RunConfig(
    task="segmentation", model="segmenter-tiny", data=DataConfig(train_size=20000, val_size=500), batch_size=64
)
VARIANTS = {  # run directory -> (row label, search configuration)
    "p0.2-unified": ("UPop p=0.2 unified", upop.PruneConfig(p=0.2)),
    "p0.2-uniform": ("p=0.2 uniform", upop.PruneConfig(p=0.2, allocation="uniform")),
    "p0.5-unified": ("UPop p=0.5 unified", upop.PruneConfig(p=0.5)),
    "p0.5-uniform": ("p=0.5 uniform", upop.PruneConfig(p=0.5, allocation="uniform")),
}


def background_baseline(cfg: RunConfig) -> dict[str, float]:
    """The report-split scores of predicting the background (class 0) everywhere."""
    task = get_task(cfg.task)
    report = task.datasets(dataclasses.replace(cfg.data, image_size=32)).report
    n = len(task.classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    for i in range(len(report)):
        labels = report[i][1]
        labels = labels[labels != IGNORE]
        confusion[:, 0] += torch.bincount(labels, minlength=n)
    return scores(confusion)


def step_ratio(cfg: RunConfig) -> dict[str, float]:
    """Plain vs search step at the benchmark's batch (``common.step_ratio``)."""
    task = get_task(cfg.task)
    data = task.datasets(DataConfig(train_size=cfg.batch_size, val_size=8, image_size=32)).train
    batch = next(iter(torch.utils.data.DataLoader(data, cfg.batch_size)))
    build = lambda: build_model(cfg.model, len(task.classes), kind="segmenter")  # noqa: E731
    return common_step_ratio(build, lambda m: task.loss(m, batch), rounds=3, steps=5)


def measure(cfg: RunConfig, args: argparse.Namespace, runs: Path) -> None:
    torch.set_num_threads(2)
    classes = len(SEGMENTATION_CLASSES)
    models = {"dense": build_model(cfg.model, classes, kind="segmenter")}
    load_weights(models["dense"], runs / "base" / "model.safetensors")
    for name in VARIANTS:
        models[name] = upop.load_compressed(build_model(cfg.model, classes, kind="segmenter"), runs / name)
    x = torch.randn(args.latency_batch, 3, 32, 32)
    _, speed = paired_latency(models, x, args.iters)
    rows = []
    for name, model in models.items():
        row = variant_row(runs, name)
        label = "dense segmenter-tiny" if name == "dense" else VARIANTS[name][0]
        params = sum(p.numel() for p in model.parameters())
        rows.append({"variant": name, "label": label, **row, "params": params, "speedup": speed[name]})
        if name == "dense" and (runs / "dense-long" / "report.json").is_file():  # as many epochs as a compressed run
            long = TrainReport.read(runs / "dense-long")
            label = f"dense, {long.epochs} epochs"
            rows.append({**rows[0], "variant": "dense-long", "label": label, "metrics": long.metrics})
    baseline, steps = background_baseline(cfg), step_ratio(cfg)
    result = {"rows": rows, "baseline": baseline, "search_step": steps}
    (args.results / "segmentation.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "| variant | mIoU single-scale | mIoU multi-scale | pixel acc. | mIoU before retraining | params | FLOPs "
        "reduction | kept encoder attn / mlp | kept decoder attn / mlp | latency speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = rows[0]["metrics"]["miou"]
    for r in rows:
        m, k = r["metrics"], r["kept"]
        share = f" ({100 * m['miou'] / dense:.1f}%)" if r["searched"] and dense else ""
        enc, dec = k.get("encoder", {}), k.get("decoder", {})
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    f"{m['miou']:.2f}{share}",
                    f"{m['miou_ms']:.2f}",
                    f"{m['pixel_accuracy']:.2f}",
                    f"{r['searched']['miou']:.2f}" if r["searched"] else "-",
                    f"{r['params'] / 1e3:.1f}k",
                    f"{r['dense_flops'] / r['flops']:.2f}x" if r["flops"] else "1.00x",
                    f"{enc.get('attn', 1):.2f} / {enc.get('mlp', 1):.2f}",
                    f"{dec.get('attn', 1):.2f} / {dec.get('mlp', 1):.2f}",
                    f"{r['speedup']:.2f}x",
                ]
            )
            + " |"
        )
    lines += [
        "",
        f"All-background baseline (report split): mIoU {baseline['miou']:.2f}, pixel accuracy "
        f"{baseline['pixel_accuracy']:.2f}.",
        f"Latency: batch {args.latency_batch} at 32 px, fp32, this CPU, back to back (median of per-call ratios).",
        f"Search step vs plain training step (batch {cfg.batch_size}, fp32, this CPU): {steps['ratio']:.2f}x "
        f"({1e3 * steps['search']:.0f} ms vs {1e3 * steps['plain']:.0f} ms).",
    ]
    text = "\n".join(lines)
    (args.results / "segmentation.md").write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-epochs", type=int, default=12)
    parser.add_argument("--epochs-search", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=None)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-seg")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--measure-only", action="store_true")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in (("train_size", args.train_size), ("val_size", args.val_size)) if v is not None}
    cfg = dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, **sizes))
    if args.measure_only:
        measure(cfg, args, args.runs)
        return
    torch.set_num_threads(2)
    if not (args.runs / "base" / "report.json").is_file():
        train(cfg, epochs=args.base_epochs, lr=LR, output_dir=str(args.runs / "base"), overwrite=True)
    if not (args.runs / "dense-long" / "report.json").is_file():  # the dense model trained as long as a compressed one
        epochs = args.base_epochs + args.epochs_search + args.epochs
        train(cfg, epochs=epochs, lr=LR, output_dir=str(args.runs / "dense-long"), overwrite=True)
    for name, (_, config) in VARIANTS.items():
        if (args.runs / name / "report.json").is_file():
            continue
        recipe = Recipe(epochs_search=args.epochs_search, epochs=args.epochs, lr_search=LR, lr=LR)
        compress(cfg, config, str(args.runs / "base" / "model.safetensors"), recipe, str(args.runs / name))
    passed = ["--latency-batch", str(args.latency_batch), "--iters", str(args.iters), "--runs", str(args.runs)]
    passed += ["--results", str(args.results), *(f"--{k.replace('_', '-')}={v}" for k, v in sizes.items())]
    subprocess.run([sys.executable, __file__, "--measure-only", *passed], check=True)  # timings in a fresh process


if __name__ == "__main__":
    main()
