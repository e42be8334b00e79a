"""What ``--grad-checkpointing`` saves (`python benchmarks/grad_checkpointing.py`, about 2 minutes on 2 cores).

For DeiT-B/16 at 224 px (timm), CLIP-B/16 (HF) and BLIP-base NLVR2 at 384 px (the project's model on HF's BLIP parts),
with a Pruner's masks attached as in a search, one training step (forward and backward) with and without activation
checkpointing:

- the activation memory the backward pass needs: on the CPU, the bytes of the distinct tensors kept for the backward
  (those autograd saves, seen by ``torch.autograd.graph.saved_tensors_hooks``, and the block inputs a checkpoint keeps
  to recompute from; parameters excluded, storages counted once); on a GPU, the allocator's peak during the step less
  the memory before it;
- the step time ratio (recomputation costs about one more forward pass).

Writes benchmarks/results/grad_checkpointing.md and .json. The per-sample numbers scale linearly with the batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from gpu_check import _blip_nlvr, _hf_clip, _timm  # noqa: E402  (the GPU check's model workloads)

import upop  # noqa: E402
from upop.models import checkpointing  # noqa: E402

RESULTS = HERE / "results"
MODELS = {  # name -> (workload, batch)
    "DeiT-B/16 224 px (timm)": (lambda d: _timm("timm:deit_base_patch16_224", d), 8),
    "CLIP-B/16 (HF)": (lambda d: _hf_clip("B16", d), 8),
    "BLIP-base NLVR2 384 px": (lambda d: _blip_nlvr("base", d), 2),
}


def saved_bytes(model: torch.nn.Module, step) -> int:
    """Bytes of the distinct non-parameter tensors kept for the backward during ``step()``: those autograd saves,
    and the inputs a non-reentrant checkpoint keeps to recompute its block from (seen by wrapping torch's
    generator of such checkpoints)."""
    import torch.utils.checkpoint as C

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    name = "_checkpoint_without_reentrant_generator_impl"
    original = getattr(C, name)

    def generator(fn, args, kwargs, **options):
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                keep(a)
        return original(fn, args, kwargs, **options)

    setattr(C, name, generator)
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            step()
    finally:
        setattr(C, name, original)
    return sum(seen.values())


def measure(name: str, device: torch.device) -> dict:
    make, batch = MODELS[name]
    w = make(device)
    torch.manual_seed(0)
    model = w.build().train()
    x = w.inputs(batch)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=100, align_attn=1, align_mlp=1))

    def step() -> None:
        w.loss(model, x).backward()
        model.zero_grad(set_to_none=True)

    row = {"batch": batch}
    for label in ("plain", "checkpointed"):
        if label == "checkpointed":
            checkpointing.enable(model)
        step()  # warm-up
        seconds = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        if device.type == "cuda":
            activation = torch.cuda.max_memory_allocated() - before
        else:
            activation = saved_bytes(model, step)
        row[label] = {"activation_mib": activation / 2**20, "step_s": min(seconds)}
    row["memory_ratio"] = row["plain"]["activation_mib"] / row["checkpointed"]["activation_mib"]
    row["time_ratio"] = row["checkpointed"]["step_s"] / row["plain"]["step_s"]
    pruner.detach()
    return row


def table(result: dict) -> str:
    how = "allocator peak" if result["device"] != "cpu" else "tensors saved for the backward"
    lines = [
        f"Machine: {result['machine']}, {result['device']}, fp32; one training step with the search's masks; "
        f"activation memory = {how}.",
        "",
        "| model | batch | activations, plain | with --grad-checkpointing | memory saved | step time |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        lines.append(
            f"| {name} | {r['batch']} | {r['plain']['activation_mib']:.0f} MiB | "
            f"{r['checkpointed']['activation_mib']:.0f} MiB | {r['memory_ratio']:.1f}x less | "
            f"{r['time_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "grad_checkpointing"), help="results path without extension")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "models": {},
    }
    for name in MODELS:
        result["models"][name] = measure(name, device)
        print(name, json.dumps(result["models"][name]), flush=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
