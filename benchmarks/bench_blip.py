"""`make bench` (BLIP section): dense vs UPop 2x and 4x with blip-tiny (BLIP's vision encoder and BERT text encoder
with cross-attention, width 64, 3 layers, 32 px, CPU) on the built-in NLVR task (twin cross-attention) and on
built-in image-text retrieval (ITC + ITM, rerank evaluation), unified allocation (one budget over vision, text and
cross-attention) beside uniform allocation (p in every structure), same search and retraining.

Reports the report-split metric (after retraining, and right after the search), params and FLOPs, the kept fraction
per tower (vision, text, cross), the latency speedup of the whole model (median ratio of back-to-back calls, fresh
process), and the cost of a search step against a plain training step on this CPU (fp32, interleaved rounds).
Writes benchmarks/results_{nlvr,blip_retrieval}.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import upop
from upop import run
from upop.models import build_model, load_weights
from upop.tasks import DataConfig, get_task

sys.path.insert(0, str(Path(__file__).parent))
from common import paired_latency, variant_row  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
LR = 3e-4  # post-LN BERT layers from scratch: 1e-3 does not learn (measured), 3e-4 does


@dataclasses.dataclass(frozen=True)
class Bench:
    """One task's benchmark: its run configuration, the model kind, the metric of the table, the results' name."""

    cfg: run.RunConfig
    kind: str
    metric: str
    name: str
    text: str  # a statement or caption for the latency inputs


BENCHES = {
    "nlvr": Bench(
        run.RunConfig(task="nlvr", model="blip-tiny", data=DataConfig(train_size=20000, val_size=1000), batch_size=64),
        "nlvr",
        "accuracy",
        "nlvr",
        "only one image contains a red object",
    ),
    "retrieval": Bench(
        run.RunConfig(
            task="retrieval", model="blip-tiny", data=DataConfig(train_size=4000, val_size=500), batch_size=64
        ),
        "dual_encoder",
        "r_mean",
        "blip_retrieval",
        "a large red circle left of a small blue square",
    ),
}
VARIANTS = {  # run directory -> (row label, search configuration)
    "p0.5-unified": ("UPop 2x unified", upop.PruneConfig(p=0.5)),
    "p0.5-uniform": ("2x uniform", upop.PruneConfig(p=0.5, allocation="uniform")),
    "p0.75-unified": ("UPop 4x unified", upop.PruneConfig(p=0.75)),
    "p0.75-uniform": ("4x uniform", upop.PruneConfig(p=0.75, allocation="uniform")),
}


def step_ratio(bench: Bench, rounds: int = 4, steps: int = 10) -> dict[str, float]:
    """Seconds per training step of blip-tiny at the benchmark's batch, plain vs search (fastest of interleaved
    rounds), fp32 on this CPU."""
    task = get_task(bench.cfg.task)
    data = task.datasets(DataConfig(train_size=64, val_size=8, image_size=32)).train
    batch = next(iter(torch.utils.data.DataLoader(data, bench.cfg.batch_size)))

    def make(search: bool):
        torch.manual_seed(0)
        model = build_model("blip-tiny", 2, kind=bench.kind).train()
        config = upop.PruneConfig(p=0.5, total_steps=10**6, align_attn=1, align_mlp=1)
        pruner = upop.Pruner(model, config) if search else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            loss = task.loss(model, batch)
            if pruner is not None:
                loss = loss + pruner.sparsity_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()

        return step

    runners = {"plain": make(False), "search": make(True)}
    best = {k: float("inf") for k in runners}
    for r in range(rounds + 1):
        for name, step in list(runners.items())[:: 1 if r % 2 else -1]:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if r:
                best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return {**best, "ratio": best["search"] / best["plain"]}


def measure(bench: Bench, args: argparse.Namespace, runs: Path) -> None:
    torch.set_num_threads(2)
    models = {"dense": build_model("blip-tiny", 2, kind=bench.kind)}
    load_weights(models["dense"], runs / "base" / "model.safetensors")
    for name in VARIANTS:
        models[name] = upop.load_compressed(build_model("blip-tiny", 2, kind=bench.kind), runs / name)
    tokens = models["dense"].upop_tokenizer([bench.text] * args.latency_batch)
    pairs = (2,) if bench.kind == "nlvr" else ()
    inputs = {"pixel_values": torch.randn(args.latency_batch, *pairs, 3, 32, 32), **tokens}
    for m in models.values():
        m.eval()
    _, speed = paired_latency({k: (lambda x, m=m: m(**x)) for k, m in models.items()}, inputs, args.iters)
    rows = []
    for name, model in models.items():
        row = variant_row(runs, name)
        label = f"dense blip-tiny ({bench.cfg.task})" if name == "dense" else VARIANTS[name][0]
        params = sum(p.numel() for p in model.parameters())
        rows.append({"variant": name, "label": label, **row, "params": params, "speedup": speed[name]})
    steps = step_ratio(bench)
    (HERE / f"results_{bench.name}.json").write_text(json.dumps({"rows": rows, "search_step": steps}, indent=1) + "\n")
    lines = [
        f"| variant | {bench.metric} | before retraining | params | FLOPs reduction | kept vision attn / mlp "
        "| kept text attn / mlp | kept cross attn | latency speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    dense_value = rows[0]["metrics"][bench.metric]
    for r in rows:
        k = r["kept"]
        kv, kt, kc = k.get("vision", {}), k.get("text", {}), k.get("cross", {})
        share = f" ({100 * r['metrics'][bench.metric] / dense_value:.1f}%)" if r["searched"] else ""
        cells = [
            r["label"],
            f"{r['metrics'][bench.metric]:.2f}{share}",
            f"{r['searched'][bench.metric]:.2f}" if r["searched"] else "-",
            f"{r['params'] / 1e3:.1f}k",
            f"{r['dense_flops'] / r['flops']:.2f}x" if r["flops"] else "1.00x",
            f"{kv.get('attn', 1):.2f} / {kv.get('mlp', 1):.2f}",
            f"{kt.get('attn', 1):.2f} / {kt.get('mlp', 1):.2f}",
            f"{kc.get('attn', 1):.2f}",
            f"{r['speedup']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Search step vs plain training step (blip-tiny, {bench.cfg.task}, batch {bench.cfg.batch_size}, fp32, this "
        f"CPU): {steps['ratio']:.2f}x "
        f"({1e3 * steps['search']:.0f} ms vs {1e3 * steps['plain']:.0f} ms)."
    )
    text = "\n".join(lines)
    (HERE / f"results_{bench.name}.md").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="nlvr,retrieval")
    parser.add_argument("--base-epochs", type=int, default=12)
    parser.add_argument("--epochs-search", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--measure-only", action="store_true")
    args = parser.parse_args()
    for task in args.tasks.split(","):
        bench = BENCHES[task]
        runs = ROOT / "runs" / f"bench-{bench.name.replace('_', '-')}"
        if args.measure_only:
            measure(bench, args, runs)
            continue
        torch.set_num_threads(2)
        if not (runs / "base" / "report.json").is_file():
            run.train(bench.cfg, epochs=args.base_epochs, lr=LR, output_dir=str(runs / "base"), overwrite=True)
        for name, (_, config) in VARIANTS.items():
            if (runs / name / "report.json").is_file():
                continue
            recipe = run.Recipe(epochs_search=args.epochs_search, epochs=args.epochs, lr_search=LR, lr=LR)
            base = str(runs / "base" / "model.safetensors")
            run.compress(bench.cfg, config, base, recipe, str(runs / name), overwrite=True)
        subprocess.run(  # timings in a fresh process
            [
                sys.executable,
                __file__,
                "--measure-only",
                "--tasks",
                task,
                "--latency-batch",
                str(args.latency_batch),
                "--iters",
                str(args.iters),
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
