"""GPU check, one prepared script (benchmarks/gpu_check.sh on a machine with a CUDA device; a CPU test runs it at tiny
size so it cannot rot).

For each model (default timm DeiT-Small and DeiT-Base, random weights, 1000 classes):
1. FLOPs of one image counted on the device and on the CPU (``upop.profile`` counts attention on both);
2. a plain training step vs a UPop search step (masks, sparsity loss, ``Pruner.step``) under autocast: fastest of
   interleaved rounds;
3. a short search under bf16/fp16 autocast on random data (checking that no NaN/inf reached the importance and that
   the budget is met), with the default widths (align "auto", measured on this device), element-wise widths (align
   1, the paper's), fixed aligned widths (--align-attn 8 --align-mlp 32), whole heads (--granularity head) and the
   latency cost (--cost latency, measured on this device);
4. dense vs the three 2x models: speedups as the median of back-to-back ratios, fp32 and autocast, batch 256 and 1.
Prints one JSON object (and writes it to --out); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import upop
from upop.engine.loop import amp_context, backward_and_step
from upop.models import build_model

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speedups(models: dict, x: torch.Tensor, amp: bool, iters: int) -> dict[str, float]:
    """Median over ``iters`` rounds of dense time / model time, the models called back to back in alternating
    order (ratios of adjacent calls are steadier than ratios of separate medians on shared machines)."""
    autocast, _ = amp_context(x.device, amp)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode(), autocast():
        for m in models.values():
            m.eval()
            m(x)
        for i in range(iters + 2):
            for name, m in list(models.items())[:: 1 if i % 2 else -1]:
                _sync(x.device)
                start = time.perf_counter()
                m(x)
                _sync(x.device)
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
    dense = times["dense"]
    return {k: statistics.median(d / t for d, t in zip(dense, v)) for k, v in times.items() if k != "dense"}


def step_times(arch: str, x, y, amp: bool, rounds: int, steps: int) -> dict[str, float]:
    """Seconds per training step, plain vs search (fastest of interleaved rounds)."""

    def make(search: bool):
        torch.manual_seed(0)
        model = build_model(arch, 1000).to(x.device).train()
        pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10**6)) if search else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast, scaler = amp_context(x.device, amp)

        def step():
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x), y)
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
            _sync(x.device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(x.device)
            if r:
                best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def searched(arch: str, x, y, steps: int, **align: int) -> tuple[torch.nn.Module, dict]:
    """A 2x model from a short search under autocast, and what the search reports."""
    torch.manual_seed(0)
    model = build_model(arch, 1000).to(x.device)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=steps, **align), example_inputs=x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast, scaler = amp_context(x.device, True)
    model.train()
    for _ in range(steps):
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scale, taken = backward_and_step(loss.float() + pruner.sparsity_loss(), opt, scaler)
        pruner.step(grad_scale=scale, skip=not taken)
    report = {
        "nonfinite_steps": pruner.skipped_steps,
        "importance_finite": all(bool(torch.isfinite(a).all()) for a in pruner.importance),
        "pruned_cost_fraction": pruner.pruned_cost_fraction(),
        "alignment": pruner.alignment.to_dict(),
    }
    return pruner.compress(), report


def check(arch: str, device: torch.device, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dense = build_model(arch, 1000).to(device)
    size = dense.patch_embed.img_size[0]
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    out: dict = {"model": arch, "batch": args.batch}
    flops_here = upop.profile(dense, x[:1])["flops"]
    flops_cpu = upop.profile(build_model(arch, 1000), x[:1].cpu())["flops"]
    out["gflops_per_image"] = {"device": flops_here / 1e9, "cpu": flops_cpu / 1e9}
    out["step_s"] = step_times(arch, x, y, True, args.rounds, args.steps)
    out["search_step_ratio"] = out["step_s"]["search"] / out["step_s"]["plain"]
    models = {"dense": dense.eval()}
    out["search"] = {}
    variants = {
        "default_auto": {},
        "elementwise": {"align_attn": 1, "align_mlp": 1},
        "aligned_8_32": {"align_attn": 8, "align_mlp": 32},
        "whole_heads": {"granularity": "head"},
        "latency_cost": {"cost": "latency"},
    }
    for name, align in variants.items():
        model, report = searched(arch, x, y, args.search_steps, **align)
        report["flops_reduction"] = flops_here / upop.profile(model, x[:1])["flops"]
        report["params"] = sum(p.numel() for p in model.parameters())
        out["search"][name] = report
        models[name] = model.eval()
    out["dense_params"] = sum(p.numel() for p in dense.parameters())
    out["speedup"] = {
        "fp32": speedups(models, x, False, args.iters),
        "autocast": speedups(models, x, True, args.iters),
    }
    out["speedup_batch1_autocast"] = speedups(models, x[:1], True, args.iters)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="timm:deit_small_patch16_224,timm:deit_base_patch16_224")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--search-steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step-time comparison")
    ap.add_argument("--steps", type=int, default=10, help="steps per round of the step-time comparison")
    ap.add_argument("--iters", type=int, default=30, help="back-to-back forward pairs per speedup")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "autocast": "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16",
        "models": [check(arch, device, args) for arch in args.models.split(",")],
    }
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
