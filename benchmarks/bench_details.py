"""Whether the paper's training details help on the built-in data (`python benchmarks/bench_details.py`): UPop 2x of
blip-tiny with and without

- BLIP's momentum distillation (``--momentum-distill``: momentum model, feature queue, soft targets, with the
  temperature clamp) on built-in image-text retrieval, with a queue of 1024 features (about a tenth of an epoch's
  10000 pairs, as the paper's 57600 is of COCO's 566k) and with the paper's 57600 (nearly six epochs of this data:
  most of it is the queue's random start during a 2-epoch search), and
- BLIP's image augmentation with NLVR2's left/right swap (``--augment blip --nlvr-swap``) on built-in NLVR,

over three seeds each (the seed of the search, the retraining and the data order; the dense base and the data are the
same), everything else equal: the project's default search (fisher ranking, floor 0.5), 2 search + 3 retraining
epochs at lr 3e-4, batch 64, CPU fp32. The epoch is chosen on the selection split, the metric reported on the report
split. Writes benchmarks/results/details.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

import upop
from upop.data.config import DataConfig
from upop.jobs.common import RunConfig
from upop.jobs.compress import Recipe, compress
from upop.jobs.train import train
from upop.tasks import TaskOptions

HERE = Path(__file__).parent
RESULTS = HERE / "results"
LR = 3e-4  # as bench_blip.py: BERT layers from scratch learn at 3e-4
SEEDS = (0, 1, 2)

# task -> (run configuration of the dense base, the metric, {variant: (label, how the compress run differs)})
STUDIES = {
    "retrieval": (
        RunConfig(
            task="retrieval",
            model="blip-tiny",
            data=DataConfig(train_size=2000, val_size=200),
            batch_size=64,
            options=TaskOptions(rerank_k=16),
        ),
        "r_mean",
        {
            "plain": ("in-batch ITC (default)", {}),
            "momentum": (
                "momentum distillation, queue 1024",
                {"options": {"momentum_distill": True, "clamp_temperature": True, "queue_size": 1024}},
            ),
            "paperqueue": (
                "momentum distillation, queue 57600",
                {"options": {"momentum_distill": True, "clamp_temperature": True, "queue_size": 57600}},
            ),
        },
    ),
    "nlvr": (
        RunConfig(task="nlvr", model="blip-tiny", data=DataConfig(train_size=8000, val_size=1000), batch_size=64),
        "accuracy",
        {
            "plain": ("no augmentation (default)", {}),
            "augment": ("BLIP's augmentation + swap", {"data": {"augment": "blip"}, "options": {"nlvr_swap": True}}),
        },
    ),
}


def variant_config(base: RunConfig, change: dict, seed: int) -> RunConfig:
    data = dataclasses.replace(base.data, **change.get("data", {}))
    options = dataclasses.replace(base.options, **change.get("options", {}))
    return dataclasses.replace(base, data=data, options=options, seed=seed)


def table(results: dict) -> str:
    lines = [
        "| task | variant | report-split metric, seeds 0 / 1 / 2 | mean +- std | right after the search (mean) |",
        "|---|---|---|---|---|",
    ]
    for task, variants in results.items():
        for label, runs in variants.items():
            final = [r["final"] for r in runs]
            searched = [r["searched"] for r in runs]
            spread = statistics.stdev(final) if len(final) > 1 else 0.0
            lines.append(
                f"| {task} ({runs[0]['metric']}) | {label} | {' / '.join(f'{v:.2f}' for v in final)} | "
                f"{statistics.mean(final):.2f} +- {spread:.2f} | {statistics.mean(searched):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="retrieval,nlvr")
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--epochs-search", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=HERE.parent / "runs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results: dict = {}
    for task in args.tasks.split(","):
        base_cfg, metric, variants = STUDIES[task]
        runs = args.runs / f"bench-details-{task}"
        if not (runs / "base" / "report.json").is_file():
            train(base_cfg, epochs=args.base_epochs, lr=LR, output_dir=str(runs / "base"), overwrite=True)
        recipe = Recipe(epochs_search=args.epochs_search, epochs=args.epochs, lr_search=LR, lr=LR)
        results[task] = {}
        for name, (label, change) in variants.items():
            results[task][label] = []
            for seed in SEEDS:
                out = runs / f"{name}-seed{seed}"
                if not (out / "report.json").is_file():
                    cfg = variant_config(base_cfg, change, seed)
                    base = str(runs / "base" / "model.safetensors")
                    compress(cfg, upop.PruneConfig(p=0.5), base, recipe, str(out), overwrite=True)
                report = json.loads((out / "report.json").read_text())
                results[task][label].append(
                    {
                        "seed": seed,
                        "metric": metric,
                        "final": report["compressed"]["metrics"][metric],
                        "searched": report["searched_metrics"][metric],
                        "dense": report["dense"]["metrics"][metric],
                    }
                )
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "details.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.results / "details.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
