"""What a UPop search step costs over a plain training step, on this machine (issue "cheap search").

For each built-in model (default: ``vit-tiny`` on classification and ``clip-tiny`` on retrieval, batch 128, fp32):
1. time: the fastest of interleaved rounds of plain and search steps (``common.step_ratio``);
2. aten ops per step, counted by ``torch.profiler`` over one step after two warm-up steps (on a GPU each is about one
   kernel launch; launches are what the masks add), and which ops the search adds;
3. peak memory: counted from the tensors a step holds (resident state plus what autograd saves for the backward), and
   on a GPU the CUDA allocator's peak, each kind in a fresh process.
Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from upop.data.config import DataConfig
from upop.models import build, build_model
from upop.tasks import get_task, task_class

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, step_ratio, training_runner  # noqa: E402

WORKLOADS = {  # model -> (task, model kind)
    "vit-tiny": ("classification", "classifier"),
    "vit-micro": ("classification", "classifier"),
    "clip-tiny": ("retrieval", "dual_encoder"),
    "clip-micro": ("retrieval", "dual_encoder"),
}


def workload(name: str, batch: int, device: torch.device) -> tuple[Callable[[], torch.nn.Module], Callable]:
    """(build, loss): a fresh built-in model on ``device`` and its task's training loss on one built-in batch."""
    task_name, kind = WORKLOADS[name]
    data_config = DataConfig(train_size=batch, val_size=8, image_size=16 if name.endswith("micro") else 32)
    outputs = task_class(task_name).num_outputs(data_config)
    task = get_task(task_name, build(name, kind, outputs))
    data = task.datasets(data_config).train
    loader = torch.utils.data.DataLoader(data, batch, collate_fn=getattr(data, "collate", None))
    batch_data = next(iter(loader))
    batch_data = [b.to(device) if isinstance(b, torch.Tensor) else b for b in batch_data]

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(name, outputs, kind=kind).to(device)

    return fresh, lambda model: task.loss(model, batch_data)


def op_counts(build: Callable, loss: Callable) -> dict[str, Any]:
    """aten ops in one plain and one search step (after two warm-up steps), and the ops the search adds."""
    counts, slots = {}, 0
    for search in (False, True):
        run = training_runner(build, loss, search)
        run.step()
        run.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run.step()
        counts[search] = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
        if run.pruner is not None:
            slots = sum(len(s.rows) for s in run.pruner.structures)
    plain, search = sum(counts[False].values()), sum(counts[True].values())
    added = counts[True] - counts[False]
    return {
        "plain": plain,
        "search": search,
        "ratio": search / plain,
        "masked_slots": slots,
        "added_per_slot": (search - plain) / slots,
        "added_most": dict(added.most_common(8)),
    }


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def memory_estimate(build: Callable, loss: Callable, search: bool) -> dict[str, float]:
    """MiB a training step holds at its peak, counted from the tensors (a CPU has no allocator statistics, and a
    process's peak resident set is set by its imports, not by the step): what stays resident (parameters, their
    gradients, the optimizer's state, the Pruner's masks and accumulators) plus every tensor autograd saves for the
    backward of one step (unique storages, resident ones not counted twice)."""
    run = training_runner(build, loss, search)
    run.step()  # the optimizer's state exists after the first step
    model, pruner = run.model, run.pruner
    state = [v for s in run.opt.state.values() for v in s.values()]
    extra = []
    if pruner is not None:
        acc = pruner.accumulated
        extra = [*pruner.masks, acc.total, acc.task_sum, acc.task_sq]
    params = list(model.parameters())
    resident = _bytes(params) * 2 + _bytes(state) + _bytes(extra)  # parameters and their gradients
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        value = loss(model) + (pruner.sparsity_loss() if pruner is not None else 0)
    kept = {p.untyped_storage().data_ptr() for p in params}
    activations = _bytes(x for x in saved if x.untyped_storage().data_ptr() not in kept)
    value.backward()
    out = {"resident_mib": resident / 2**20, "saved_mib": activations / 2**20}
    out["total_mib"] = out["resident_mib"] + out["saved_mib"]
    if pruner is not None:  # what masking the row projections' weights may add: one masked copy of each
        rows = [t for s in pruner.structures for slot in s.rows for t in (slot.weight, slot.bias) if t is not None]
        out["masked_weights_mib"] = _bytes(rows) / 2**20
    return out


def peak_memory(name: str, batch: int, steps: int, search: bool, device: torch.device) -> dict[str, float]:
    """The CUDA allocator's peak over ``steps`` steps, in this process (meant to be a fresh one)."""
    build, loss = workload(name, batch, device)
    torch.cuda.reset_peak_memory_stats(device)
    run = training_runner(build, loss, search)
    for _ in range(steps):
        run.step()
    torch.cuda.synchronize(device)
    return {"cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def memory(name: str, batch: int, steps: int, device: str) -> dict[str, Any]:
    """Peak memory of a plain and a search step: counted from the tensors (any device), and on a GPU also the
    allocator's peak, each kind in its own fresh process."""
    build, loss = workload(name, batch, torch.device(device))
    out: dict[str, Any] = {kind: memory_estimate(build, loss, kind == "search") for kind in ("plain", "search")}
    out["total_ratio"] = out["search"]["total_mib"] / out["plain"]["total_mib"]
    if device.startswith("cuda"):
        for kind in ("plain", "search"):
            argv = [sys.executable, __file__, "--child", kind, "--models", name, "--batch", str(batch)]
            argv += ["--memory-steps", str(steps), "--device", device]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            out[kind].update(json.loads(done.stdout.strip().splitlines()[-1]))
        out["cuda_peak_ratio"] = out["search"]["cuda_peak_mib"] / out["plain"]["cuda_peak_mib"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="vit-tiny,clip-tiny", help=f"any of {', '.join(WORKLOADS)}")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the step-time comparison")
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--child", choices=("plain", "search"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.child:  # one kind's peak memory, in this fresh process
        print(json.dumps(peak_memory(args.models, args.batch, args.memory_steps, args.child == "search", device)))
        return {}
    result: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "batch": args.batch, "models": {}}
    for name in args.models.split(","):
        build, loss = workload(name, args.batch, device)
        result["models"][name] = {
            "step_s": step_ratio(build, loss, rounds=args.rounds, steps=args.steps),
            "aten_ops": op_counts(build, loss),
            "memory": memory(name, args.batch, args.memory_steps, args.device),
        }
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
