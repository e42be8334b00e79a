"""Which widths a device runs at full speed: the time of one attention module (qkv projection, scaled-dot-product
attention, output projection) against its head_dim, and of one MLP (fc1, GELU, fc2) against its hidden width, at
DeiT-Base's shape (width 768, 12 heads, 197 tokens), in bf16 autocast and fp32. The data a hardware-aware width choice
(issue: compressed models must run faster on GPUs) is picked from. Prints JSON; ``--out`` writes it too.

Each row: median seconds per forward over ``--iters`` calls, and the time relative to the full width next to the
width relative to the full width (a width at full speed costs no more than its share).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json  # noqa: E402

from upop.core.widths import AttentionProbe, MlpProbe  # noqa: E402  (the probes "auto" times, at any width)


def timed(module: nn.Module, x: torch.Tensor, amp: bool, iters: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    context = (
        torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else torch.autocast(x.device.type, enabled=False)
    )
    times = []
    with torch.inference_mode(), context:
        for i in range(iters + 3):
            sync()
            start = time.perf_counter()
            module(x)
            sync()
            if i >= 3:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dims", default="64,63,62,60,57,56,52,48,47,40,33,32,31,24,16,8")
    ap.add_argument(
        "--hidden", default="3072,3071,3064,3056,3040,3008,2560,2048,2047,2040,2032,2016,1536,1535,1528,1520,1504,1024"
    )
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.width, device=device)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {"batch": args.batch, "tokens": args.tokens, "width": args.width, "heads": args.heads},
        "attention": [],
        "mlp": [],
    }
    head_dims = [int(v) for v in args.head_dims.split(",")]
    hidden = [int(v) for v in args.hidden.split(",")]
    for amp in (True, False):
        precision = "bf16" if amp else "fp32"
        full = None
        for d in head_dims:
            t = timed(AttentionProbe(args.width, args.heads, d).to(device), x, amp, args.iters)
            full = full or t
            result["attention"].append(
                {
                    "precision": precision,
                    "head_dim": d,
                    "seconds": t,
                    "time_share": t / full,
                    "width_share": d / head_dims[0],
                }
            )
        full = None
        for h in hidden:
            t = timed(MlpProbe(args.width, h).to(device), x, amp, args.iters)
            full = full or t
            result["mlp"].append(
                {
                    "precision": precision,
                    "hidden": h,
                    "seconds": t,
                    "time_share": t / full,
                    "width_share": h / hidden[0],
                }
            )
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
