"""`make bench`: dense vs UPop 2x and 4x on the built-in classification task (vit-tiny, CPU).

Reports top-1 on the report split (the built-in val scenes; the retraining epoch is chosen on a selection split carved
from train), after retraining and right after the search, params, FLOPs, measured latency speedup next to the FLOPs
reduction, and the time of a search step vs a plain training step. Latencies and step times are measured in the same
fresh process: speedups as medians of ratios of back-to-back runs (shared machines are noisy).
Writes benchmarks/results/vit.md and .json.

The recipe study (``--study``, part of `make bench`): at 4x, over 3 seeds, the search LR constant (the reference's,
the default) vs cosine, and retraining with distillation from the dense model. Writes benchmarks/results/recipe.md
and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import upop
from upop.jobs.common import RunConfig
from upop.jobs.compress import Recipe, compress
from upop.jobs.report import CompressReport
from upop.jobs.train import train
from upop.models import build_model, load_weights
from upop.tasks import get_task

sys.path.insert(0, str(Path(__file__).parent))
from common import paired_latency  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"  # the tables and raw values the docs include


# run directory suffix -> (row label, search configuration)
VARIANTS = {
    "0.5": ("UPop 2x (p=0.5)", upop.PruneConfig(p=0.5)),
    "0.75": ("UPop 4x (p=0.75)", upop.PruneConfig(p=0.75)),
    "0.5-aligned": ("UPop 2x, --align-attn 8 --align-mlp 32", upop.PruneConfig(p=0.5, align_attn=8, align_mlp=32)),
}


# DeiT-Small rows (random weights, latency only): result key -> (row label, search settings)
DEIT_ROWS = {
    "deit_small": ("DeiT-Small 224px, random weights, UPop 2x", {}),
    "deit_small_aligned": ("same, --align-attn 8 --align-mlp 32", {"align_attn": 8, "align_mlp": 32}),
    "deit_small_heads": ("same, --granularity head (whole heads)", {"granularity": "head"}),
    "deit_small_mixed": (
        "same, --granularity mixed --align-attn 8 --align-mlp 32",
        {"granularity": "mixed", "align_attn": 8, "align_mlp": 32},
    ),
}


# recipe study at 4x: name -> (row label, recipe changes from the default)
RECIPES = {
    "constant": ("search LR constant (default)", {}),
    "cosine": ("search LR cosine", {"search_schedule": "cosine"}),
    "distill": ("search LR constant + distillation (0.5, T 2)", {"distill": 0.5, "temperature": 2.0}),
}


def base_model(path: Path, epochs: int) -> Path:
    if not (path / "report.json").is_file():
        train(RunConfig(model="vit-tiny"), epochs=epochs, lr=2e-3, output_dir=str(path), overwrite=True)
    return path / "model.safetensors"


def recipe_study(args: argparse.Namespace, runs: Path, pretrained: Path) -> None:
    """4x over seeds: constant vs cosine search LR, and distillation in retraining. Seed 0 of the default recipe is
    the main table's 4x run. Runs already present are reused."""
    results: dict[str, list[dict]] = {name: [] for name in RECIPES}
    for name, (_, changes) in RECIPES.items():
        for seed in args.seeds:
            out = runs / ("p0.75" if name == "constant" and seed == 0 else f"study-p0.75-{name}-seed{seed}")
            if not (out / "report.json").is_file():
                cfg = dataclasses.replace(RunConfig(model="vit-tiny"), seed=seed)
                recipe = Recipe(epochs_search=args.epochs_search, epochs=args.epochs, **changes)
                compress(cfg, upop.PruneConfig(p=0.75), str(pretrained), recipe, str(out), overwrite=True)
            r = CompressReport.read(out)
            results[name].append(
                {
                    "seed": seed,
                    "top1": r.compressed.metrics["top1"],
                    "top1_last": r.compressed_last.metrics["top1"],
                    "top1_searched": r.searched_metrics["top1"],
                    "epoch": r.compressed.epoch,
                }
            )
    lines = [
        f"4x (p = 0.75) on vit-tiny, search {args.epochs_search} + retraining {args.epochs} epochs, seeds "
        f"{', '.join(map(str, args.seeds))}; top-1 on the report split (2000 val scenes), the retraining epoch chosen "
        "on the selection split (1000 scenes carved from train).",
        "",
        "| recipe | top-1, selected epoch | top-1, last epoch | top-1 before retraining | per seed (selected) |",
        "|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        cells = [RECIPES[name][0]]
        for key in ("top1", "top1_last", "top1_searched"):
            values = [r[key] for r in rows]
            cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}")
        cells.append(" / ".join(f"{r['top1']:.2f}" for r in rows))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "recipe.md").write_text(text)
    (RESULTS / "recipe.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


def deit_small_row(iters: int, align_attn: int = 1, align_mlp: int = 1, granularity: str = "dim") -> dict[str, float]:
    """Real-size DeiT-Small (random weights, 197 tokens): dense vs a 2x plan from a 3-step search on random data.
    Latency and FLOPs only (no accuracy: nothing real to train on here)."""
    torch.manual_seed(0)
    dense = build_model("timm:deit_small_patch16_224", 1000)
    model = build_model("timm:deit_small_patch16_224", 1000)
    model.load_state_dict(dense.state_dict())
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    config = upop.PruneConfig(
        p=0.5, total_steps=3, interval=1, align_attn=align_attn, align_mlp=align_mlp, granularity=granularity
    )
    pruner = upop.Pruner(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        (torch.nn.functional.cross_entropy(model(x), y) + pruner.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    small = pruner.compress()
    xb = torch.randn(16, 3, 224, 224)
    latency, speedup = paired_latency({"dense": dense, "small": small}, xb, iters=iters, warmup=2)
    f = {k: upop.profile(m, xb[:1])["flops"] for k, m in (("dense", dense), ("small", small))}
    return {
        "flops_reduction": f["dense"] / f["small"],
        "latency_speedup": speedup["small"],
        "dense_latency_s": latency["dense"],
        "batch": 16,
    }


def step_times(steps: int, rounds: int, batch: int) -> dict[str, float]:
    """Seconds per optimizer step: plain training vs UPop search (hooks, sparsity loss, Pruner.step); per runner the
    fastest of ``rounds`` interleaved rounds of ``steps`` steps."""
    task = get_task("classification")
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 30, (batch,))

    def make(search: bool):
        torch.manual_seed(0)
        model = build_model("vit-tiny", 30).train()
        pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10**6)) if search else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = task.loss(model, (x, y))
            if pruner is not None:
                loss = loss + pruner.sparsity_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if pruner is not None:
                pruner.step()

        return step

    runners = {"plain": make(False), "search": make(True)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(rounds + 1):
        order = list(runners.items()) if r % 2 else list(runners.items())[::-1]  # alternate who goes first
        for name, step in order:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if r:  # round 0 warms up
                times[name].append((time.perf_counter() - start) / steps)
    return {k: min(v) for k, v in times.items()}


def measure(args: argparse.Namespace, runs: Path) -> None:
    """Timing part, run in a fresh process: latency, FLOPs, step times; then the tables."""
    reports = {p: CompressReport.read(runs / f"p{p}") for p in VARIANTS}
    x = torch.randn(args.latency_batch, 3, 32, 32)
    models = {"dense": build_model("vit-tiny", 30)}
    load_weights(models["dense"], runs / "base" / "model.safetensors")  # the trained weights, as compressed
    for p in reports:
        models[p] = upop.load_compressed(build_model("vit-tiny", 30), runs / f"p{p}")
    latency, speedups = paired_latency(models, x, iters=args.latency_iters)
    flops = {k: upop.profile(m, x[:1])["flops"] for k, m in models.items()}
    params = {k: upop.profile(m, x[:1])["params"] for k, m in models.items()}
    steps = step_times(steps=10, rounds=3 * args.rounds, batch=128)
    deit = {key: deit_small_row(args.latency_iters // 3, **settings) for key, (_, settings) in DEIT_ROWS.items()}

    dense_top1 = reports["0.5"].dense.metrics["top1"]  # the report split (val scenes)
    rows = [
        (
            "model",
            "top-1",
            "top-1 before retraining",
            "params",
            "FLOPs/img",
            "FLOPs reduction",
            "latency speedup",
            "speedup / FLOPs reduction",
        )
    ]
    rows.append(
        (
            "dense vit-tiny",
            f"{dense_top1:.2f}",
            "",
            f"{params['dense'] / 1e3:.1f}k",
            f"{flops['dense'] / 1e6:.2f}M",
            "1.00x",
            "1.00x",
            "",
        )
    )
    result = {
        "dense": {"top1": dense_top1, "params": params["dense"], "flops": flops["dense"], "latency_s": latency["dense"]}
    }
    for p, rep in reports.items():
        red = flops["dense"] / flops[p]
        speed = speedups[p]
        name = VARIANTS[p][0]
        top1 = rep.compressed.metrics["top1"]
        rows.append(
            (
                name,
                f"{top1:.2f} ({100 * top1 / dense_top1:.1f}% of dense)",
                f"{rep.searched_metrics['top1']:.2f}",
                f"{params[p] / 1e3:.1f}k",
                f"{flops[p] / 1e6:.2f}M",
                f"{red:.2f}x",
                f"{speed:.2f}x",
                f"{speed / red:.2f}",
            )
        )
        result[str(p)] = {
            "top1": top1,
            "top1_before_retraining": rep["searched_metrics"]["top1"],
            "params": params[p],
            "flops": flops[p],
            "latency_s": latency[p],
            "flops_reduction": red,
            "latency_speedup": speed,
            "kept": rep["kept"],
            "pruned_cost_fraction": rep["pruned_cost_fraction"],
        }
    for key, (label, _) in DEIT_ROWS.items():
        row = deit[key]
        reduction, speed = row["flops_reduction"], row["latency_speedup"]
        rows.append((label, "-", "-", "", "", f"{reduction:.2f}x", f"{speed:.2f}x", f"{speed / reduction:.2f}"))
        result[key] = row
    result["step_time_s"] = steps
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    ratio = steps["search"] / steps["plain"]
    text = "\n".join(table) + (
        f"\n\nSearch step {1000 * steps['search']:.1f} ms vs plain training step {1000 * steps['plain']:.1f} ms "
        f"(vit-tiny, batch 128, fastest of {3 * args.rounds} interleaved rounds of 10 steps): ratio {ratio:.3f}.\n"
        f"Latency speedup: median ratio of back-to-back forwards of the dense and the compressed model, "
        f"{args.latency_iters} pairs for vit-tiny (batch {args.latency_batch}), {args.latency_iters // 3} for "
        f"DeiT-Small (batch 16); {torch.get_num_threads()} CPU threads, in a fresh process.\n"
        f"Accuracy: top-1 on the report split (2000 built-in val scenes); search {args.epochs_search} epochs + "
        f"retraining {args.epochs} epochs on 19k built-in train scenes, the retraining epoch (and the base model's "
        f"epoch, of {args.base_epochs}) chosen on 1000 scenes carved from train; seed 0.\n"
    )
    (RESULTS / "vit.md").write_text(text)
    (RESULTS / "vit.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--epochs-search", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--latency-batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the step-time comparison")
    ap.add_argument("--latency-iters", type=int, default=90, help="back-to-back forward pairs for latency")
    ap.add_argument("--measure-only", action="store_true", help="skip training; time the saved models")
    ap.add_argument("--study-only", action="store_true", help="only the recipe study (reusing finished runs)")
    ap.add_argument(
        "--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2], help="seeds of the recipe study"
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs = ROOT / "runs" / "bench"
    if args.measure_only:
        measure(args, runs)
        return
    pretrained = base_model(runs / "base", args.base_epochs)
    if args.study_only:
        recipe_study(args, runs, pretrained)
        return
    cfg = RunConfig(model="vit-tiny")
    recipe = Recipe(epochs_search=args.epochs_search, epochs=args.epochs)
    for p, (_, config) in VARIANTS.items():
        compress(cfg, config, str(pretrained), recipe, str(runs / f"p{p}"), overwrite=True)
    # timings in a fresh process: a long training run leaves the allocator and caches in a state that skews them
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure-only",
            "--rounds",
            str(args.rounds),
            "--latency-batch",
            str(args.latency_batch),
            "--epochs-search",
            str(args.epochs_search),
            "--epochs",
            str(args.epochs),
            "--base-epochs",
            str(args.base_epochs),
        ],
        check=True,
    )
    recipe_study(args, runs, pretrained)


if __name__ == "__main__":
    main()
