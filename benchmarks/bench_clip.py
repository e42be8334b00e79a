"""`make bench` (retrieval section): dense vs UPop 2x and 4x on the built-in image-text retrieval task (clip-tiny, an
HF CLIPModel with a 64-wide vision and a 48-wide text tower, CPU), unified allocation (one budget over both towers)
beside uniform allocation (p in every structure), with the same search and retraining budget.

Reports mean recall and R@1 both ways (after retraining, and right after the search), params and FLOPs, the kept
fraction per tower, and the latency speedup per tower (median ratio of back-to-back encoder calls of the dense and
the compressed model, in one fresh process). Writes benchmarks/results/clip.md and .json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import upop
from upop.data.config import DataConfig
from upop.jobs.common import RunConfig
from upop.jobs.compress import Recipe, compress
from upop.jobs.train import train
from upop.models import build, build_model, load_weights
from upop.tasks.base import tokenize
from upop.tasks.retrieval import encode_images, encode_texts, recall_at_k

sys.path.insert(0, str(Path(__file__).parent))
from common import paired_latency, variant_row  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"  # the tables and raw values the docs include
DATA = DataConfig(train_size=4000, val_size=500)
CFG = RunConfig(task="retrieval", model="clip-tiny", data=DATA, batch_size=128)
VARIANTS = {  # run directory -> (row label, search configuration)
    "p0.5-unified": ("UPop 2x unified", upop.PruneConfig(p=0.5)),
    "p0.5-uniform": ("2x uniform", upop.PruneConfig(p=0.5, allocation="uniform")),
    "p0.75-unified": ("UPop 4x unified", upop.PruneConfig(p=0.75)),
    "p0.75-uniform": ("4x uniform", upop.PruneConfig(p=0.75, allocation="uniform")),
}


def tower_params(model: torch.nn.Module) -> dict[str, int]:
    return {
        "vision": sum(p.numel() for p in model.vision_model.parameters()),
        "text": sum(p.numel() for p in model.text_model.parameters()),
    }


def measure(args: argparse.Namespace, runs: Path) -> None:
    torch.set_num_threads(2)
    models = {"dense": build_model("clip-tiny", 0, kind="dual_encoder")}
    load_weights(models["dense"], runs / "base" / "model.safetensors")
    for name in VARIANTS:
        models[name] = upop.load_compressed(build_model("clip-tiny", 0, kind="dual_encoder"), runs / name)
    images = torch.randn(args.latency_batch, 3, 32, 32)
    captions = ["a large red circle left of a small blue square"] * args.latency_batch
    tokens = tokenize(build("clip-tiny", "dual_encoder").tokenizer, captions, torch.device("cpu"))
    for m in models.values():
        m.eval()
    _, vision = paired_latency({k: (lambda x, m=m: encode_images(m, x)) for k, m in models.items()}, images, args.iters)
    _, text = paired_latency({k: (lambda t, m=m: encode_texts(m, t)) for k, m in models.items()}, tokens, args.iters)
    rows = []
    for name, model in models.items():
        report = variant_row(runs, name)
        label = "dense clip-tiny" if name == "dense" else VARIANTS[name][0]
        rows.append(
            {
                "variant": name,
                "label": label,
                **report,
                "params": tower_params(model),
                "vision_speedup": vision[name],
                "text_speedup": text[name],
            }
        )
    # the metric at Karpathy COCO-5k test size: 5000 images x 25000 captions
    sims = torch.randn(5000, 25000, generator=torch.Generator().manual_seed(0))
    owner = torch.arange(5000).repeat_interleave(5)
    start = time.perf_counter()
    recall_at_k(sims, owner)
    recall_seconds = time.perf_counter() - start
    (RESULTS / "clip.json").write_text(
        json.dumps({"rows": rows, "recall_5k_x_25k_seconds": recall_seconds}, indent=1) + "\n"
    )
    lines = [
        "| variant | mean R | i2t R@1 | t2i R@1 | mean R before retraining | params vision / text | FLOPs reduction "
        "| kept vision attn / mlp | kept text attn / mlp | latency speedup vision / text |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense_mean = rows[0]["metrics"]["r_mean"]
    for r in rows:
        m, kv, kt = r["metrics"], r["kept"].get("vision", {}), r["kept"].get("text", {})
        share = f" ({100 * m['r_mean'] / dense_mean:.1f}%)" if r["searched"] else ""
        searched = f"{r['searched']['r_mean']:.2f}" if r["searched"] else "-"
        flops = f"{r['dense_flops'] / r['flops']:.2f}x" if r["flops"] else "1.00x"
        cells = [
            r["label"],
            f"{m['r_mean']:.2f}{share}",
            f"{m['i2t_r1']:.2f}",
            f"{m['t2i_r1']:.2f}",
            searched,
            f"{r['params']['vision'] / 1e3:.1f}k / {r['params']['text'] / 1e3:.1f}k",
            flops,
            f"{kv.get('attn', 1):.2f} / {kv.get('mlp', 1):.2f}",
            f"{kt.get('attn', 1):.2f} / {kt.get('mlp', 1):.2f}",
            f"{r['vision_speedup']:.2f}x / {r['text_speedup']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Recall@1/5/10 both ways on a 5000 x 25000 similarity matrix: {recall_seconds:.2f} s.")
    text_md = "\n".join(lines)
    (RESULTS / "clip.md").write_text(text_md + "\n")
    print(text_md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-epochs", type=int, default=15)
    parser.add_argument("--epochs-search", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--measure-only", action="store_true")
    args = parser.parse_args()
    runs = ROOT / "runs" / "bench-clip"
    if args.measure_only:
        measure(args, runs)
        return
    torch.set_num_threads(2)
    if not (runs / "base" / "report.json").is_file():
        train(CFG, epochs=args.base_epochs, lr=1e-3, output_dir=str(runs / "base"), overwrite=True)
    for name, (_, config) in VARIANTS.items():
        recipe = Recipe(epochs_search=args.epochs_search, epochs=args.epochs)
        compress(CFG, config, str(runs / "base" / "model.safetensors"), recipe, str(runs / name), overwrite=True)
    # timings in a fresh process (a long training run leaves caches and the allocator in a skewing state)
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure-only",
            "--latency-batch",
            str(args.latency_batch),
            "--iters",
            str(args.iters),
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
