"""`make bench` (BLIP section): dense vs UPop 2x and 4x with blip-tiny (BLIP's vision encoder and BERT text encoder
with cross-attention, width 64, 3 layers, 32 px, CPU) on the built-in NLVR task (twin cross-attention), built-in
image-text retrieval (ITC + ITM, rerank evaluation), built-in captioning (HF BlipForConditionalGeneration: the text
decoder) and built-in VQA (question encoder and answer decoder); unified allocation (one budget over every tower)
beside uniform allocation (p in every structure), same search and retraining.

Reports the report-split metric (after retraining, and right after the search), params and FLOPs, the kept fraction
per tower, the speed of the whole model (NLVR, retrieval: forward latency; captioning, VQA: generated tokens per
second with HF's generate and its KV cache), all as median ratios of back-to-back calls in a fresh process, the
trivial baselines of the generative tasks (the most common caption, the majority answer), and the cost of a search
step against a plain training step on this CPU (fp32, interleaved rounds). Writes
benchmarks/results/{nlvr,blip_retrieval,caption,vqa}.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import upop
from upop.data.config import DataConfig
from upop.jobs.common import RunConfig
from upop.jobs.compress import Recipe, compress
from upop.jobs.train import train
from upop.models import build, build_model, load_weights
from upop.tasks import get_task
from upop.tasks.caption import MAX_LENGTH, caption_scores, generate_captions
from upop.tasks.vqa import MAX_LENGTH as VQA_MAX_LENGTH
from upop.tasks.vqa import normalise_answer, vqa_accuracy

sys.path.insert(0, str(Path(__file__).parent))
from common import paired_latency, variant_row  # noqa: E402
from common import step_ratio as common_step_ratio  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results"  # the tables and raw values the docs include
LR = 3e-4  # post-LN BERT layers from scratch: 1e-3 does not learn (measured), 3e-4 does


@dataclasses.dataclass(frozen=True)
class Bench:
    """One task's benchmark: its run configuration, the model kind, the metric of the table, the results' name."""

    cfg: RunConfig
    kind: str
    metric: str
    name: str
    text: str  # a statement or caption for the latency inputs


BENCHES = {
    "nlvr": Bench(
        RunConfig(task="nlvr", model="blip-tiny", data=DataConfig(train_size=20000, val_size=1000), batch_size=64),
        "nlvr",
        "accuracy",
        "nlvr",
        "only one image contains a red object",
    ),
    "retrieval": Bench(
        RunConfig(task="retrieval", model="blip-tiny", data=DataConfig(train_size=4000, val_size=500), batch_size=64),
        "dual_encoder",
        "r_mean",
        "blip_retrieval",
        "a large red circle left of a small blue square",
    ),
}
GENERATIVE = {
    "caption": Bench(
        RunConfig(task="caption", model="blip-tiny", data=DataConfig(train_size=4000, val_size=500), batch_size=64),
        "captioner",
        "cider",
        "caption",
        "",
    ),
    "vqa": Bench(
        RunConfig(task="vqa", model="blip-tiny", data=DataConfig(train_size=20000, val_size=1000), batch_size=64),
        "vqa",
        "accuracy",
        "vqa",
        "",
    ),
}
BENCHES.update(GENERATIVE)
VARIANTS = {  # run directory -> (row label, search configuration)
    "p0.5-unified": ("UPop 2x unified", upop.PruneConfig(p=0.5)),
    "p0.5-uniform": ("2x uniform", upop.PruneConfig(p=0.5, allocation="uniform")),
    "p0.75-unified": ("UPop 4x unified", upop.PruneConfig(p=0.75)),
    "p0.75-uniform": ("4x uniform", upop.PruneConfig(p=0.75, allocation="uniform")),
}


def step_ratio(bench: Bench) -> dict[str, float]:
    """Plain vs search step of blip-tiny at the benchmark's batch (``common.step_ratio``)."""
    task = get_task(bench.cfg.task, build("blip-tiny", bench.kind, 2))
    data = task.datasets(DataConfig(train_size=64, val_size=8, image_size=32)).train
    loader = torch.utils.data.DataLoader(data, bench.cfg.batch_size, collate_fn=getattr(data, "collate", None))
    batch = next(iter(loader))
    return common_step_ratio(lambda: build_model("blip-tiny", 2, kind=bench.kind), lambda m: task.loss(m, batch))


def trivial_baseline(bench: Bench) -> dict[str, Any]:
    """What a model that ignores the image scores on the report split: the training split's majority answer for VQA
    (its most common normalised human answer), its most common caption for captioning."""
    task = get_task(bench.cfg.task)
    splits = task.datasets(dataclasses.replace(bench.cfg.data, image_size=32))
    if bench.kind == "vqa":
        answer = Counter(normalise_answer(a) for humans in splits.train.answers for a in humans).most_common(1)[0][0]
        report = splits.report
        score = sum(vqa_accuracy(answer, h) for h in report.answers) / len(report.answers)
        return {"what": f"the majority answer {answer!r}", "accuracy": 100.0 * score}
    caption = Counter(splits.train.captions).most_common(1)[0][0]
    refs = dict(enumerate(splits.report.references))
    return {"what": f"the most common caption {caption!r}", **caption_scores(refs, dict.fromkeys(refs, caption))}


def generation_speed(models: dict[str, torch.nn.Module], bench: Bench, args: argparse.Namespace) -> dict:
    """Generated tokens per second of each model and its speedup over dense (median of back-to-back ratios), at
    the benchmark's batch, with the task's decoding (captions: 3 beams after the prompt; VQA: 3 beams from the start
    token), every call made to generate exactly as many tokens (min length = max length) so the counts are equal."""
    x = torch.randn(args.latency_batch, 3, 32, 32)
    tokenizer = build("blip-tiny", bench.kind).tokenizer
    if bench.kind == "captioner":
        new = MAX_LENGTH - 4  # the prompt (start token, "a picture of") is 4 of the 20

        def call(m):
            return lambda x: generate_captions(m, tokenizer, x, min_length=MAX_LENGTH, max_length=MAX_LENGTH)

    else:
        new = VQA_MAX_LENGTH - 1
        q = tokenizer(["how many circles are there?"] * args.latency_batch)

        def call(m):
            return lambda images: m.generate(
                images,
                q["input_ids"],
                q["attention_mask"],
                num_beams=3,
                min_length=VQA_MAX_LENGTH,
                max_length=VQA_MAX_LENGTH,
            )

    for m in models.values():
        m.eval()
    seconds, speed = paired_latency({k: call(m) for k, m in models.items()}, x, args.iters // 2)
    tokens = new * args.latency_batch
    return {"tokens_per_s": {k: tokens / v for k, v in seconds.items()}, "speedup": speed, "new_tokens": new}


def measure_generative(bench: Bench, args: argparse.Namespace, runs: Path) -> None:
    torch.set_num_threads(2)
    models = {"dense": build_model("blip-tiny", 0, kind=bench.kind)}
    load_weights(models["dense"], runs / "base" / "model.safetensors")
    for name in VARIANTS:
        models[name] = upop.load_compressed(build_model("blip-tiny", 0, kind=bench.kind), runs / name)
    speed = generation_speed(models, bench, args)
    baseline = trivial_baseline(bench)
    rows = []
    for name, model in models.items():
        row = variant_row(runs, name)
        label = f"dense blip-tiny ({bench.cfg.task})" if name == "dense" else VARIANTS[name][0]
        params = sum(p.numel() for p in model.parameters())
        extra = {"tokens_per_s": speed["tokens_per_s"][name], "speedup": speed["speedup"][name]}
        rows.append({"variant": name, "label": label, **row, "params": params, **extra})
    steps = step_ratio(bench)
    result = {"rows": rows, "search_step": steps, "baseline": baseline, "new_tokens": speed["new_tokens"]}
    (args.results / f"{bench.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    metrics = ["cider", "bleu4"] if bench.kind == "captioner" else ["accuracy", "accuracy_yes_no", "accuracy_number"]
    towers = ["vision", "decoder"] if bench.kind == "captioner" else ["vision", "text", "cross", "decoder"]
    head = [*metrics, f"{bench.metric} before retraining", "params", "FLOPs reduction"]
    head += [f"kept {t} attn / mlp" for t in towers] + ["generated tokens/s (speedup)"]
    lines = ["| variant | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    dense_value = rows[0]["metrics"][bench.metric]
    for r in rows:
        share = f" ({100 * r['metrics'][bench.metric] / dense_value:.1f}%)" if r["searched"] and dense_value else ""
        cells = [r["label"], f"{r['metrics'][metrics[0]]:.2f}{share}"]
        cells += [f"{r['metrics'][m]:.2f}" for m in metrics[1:]]
        cells += [
            f"{r['searched'][bench.metric]:.2f}" if r["searched"] else "-",
            f"{r['params'] / 1e3:.1f}k",
            f"{r['dense_flops'] / r['flops']:.2f}x" if r["flops"] else "1.00x",
        ]
        for t in towers:
            kept = r["kept"].get(t, {})
            cells.append(
                f"{kept.get('attn', 1):.2f} / {kept['mlp']:.2f}" if "mlp" in kept else f"{kept.get('attn', 1):.2f}"
            )
        cells.append(f"{r['tokens_per_s']:.0f} ({r['speedup']:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    trivial = ", ".join(f"{m} {baseline[m]:.2f}" for m in metrics if m in baseline)
    lines += [
        "",
        f"Trivial baseline ({baseline['what']}, report split): {trivial}.",
        f"Generation: batch {args.latency_batch}, 3 beams, {speed['new_tokens']} new tokens per sample, HF generate "
        "with its KV cache, fp32, this CPU, models called back to back (median of per-call ratios).",
        f"Search step vs plain training step (blip-tiny, {bench.cfg.task}, batch {bench.cfg.batch_size}, fp32, this "
        f"CPU): {steps['ratio']:.2f}x ({1e3 * steps['search']:.0f} ms vs {1e3 * steps['plain']:.0f} ms).",
    ]
    text = "\n".join(lines)
    (args.results / f"{bench.name}.md").write_text(text + "\n")
    print(text)


def measure(bench: Bench, args: argparse.Namespace, runs: Path) -> None:
    if bench.name in GENERATIVE:
        measure_generative(bench, args, runs)
        return
    torch.set_num_threads(2)
    models = {"dense": build_model("blip-tiny", 2, kind=bench.kind)}
    load_weights(models["dense"], runs / "base" / "model.safetensors")
    for name in VARIANTS:
        models[name] = upop.load_compressed(build_model("blip-tiny", 2, kind=bench.kind), runs / name)
    tokens = build("blip-tiny", bench.kind).tokenizer([bench.text] * args.latency_batch)
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
    (args.results / f"{bench.name}.json").write_text(json.dumps({"rows": rows, "search_step": steps}, indent=1) + "\n")
    lines = [
        f"| variant | {bench.metric} | before retraining | params | FLOPs reduction | kept vision attn / mlp "
        "| kept text attn / mlp | kept cross attn | latency speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    dense_value = rows[0]["metrics"][bench.metric]
    for r in rows:
        k = r["kept"]
        kv, kt, kc = k.get("vision", {}), k.get("text", {}), k.get("cross", {})
        share = f" ({100 * r['metrics'][bench.metric] / dense_value:.1f}%)" if r["searched"] and dense_value else ""
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
    (args.results / f"{bench.name}.md").write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="nlvr,retrieval,caption,vqa")
    parser.add_argument("--base-epochs", type=int, default=12)
    parser.add_argument("--epochs-search", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--train-size", type=int, default=None, help="built-in training samples (default: the task's)")
    parser.add_argument("--val-size", type=int, default=None, help="built-in report samples (default: the task's)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the runs go (default runs/)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the tables go (default benchmarks/results/)"
    )
    parser.add_argument("--measure-only", action="store_true")
    args = parser.parse_args(argv)
    for task in args.tasks.split(","):
        bench = BENCHES[task]
        sizes = {k: v for k, v in (("train_size", args.train_size), ("val_size", args.val_size)) if v is not None}
        bench = dataclasses.replace(
            bench, cfg=dataclasses.replace(bench.cfg, data=dataclasses.replace(bench.cfg.data, **sizes))
        )
        runs = args.runs / f"bench-{bench.name.replace('_', '-')}"
        if args.measure_only:
            measure(bench, args, runs)
            continue
        torch.set_num_threads(2)
        if not (runs / "base" / "report.json").is_file():
            train(bench.cfg, epochs=args.base_epochs, lr=LR, output_dir=str(runs / "base"), overwrite=True)
        for name, (_, config) in VARIANTS.items():
            if (runs / name / "report.json").is_file():
                continue
            recipe = Recipe(epochs_search=args.epochs_search, epochs=args.epochs, lr_search=LR, lr=LR)
            base = str(runs / "base" / "model.safetensors")
            compress(bench.cfg, config, base, recipe, str(runs / name), overwrite=True)
        passed = ["--latency-batch", str(args.latency_batch), "--iters", str(args.iters), "--runs", str(args.runs)]
        passed += ["--results", str(args.results)]
        passed += [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
        subprocess.run([sys.executable, __file__, "--measure-only", "--tasks", task, *passed], check=True)  # fresh


if __name__ == "__main__":
    main()
