"""GPU check, one prepared script (benchmarks/gpu_check.sh on a machine with a CUDA device, about 7 minutes on one
H100/H200; a CPU test runs it at tiny size so it cannot rot). Random weights; nothing is downloaded.

For each model (default timm DeiT-Small, DeiT-Base and an HF CLIP ViT-B/16 built from its config; in a second run
``--models blip-nlvr:base,blip-caption:base,segmenter:S512``: UPop's BLIP NLVR model at BLIP-base size, 384 px, batch
32 pairs, HF's BLIP captioner at BLIP-base size, 384 px, batch 32, and Segmenter ViT-S/16 with its mask transformer
at 512 x 512, 150 classes, batch 16):
1. FLOPs of one sample counted on the device and on the CPU (``upop.profile`` counts attention on both);
2. a plain training step vs a UPop search step (masks, sparsity loss, ``Pruner.step``) under autocast: fastest of
   interleaved rounds;
3. 2x models from a short search under autocast on random data (no NaN/inf may reach the importance; the budget must
   be met; masked == compressed in fp32 after it): default widths (align "auto", measured on this device),
   element-wise (align 1, the paper's), aligned 8/32, whole heads, mixed (whole heads, then aligned head dims),
   latency cost, each with the heads x head_dim shapes its attention blocks got; and hand-sliced uniform 2x shapes
   of the same budget (every structure keeps its first half, as multiples of 8 dims, or half its heads), the
   reference for what the hardware allows;
4. each tower of dense vs every 2x model: speedups as the median of back-to-back ratios, in fp32 and autocast at the
   batch, and autocast at batch 1; with ``--compile-model``, dense vs default under torch.compile too, and on a GPU
   dense and default at batch 1 with CUDA graphs (``torch.compile(mode="reduce-overhead")``) against eager dense;
5. for a captioner, generation with HF's ``generate`` and its KV cache (3 beams, 16 new tokens per image, autocast):
   tokens per second of dense, default 2x and the hand-sliced uniform 2x, and their speedups back to back.
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import upop
from upop.engine.loop import amp_context, backward_and_step
from upop.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json  # noqa: E402

CLIP_SIZES = {  # vision (width, heads, layers, mlp, image, patch), text (width, heads, layers, mlp, tokens)
    "B16": ((768, 12, 12, 3072, 224, 16), (512, 8, 12, 2048, 77)),
    "small": ((192, 3, 6, 768, 96, 16), (128, 2, 6, 512, 32)),  # the CPU table: DeiT-Tiny widths, 37 image tokens
    "tiny": ((32, 2, 2, 64, 16, 4), (24, 2, 2, 48, 7)),
}


@dataclass
class Workload:
    """How to build, feed, train and time one model."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], Any]  # batch -> inputs as the model takes them
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    towers: dict[str, Callable[[torch.nn.Module, Any], Any]]
    batch: int | None = None  # this model's batch (default --batch)
    generate: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None  # a decoder's generation: token ids


def _timm(arch: str, device: torch.device) -> Workload:
    size = build_model(arch, 1000).patch_embed.img_size[0]

    def inputs(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, device=device, generator=None)

    def loss(model, x):
        y = torch.arange(x.shape[0], device=x.device) % 1000
        return F.cross_entropy(model(x), y)

    return Workload(arch, lambda: build_model(arch, 1000).to(device), inputs, loss, {"image": lambda m, x: m(x)})


def _hf_clip(size: str, device: torch.device) -> Workload:
    from transformers import CLIPConfig, CLIPModel

    (vw, vh, vl, vm, image, patch), (tw, th, tl, tm, tokens) = CLIP_SIZES[size]
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=vw,
            num_attention_heads=vh,
            num_hidden_layers=vl,
            intermediate_size=vm,
            image_size=image,
            patch_size=patch,
        ),
        text_config=dict(
            hidden_size=tw,
            num_attention_heads=th,
            num_hidden_layers=tl,
            intermediate_size=tm,
            max_position_embeddings=tokens,
        ),
        projection_dim=min(vw, tw),
    )

    def inputs(batch: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.randn(batch, 3, image, image, device=device),
            "input_ids": torch.randint(1, 1000, (batch, tokens), device=device),
            "attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=device),
        }

    def loss(model, x):
        logits = model(**x).logits_per_image.float()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    towers = {
        "vision": lambda m, x: m.get_image_features(pixel_values=x["pixel_values"]),
        "text": lambda m, x: m.get_text_features(input_ids=x["input_ids"], attention_mask=x["attention_mask"]),
    }
    return Workload(f"hf-clip:{size}", lambda: CLIPModel(config).to(device), inputs, loss, towers)


NLVR_SIZES = {  # vision (width, heads, layers, mlp, image, patch), text (width, heads, layers, mlp, tokens), batch
    "base": ((768, 12, 12, 3072, 384, 16), (768, 12, 12, 3072, 35), 32),  # BLIP-base NLVR2 at 384 px
    "tiny": ((32, 2, 2, 64, 16, 4), (24, 2, 2, 48, 7), None),
}


def _blip_configs(size: str, vocab: int) -> tuple[Any, Any]:
    """BLIP vision and text configs of a size of ``NLVR_SIZES`` (the text's cross-attention reads the vision width)."""
    from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig

    (vw, vh, vl, vm, image, patch), (tw, th, tl, tm, _), _ = NLVR_SIZES[size]
    vision = BlipVisionConfig(
        hidden_size=vw,
        num_attention_heads=vh,
        num_hidden_layers=vl,
        intermediate_size=vm,
        image_size=image,
        patch_size=patch,
        initializer_range=0.02,
    )
    text = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=tw,
        num_attention_heads=th,
        num_hidden_layers=tl,
        intermediate_size=tm,
        encoder_hidden_size=vw,
    )
    return vision, text


def _blip_nlvr(size: str, device: torch.device) -> Workload:
    """UPop's BLIP NLVR model (twin cross-attention) from configs, random weights: pairs of images and a statement."""
    from upop.models.blip.modeling import BlipNlvr

    (_, _, _, _, image, _), (_, _, _, _, tokens), batch = NLVR_SIZES[size]
    vision, text = _blip_configs(size, 30524)

    def inputs(n: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.randn(n, 2, 3, image, image, device=device),
            "input_ids": torch.randint(1, 30000, (n, tokens), device=device),
            "attention_mask": torch.ones(n, tokens, dtype=torch.long, device=device),
        }

    def loss(model, x):
        labels = torch.arange(x["input_ids"].shape[0], device=device) % 2
        return F.cross_entropy(model(**x).float(), labels)

    build = lambda: BlipNlvr(vision, text, enc_token_id=30523).to(device)  # noqa: E731
    return Workload(f"blip-nlvr:{size}", build, inputs, loss, {"model": lambda m, x: m(**x)}, batch)


def _blip_caption(size: str, device: torch.device) -> Workload:
    """HF BlipForConditionalGeneration from configs (BLIP-base captioning at 384 px for "base"), random weights:
    teacher-forced LM loss on 20 tokens, and generation with the KV cache (3 beams, exactly ``GENERATED`` tokens)."""
    from upop.models.blip.modeling import build_captioner

    (_, _, _, _, image, _), _, batch = NLVR_SIZES[size]
    vocab, tokens = (30524, 20) if size == "base" else (50, 8)
    vision, text = _blip_configs(size, vocab)
    text.max_position_embeddings = 512 if size == "base" else max(tokens, GENERATED + 4)
    if size != "base":  # BLIP's special ids (30522 [DEC], 102 [SEP]) within the tiny vocabulary
        text.bos_token_id, text.sep_token_id, text.eos_token_id, text.pad_token_id = 1, vocab - 1, vocab - 1, 0

    def inputs(n: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.randn(n, 3, image, image, device=device),
            "input_ids": torch.randint(3, vocab - 1, (n, tokens), device=device),
            "attention_mask": torch.ones(n, tokens, dtype=torch.long, device=device),
        }

    def loss(model, x):
        logits = model(**x).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x["input_ids"][:, 1:].reshape(-1))

    def generate(model, x):
        prompt = x["input_ids"][:, :5].clone()  # a 4-token prompt (HF drops the last id)
        n = GENERATED + 4
        return model.generate(pixel_values=x["pixel_values"], input_ids=prompt, num_beams=3, max_length=n, min_length=n)

    build = lambda: build_captioner(vision, text).to(device)  # noqa: E731
    towers = {"model": lambda m, x: m(**x).logits}
    return Workload(f"blip-caption:{size}", build, inputs, loss, towers, batch, generate)


GENERATED = 16  # tokens each generation produces after its prompt


def generation_speed(models: dict, w: Workload, x: Any, iters: int, device: torch.device) -> dict[str, Any]:
    """Generated tokens per second of each model (bf16/fp16 autocast, 3 beams, exactly ``GENERATED`` new tokens per
    image), and each model's speedup over dense as the median of back-to-back ratios."""
    autocast, _ = amp_context(device, True)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode(), autocast():
        for m in models.values():
            w.generate(m.eval(), x)
        for i in range(iters):
            for name, m in list(models.items())[:: 1 if i % 2 else -1]:
                _sync(device)
                start = time.perf_counter()
                w.generate(m, x)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    tokens = GENERATED * _batch_of(x)
    dense = times["dense"]
    return {
        "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
        "speedup": {k: statistics.median(d / t for d, t in zip(dense, v)) for k, v in times.items() if k != "dense"},
    }


def _batch_of(x: Any) -> int:
    return int(next(iter(x.values())).shape[0]) if isinstance(x, dict) else int(x.shape[0])


SEGMENTER_SIZES = {  # width, heads, layers, patch, image, classes, batch
    "S512": (384, 6, 12, 16, 512, 150, 16),  # Segmenter ViT-S/16 mask transformer on ADE20K crops
    "tiny": (32, 2, 2, 4, 16, 5, None),
}


def _segmenter(size: str, device: torch.device) -> Workload:
    """UPop's Segmenter (ViT encoder, mask-transformer decoder with width / 64 heads) from its config, random
    weights: per-pixel cross-entropy on random labels."""
    from upop.models.segmenter.modeling import build_segmenter

    width, heads, layers, patch, image, classes, batch = SEGMENTER_SIZES[size]
    decoder = {"name": "mask_transformer", "n_layers": 2, "n_heads": max(1, width // 64)}
    net = dict(image_size=image, patch_size=patch, d_model=width, n_heads=heads, n_layers=layers, n_cls=classes)

    def inputs(n: int) -> torch.Tensor:
        return torch.randn(n, 3, image, image, device=device)

    def loss(model, x):
        labels = torch.randint(0, classes, (x.shape[0], image, image), device=device)
        return F.cross_entropy(model(x).float(), labels)

    build = lambda: build_segmenter({**net, "decoder": decoder}).to(device)  # noqa: E731
    return Workload(f"segmenter:{size}", build, inputs, loss, {"model": lambda m, x: m(x)}, batch)


def workload(spec: str, device: torch.device) -> Workload:
    family, _, size = spec.partition(":")
    if family == "segmenter":
        return _segmenter(size, device)
    if family == "blip-caption":
        return _blip_caption(size, device)
    if family == "hf-clip":
        return _hf_clip(size, device)
    if family == "blip-nlvr":
        return _blip_nlvr(size, device)
    return _timm(spec, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speedups(models: dict, tower: Callable, x: Any, amp: bool, iters: int, device: torch.device) -> dict[str, float]:
    """Median over ``iters`` rounds of dense time / model time for one tower, the models called back to back in
    alternating order (ratios of adjacent calls are steadier than ratios of separate medians)."""
    autocast, _ = amp_context(device, amp)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode(), autocast():
        for m in models.values():
            m.eval()
            tower(m, x)
        for i in range(iters + 2):
            for name, m in list(models.items())[:: 1 if i % 2 else -1]:
                _sync(device)
                start = time.perf_counter()
                tower(m, x)
                _sync(device)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    dense = times["dense"]
    return {k: statistics.median(d / t for d, t in zip(dense, v)) for k, v in times.items() if k != "dense"}


def step_times(w: Workload, x: Any, device: torch.device, rounds: int, steps: int) -> dict[str, float]:
    """Seconds per training step under autocast, plain vs search (fastest of interleaved rounds)."""

    def make(search: bool):
        torch.manual_seed(0)
        model = w.build().train()
        config = upop.PruneConfig(p=0.5, total_steps=10**6, align_attn=1, align_mlp=1)
        pruner = upop.Pruner(model, config) if search else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast, scaler = amp_context(device, True)

        def step():
            with autocast():
                loss = w.loss(model, x)
            if pruner is not None:
                loss = loss.float() + pruner.sparsity_loss()
            scale, taken = backward_and_step(loss, opt, scaler)
            if pruner is not None:
                pruner.step(grad_scale=scale, skip=not taken)

        return step

    runners = {"plain": make(False), "search": make(True)}
    best = {k: float("inf") for k in runners}
    for r in range(rounds + 1):
        for name, step in list(runners.items())[:: 1 if r % 2 else -1]:
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            if r:
                best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def searched(w: Workload, x: Any, device: torch.device, steps: int, **settings: Any) -> tuple[torch.nn.Module, dict]:
    """A 2x model from a short search under autocast, and what the search reports."""
    torch.manual_seed(0)
    model = w.build()
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=steps, **settings), example_inputs=x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast, scaler = amp_context(device, True)
    model.train()
    for _ in range(steps):
        with autocast():
            loss = w.loss(model, x)
        scale, taken = backward_and_step(loss.float() + pruner.sparsity_loss(), opt, scaler)
        pruner.step(grad_scale=scale, skip=not taken)
    report = {
        "nonfinite_steps": pruner.skipped_steps,
        "importance_finite": all(bool(torch.isfinite(a).all()) for a in pruner.importance),
        "pruned_cost_fraction": pruner.pruned_cost_fraction(),
        "alignment": pruner.alignment.to_dict(),
    }
    model.eval()
    probe = w.inputs(2)
    with torch.no_grad():  # masked == compressed, in fp32: the masks are exactly 0/1 at the end of the search
        masked = _first_tensor(next(iter(w.towers.values()))(model, probe)).float()
        compressed = pruner.compress()
        sliced = _first_tensor(next(iter(w.towers.values()))(compressed, probe)).float()
    report["masked_vs_compressed_max_abs"] = float((masked - sliced).abs().max())
    report["attention_shapes"] = attention_shapes(pruner.structures)
    report["masked_max_abs"] = float(masked.abs().max())
    return compressed, report


def attention_shapes(structures: list) -> dict[str, int]:
    """How many compressed attention blocks have each "heads x head_dim" shape (read off the sliced structures)."""
    shapes: dict[str, int] = {}
    for s in structures:
        if s.kind == "attn":
            heads, dims = s.grid if s.grid is not None else (s.size, s.block) if s.block > 1 else (s.heads, s.size)
            key = f"{heads}x{dims}"
            shapes[key] = shapes.get(key, 0) + 1
    return dict(sorted(shapes.items(), key=lambda kv: -kv[1]))


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if hasattr(out, "pooler_output") else out[0]


def hand_sliced(w: Workload, granularity: str) -> torch.nn.Module:
    """The uniform 2x shape, sliced by hand: every structure keeps the first half of its elements (dims as
    multiples of 8 where there are 16 or more, or heads), no search."""
    torch.manual_seed(0)
    model = w.build()
    pruner = upop.Pruner(
        model, upop.PruneConfig(p=0.5, total_steps=1, granularity=granularity, align_attn=1, align_mlp=1)
    )
    choice = []
    for s in pruner.structures:
        keep = max(1, s.size // 2)
        keep = keep // 8 * 8 if s.block == 1 and keep >= 8 else keep
        choice.append(torch.arange(s.size) >= keep)
    pruner.set_choice(choice, 0.0)
    return pruner.compress(force=True)


VARIANTS = {
    "default_auto": {},
    "elementwise": {"align_attn": 1, "align_mlp": 1},
    "aligned_8_32": {"align_attn": 8, "align_mlp": 32},
    "whole_heads": {"granularity": "head"},
    "mixed_heads_then_dims": {"granularity": "mixed"},
    "latency_cost": {"cost": "latency"},
}


def check(spec: str, device: torch.device, args: argparse.Namespace) -> dict:
    w = workload(spec, device)
    torch.manual_seed(0)
    dense = w.build()
    batch = w.batch or args.batch
    x, x1 = w.inputs(batch), w.inputs(1)
    out: dict = {"model": w.name, "batch": batch}
    flops_here = upop.profile(dense, x1)["flops"]
    on_cpu = {k: v.cpu() for k, v in x1.items()} if isinstance(x1, dict) else x1.cpu()
    out["gflops_per_sample"] = {"device": flops_here / 1e9, "cpu": upop.profile(dense.cpu(), on_cpu)["flops"] / 1e9}
    dense.to(device)
    out["step_s"] = step_times(w, x, device, args.rounds, args.steps)
    out["search_step_ratio"] = out["step_s"]["search"] / out["step_s"]["plain"]
    models = {"dense": dense.eval()}
    out["search"] = {}
    for name in args.variants.split(","):
        model, report = searched(w, x, device, args.search_steps, **VARIANTS[name])
        report["flops_reduction"] = flops_here / upop.profile(model, x1)["flops"]
        report["params"] = sum(p.numel() for p in model.parameters())
        out["search"][name] = report
        models[name] = model.eval()
    for granularity in ("dim", "head"):
        model = hand_sliced(w, granularity)
        models[f"uniform_{granularity}s_hand_sliced"] = model.eval()
    out["dense_params"] = sum(p.numel() for p in dense.parameters())
    if w.generate is not None:
        chosen = ("dense", "default_auto", "uniform_dims_hand_sliced")
        out["generation"] = generation_speed({k: models[k] for k in chosen}, w, x, max(2, args.iters // 5), device)
    out["speedup"] = {}
    for tower_name, tower in w.towers.items():
        out["speedup"][tower_name] = {
            "fp32": speedups(models, tower, x, False, args.iters, device),
            "autocast": speedups(models, tower, x, True, args.iters, device),
            "autocast_batch1": speedups(models, tower, x1, True, args.iters, device),
        }
        if spec == args.compile_model:
            compiled = {k: torch.compile(models[k]) for k in ("dense", "default_auto")}
            out["speedup"][tower_name]["autocast_compiled"] = speedups(compiled, tower, x, True, args.iters, device)
            if device.type == "cuda":  # batch 1 is launch-bound: CUDA graphs, each against eager dense
                graphs = {"dense": models["dense"]}
                for k in ("dense", "default_auto"):
                    graphs[f"{k}_cuda_graphs"] = torch.compile(models[k], mode="reduce-overhead")
                out["speedup"][tower_name]["autocast_batch1_vs_eager_dense"] = speedups(
                    graphs, tower, x1, True, args.iters, device
                )
    return out


ROW_LABELS = {
    "default_auto": "**default** (align auto)",
    "elementwise": "element-wise (align 1, the paper's)",
    "aligned_8_32": "aligned 8/32",
    "whole_heads": "whole heads (`--granularity head`)",
    "mixed_heads_then_dims": "mixed (`--granularity mixed`)",
    "latency_cost": "latency cost (`--cost latency`)",
    "uniform_dims_hand_sliced": "uniform 2x dims, hand-sliced",
    "uniform_heads_hand_sliced": "uniform 2x heads, hand-sliced",
}


def markdown(result: dict) -> str:
    """The speed table of a result: per model and tower, each 2x model's speedup over dense ("slower" below 1) in
    fp32 and autocast at the batch, and autocast at batch 1; the searched rows' attention shapes."""
    lines = [
        f"| model, tower | setting | fp32, batch B | {result['autocast']}, batch B | {result['autocast']}, batch 1 "
        "| the model's attention blocks (heads x head_dim: count) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(v: float) -> str:
        return f"{v:.2f}x" if v >= 1 else f"**{1 / v:.2f}x slower**"

    for m in result["models"]:
        for i, (tower, conditions) in enumerate(m["speedup"].items()):
            first = True
            for key, label in ROW_LABELS.items():
                values = [conditions[c].get(key) for c in ("fp32", "autocast", "autocast_batch1")]
                if any(v is None for v in values):
                    continue
                shapes = m["search"].get(key, {}).get("attention_shapes", {}) if i == 0 else {}  # once per model
                shown = ", ".join(f"{s}: {n}" for s, n in list(shapes.items())[:4]) + (
                    ", ..." if len(shapes) > 4 else ""
                )
                name = f"{m['model']} (B = {m['batch']}), {tower}" if first else ""
                lines.append(f"| {name} | {label} | " + " | ".join(cell(v) for v in values) + f" | {shown} |")
                first = False
            lines += _compiled_rows(conditions, cell)
    return "\n".join(lines) + "\n"


def _compiled_rows(conditions: dict, cell: Callable[[float], str]) -> list[str]:
    """The --compile-model rows: default vs dense both compiled, and at batch 1 with CUDA graphs against eager dense."""
    rows = []
    if "autocast_compiled" in conditions:
        compiled = cell(conditions["autocast_compiled"]["default_auto"])
        rows.append(f"| | default, both compiled (`torch.compile`) | | {compiled} | | |")
    graphs = conditions.get("autocast_batch1_vs_eager_dense")
    if graphs:
        against = f"dense {cell(graphs['dense_cuda_graphs'])}, default {cell(graphs['default_auto_cuda_graphs'])}"
        rows.append(f'| | CUDA graphs (`mode="reduce-overhead"`) against eager dense | | | {against} | |')
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--models",
        default="timm:deit_small_patch16_224,timm:deit_base_patch16_224,hf-clip:B16",
        help="the issue's three by default (about 7 minutes on one H200); the other workloads in a second run: "
        "blip-nlvr:base,blip-caption:base,segmenter:S512",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--search-steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step-time comparison")
    ap.add_argument("--steps", type=int, default=10, help="steps per round of the step-time comparison")
    ap.add_argument("--iters", type=int, default=30, help="back-to-back forward pairs per speedup")
    ap.add_argument("--compile-model", default="timm:deit_base_patch16_224", help="also time this one compiled")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="the searched rows (a subset, to run in parts)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; any of {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "autocast": "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16",
        "models": [],
    }
    for spec in args.models.split(","):
        result["models"].append(check(spec, device, args))
        if args.out:  # after every model, so a run cut short keeps what it finished
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    emit_json(result, args.out)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
