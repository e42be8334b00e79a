"""GPU check (run by benchmarks/gpu_check.sh on a machine with a CUDA device).

Real-size DeiT-Small (timm deit_small_patch16_224, random weights, 1000 classes):
1. a short UPop search with bf16/fp16 autocast on random data, checking that no NaN/inf reached the importance
   (non-finite steps are skipped and counted by the Pruner) and that the budget is met;
2. dense vs the 2x-compressed model: inference throughput (images/s) in fp32 and under autocast.
Prints one JSON object; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import upop
from upop.engine.loop import amp_context, backward_and_step
from upop.models import build_model


def throughput(model, x, amp: bool, iters: int) -> float:
    autocast, _ = amp_context(x.device, amp)
    model.eval()
    with torch.inference_mode(), autocast():
        for _ in range(3):
            model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="timm:deit_small_patch16_224")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--search-steps", type=int, default=40)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, 1000).to(device)
    size = model.patch_embed.img_size[0]
    x = torch.randn(args.batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "batch": args.batch,
    }
    dense_params = sum(p.numel() for p in model.parameters())
    dense_fp32 = throughput(model, x, False, args.iters)
    dense_amp = throughput(model, x, True, args.iters)

    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=args.search_steps))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast, scaler = amp_context(device, True)
    model.train()
    for _ in range(args.search_steps):
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scale = backward_and_step(loss.float() + pruner.sparsity_loss(), opt, scaler)
        pruner.step(grad_scale=scale)
    out["search_nonfinite_steps"] = pruner.skipped_steps
    out["importance_finite"] = all(bool(torch.isfinite(a).all()) for a in pruner.importance)
    out["pruned_cost_fraction"] = pruner.pruned_cost_fraction()
    model = pruner.compress()
    out["throughput_img_s"] = {
        "dense_fp32": dense_fp32,
        "dense_amp": dense_amp,
        "compressed_fp32": throughput(model, x, False, args.iters),
        "compressed_amp": throughput(model, x, True, args.iters),
    }
    out["params"] = {"dense": dense_params, "compressed": sum(p.numel() for p in model.parameters())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
