"""`make bench` (peers): how UPop compares with the baselines a reviewer asks for, at equal budgets, over seeds.

On one dense base per task (the built-in classification task with vit-tiny, retrieval with clip-tiny; CPU), at 2x and
4x (p = 0.5 and 0.75 of the prunable parameters), every method prunes the same internal widths (attention head dims,
shared by all heads and by q, k, v, and MLP neurons; the embedding width is kept) and gets the same total training:

- UPop, default ranking; UPop with the paper's ranking (``PAPER_RANKING``); UPop ``--allocation uniform``: search S
  epochs, then retrain R epochs.
- Torch-Pruning (a benchmark-only extra, ``pip install .[bench]``; never a runtime dependency), through its public
  API: ``MetaPruner`` with Taylor (``GroupTaylorImportance``, gradients of 10 training batches) or L2 magnitude
  (``GroupMagnitudeImportance``) importance, one shot, its per-layer ratio (and, in the "global" row, its one global
  ratio) bisected to UPop's parameter budget; then retrained S + R epochs. Its decision (which rows it kept) is read
  off the pruned weights and handed to ``upop.compress(plan=...)``, so retraining, selection and evaluation are
  the very code UPop's own rows run.

Every score is on the report split, the retraining epoch chosen on the selection split. Seeds change the search and
retraining data order (and Torch-Pruning's Taylor batches); the base is shared. Writes benchmarks/results/peers.md and
.json.
Runs already present under runs/bench-peers are reused.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import upop
from upop.adapters import find_adapter
from upop.core.config import PAPER_RANKING
from upop.core.plan import Plan
from upop.data.config import DataConfig
from upop.jobs.common import RunConfig, device_name, prepare
from upop.jobs.compress import Recipe, compress
from upop.jobs.report import CompressReport, TrainReport
from upop.jobs.train import train

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"  # the tables and raw values the docs include
TAYLOR_BATCHES = 10

TASKS = {  # name -> (run config, base training epochs and LR, search epochs, retraining epochs, metric)
    "classification": (RunConfig(model="vit-tiny"), 15, 2e-3, 2, 3, "top1"),
    "retrieval": (
        RunConfig(task="retrieval", model="clip-tiny", data=DataConfig(train_size=4000, val_size=500)),
        15,
        1e-3,
        3,
        6,
        "r_mean",
    ),
}
METHODS = {  # name -> (row label, kind, settings)
    "upop": ("UPop (default: --score fisher --floor 0.5)", "upop", {}),
    "upop-paper": ("UPop, paper's ranking", "upop", dict(PAPER_RANKING)),
    "uniform": ("UPop --allocation uniform", "upop", {"allocation": "uniform"}),
    "heads": ("UPop --granularity head (whole heads)", "upop", {"granularity": "head"}),
    "mixed": ("UPop --granularity mixed (heads, then dims)", "upop", {"granularity": "mixed"}),
    "tp-taylor": ("Torch-Pruning Taylor", "tp", {"importance": "taylor", "global": False}),
    "tp-magnitude": ("Torch-Pruning L2 magnitude", "tp", {"importance": "magnitude", "global": False}),
    "tp-taylor-global": ("Torch-Pruning Taylor, global ratio", "tp", {"importance": "taylor", "global": True}),
    # the ranking study (what was tried to make the unified ranking earn its keep), one change from the paper's each
    "study-snr": ("paper's ranking, --score snr", "upop", {**PAPER_RANKING, "score": "snr"}),
    "study-snr-floor0.5": ("--score snr --floor 0.5", "upop", {**PAPER_RANKING, "score": "snr", "floor": 0.5}),
    "study-fisher": ("paper's ranking, --score fisher", "upop", {**PAPER_RANKING, "score": "fisher"}),
    "uniform-paper": ("--allocation uniform --paper-ranking", "upop", {**PAPER_RANKING, "allocation": "uniform"}),
    "study-fisher-tower": (
        "--score fisher --floor 0.5 --standardise tower",
        "upop",
        {"score": "fisher", "floor": 0.5, "standardise": "tower"},
    ),
    "study-structure": (
        "paper's ranking, --standardise structure",
        "upop",
        {**PAPER_RANKING, "standardise": "structure"},
    ),
    "study-floor0.5": ("paper's ranking, --floor 0.5", "upop", {**PAPER_RANKING, "floor": 0.5}),
}
MAIN = ["upop", "upop-paper", "uniform", "heads", "mixed", "tp-taylor", "tp-magnitude", "tp-taylor-global"]
STUDY = {  # task -> (budgets, methods) of the ranking study
    "classification": (
        "0.75",
        [
            "upop",
            "upop-paper",
            "study-fisher",
            "study-snr",
            "study-snr-floor0.5",
            "study-floor0.5",
            "study-structure",
            "uniform",
            "uniform-paper",
        ],
    ),
    "retrieval": ("0.5,0.75", ["upop", "upop-paper", "study-fisher-tower"]),
}


# ------------------------------------------------------------------------------------------------ Torch-Pruning
def _kept_rows(original: torch.Tensor, pruned: torch.Tensor, groups: int, block: int) -> list[torch.Tensor]:
    """Per output group, the element indices whose rows survive in ``pruned`` (rows laid out (groups, n, block))."""
    o = original.detach().reshape(groups, -1, block * original.shape[-1]).double()
    p = pruned.detach().reshape(groups, -1, block * pruned.shape[-1]).double()
    probe = torch.randn(o.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kept = []
    for g in range(groups):
        index = ((p[g] @ probe)[:, None] - (o[g] @ probe)[None, :]).abs().argmin(1)
        if not torch.equal(o[g][index], p[g]):
            raise RuntimeError("Torch-Pruning changed rows it kept; cannot read its decision off the weights")
        kept.append(index.sort().values)
    return kept


def tp_choice(model: torch.nn.Module, example: Any, ratio: float, importance: Any, global_pruning: bool, grads: Any):
    """Run Torch-Pruning on a copy of ``model`` and return its decision as UPop choices (per structure, True =
    pruned). Only the rows of UPop's structures (q/k/v or fused qkv, the first MLP linear) are roots, so it prunes
    head dims (the same in every head, ``prune_head_dims``) and MLP neurons; the embedding width is kept."""
    import torch_pruning as tp

    work = copy.deepcopy(model)
    structures = find_adapter(work).structures(work, "dim")
    rows = [(r.module, r.groups, r.block, r.module.weight.detach().clone()) for s in structures for r in s.rows]
    roots = {r[0] for r in rows}
    ignored = [m for m in work.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m not in roots]
    heads = {
        r.module: r.groups // (3 if r.groups % 3 == 0 and "qkv" in r.path else 1)
        for s in structures
        if s.kind == "attn"
        for r in s.rows
    }
    pruner = tp.pruner.MetaPruner(
        work,
        example,
        importance=importance,
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=ignored,
        num_heads=heads,
        prune_head_dims=True,
        prune_num_heads=False,
    )
    if grads is not None:  # Taylor: the gradients of a few training batches, on the model being pruned
        work.zero_grad()
        grads(work)
    pruner.step()
    chosen, at = [], 0
    for s in structures:
        sets = []
        for _ in s.rows:
            module, groups, block, original = rows[at]
            at += 1
            sets.extend(_kept_rows(original, module.weight, groups, block))
        if any(not torch.equal(sets[0], k) for k in sets[1:]):
            raise RuntimeError(f"Torch-Pruning kept different dims in the heads or q/k/v of {s.name}")
        c = torch.ones(s.size, dtype=torch.bool)
        c[sets[0]] = False
        chosen.append(c)
    return chosen


def as_upop_plan(model: torch.nn.Module, chosen: list[torch.Tensor]) -> tuple[float, Plan]:
    """A choice as UPop sees it: the fraction of the prunable parameters it removes (UPop's params cost, the budget
    every row meets) and its plan."""
    pruner = upop.Pruner(copy.deepcopy(model), upop.PruneConfig(p=0.5, align_attn=1, align_mlp=1))
    pruner.set_choice(chosen, 0.0)
    return pruner.pruned_cost_fraction(), pruner.plan()


def tp_plan(cfg: RunConfig, pretrained: str, p: float, settings: dict) -> tuple[Plan, dict]:
    """Torch-Pruning's plan at UPop's budget p: its ratio bisected until the removed share of prunable params is
    closest to p."""
    import torch_pruning as tp

    torch.manual_seed(cfg.seed)
    setup = prepare(cfg, pretrained)
    model = setup.model
    task = setup.task
    example = task.example_inputs(next(iter(setup.loaders.report)), model)
    grads = None
    if settings["importance"] == "taylor":
        importance = tp.importance.GroupTaylorImportance()
        batches = []
        for batch in setup.loaders.train:
            batches.append(batch)
            if len(batches) == TAYLOR_BATCHES:
                break

        def grads(m: torch.nn.Module) -> None:
            for batch in batches:
                task.loss(m, batch).backward()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    low, high, best = 0.0, 0.99, None
    for _ in range(12):
        ratio = (low + high) / 2
        chosen = tp_choice(model, example, ratio, importance, settings["global"], grads)
        removed, plan = as_upop_plan(model, chosen)
        if best is None or abs(removed - p) < abs(best[1] - p):
            best = (ratio, removed, plan)
        low, high = (ratio, high) if removed < p else (low, ratio)
    ratio, removed, plan = best
    return plan, {"ratio": ratio, "removed": removed}


# ------------------------------------------------------------------------------------------------------ runs
def base(task: str, runs: Path) -> str:
    cfg, epochs, lr, *_ = TASKS[task]
    if not (runs / "base" / "report.json").is_file():
        train(cfg, epochs=epochs, lr=lr, output_dir=str(runs / "base"), overwrite=True)
    return str(runs / "base" / "model.safetensors")


def one_run(task: str, method: str, p: float, seed: int, runs: Path, pretrained: str) -> dict:
    cfg, _, _, search, retrain, metric = TASKS[task]
    cfg = dataclasses.replace(cfg, seed=seed)
    out = runs / f"{method}-p{p}-seed{seed}"
    _, kind, settings = METHODS[method]
    extra = {}
    if not (out / "report.json").is_file():
        start = time.time()
        if kind == "upop":
            recipe = Recipe(epochs_search=search, epochs=retrain)
            compress(cfg, upop.PruneConfig(p=p, **settings), pretrained, recipe, str(out), overwrite=True)
        else:
            plan, extra = tp_plan(cfg, pretrained, p, settings)
            recipe = Recipe(epochs_search=0, epochs=search + retrain)
            compress(cfg, upop.PruneConfig(p=p), pretrained, recipe, str(out), overwrite=True, plan=plan)
            (out / "torch_pruning.json").write_text(json.dumps(extra) + "\n")
        print(f"{task} {method} p={p} seed {seed}: {time.time() - start:.0f} s", flush=True)
    r = CompressReport.read(out)
    stability = r.stability or {}
    return {
        "seed": seed,
        "score": r.compressed.metrics[metric],
        "last": r.compressed_last.metrics[metric],
        "before_retraining": r.searched_metrics[metric],
        "removed": r.pruned_cost_fraction,
        "speedup": r.speed.speedup,
        "min_kept": min(s["kept"] / s["size"] for s in r.per_structure),
        "overlap": stability.get("overlap"),
    }


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(task: str, results: dict, dense: float, seeds: list[int]) -> list[str]:
    cfg, _, _, search, retrain, metric = TASKS[task]
    lines = [
        f"**{task}** ({cfg.model}; {metric} on the report split, dense {dense:.2f}; UPop searches {search} + retrains "
        f"{retrain} epochs, Torch-Pruning retrains {search + retrain}; seeds {', '.join(map(str, seeds))})",
        "",
        "| budget | method | mean ± std | per seed | last epoch | before retraining | params removed |"
        " smallest kept share | speedup (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p, rows in results.items():
        for method, rs in rows.items():
            cells = [
                f"{1 / (1 - p):.0f}x (p = {p})",
                METHODS[method][0],
                _ms([r["score"] for r in rs]),
                " / ".join(f"{r['score']:.2f}" for r in rs),
                _ms([r["last"] for r in rs]),
                _ms([r["before_retraining"] for r in rs]),
                f"{statistics.mean(r['removed'] for r in rs):.3f}",
                f"{min(r['min_kept'] for r in rs):.3f}",
                f"{statistics.median(r['speedup'] for r in rs):.2f}x",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="classification,retrieval")
    parser.add_argument("--methods", default=",".join(MAIN), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--ps", default="0.5,0.75")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--study",
        action="store_true",
        help="the ranking study instead (STUDY), written to benchmarks/results/peers_study.md",
    )
    args = parser.parse_args()
    plan = (
        {task: (ps, methods) for task, (ps, methods) in STUDY.items()}
        if args.study
        else {task: (args.ps, args.methods.split(",")) for task in args.tasks.split(",")}
    )
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    everything, lines = {}, []
    for task, (ps, methods) in plan.items():
        runs = ROOT / "runs" / "bench-peers" / task
        pretrained = base(task, runs)
        dense = TrainReport.read(runs / "base").metrics[TASKS[task][5]]
        results = {
            float(p): {m: [one_run(task, m, float(p), s, runs, pretrained) for s in seeds] for m in methods}
            for p in ps.split(",")
        }
        everything[task] = {"dense": dense, "results": results}
        lines += table(task, results, dense, seeds) + [""]
    lines.append(
        f"Machine: {device_name(None)}, 2 threads. Speedup: the compressed model against the dense one, median of "
        "30 back-to-back pairs at the evaluation batch, median over seeds."
    )
    text = "\n".join(lines) + "\n"
    name = "peers_study" if args.study else "peers"
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(everything, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
