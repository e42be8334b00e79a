"""Parameters, FLOPs (torch.utils.flop_counter) and measured latency of a model at given inputs."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter has formulas for the CUDA attention kernels but none for the CPU one that fused attention (timm)
# and HF's "sdpa" dispatch to on CPU, so q @ k^T and attn @ v would go uncounted there. The same formulas as CUDA's.
ATTENTION_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, also counting attention on CPU."""
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FORMULAS)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size_of(inputs: Any) -> int:
    """The batch size of model inputs (a tensor, or the first tensor of a tuple or dict)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return next(int(v.shape[0]) for v in values if isinstance(v, torch.Tensor))


def profile(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """{"params": parameter count, "flops": forward FLOPs at ``example_inputs`` (2 per multiply-add, whole batch),
    attention matmuls included on every device}."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as counter:
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops())}


def measure_latency(model: nn.Module, example_inputs: Any, warmup: int = 5, iters: int = 30) -> float:
    """Median wall-clock seconds of one forward of ``example_inputs`` in eval mode without gradients."""
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + iters):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call_model(model, example_inputs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)


def paired_latency(models: dict[str, Any], inputs: Any, iters: int = 30, warmup: int = 5) -> tuple[dict, dict]:
    """Calls of every model (a module, called with ``inputs`` as ``call_model`` does, in eval mode; or any callable,
    called with ``inputs`` as they are) back to back without gradients, ``iters`` times, the order alternating.
    Returns (median seconds per model, speedup of each model over ``models["dense"]`` as the median of the
    per-iteration ratios). Load from other tenants drifts slowly, so ratios of adjacent calls are far steadier than
    ratios of separate medians."""
    times: dict[str, list[float]] = {k: [] for k in models}
    modules = {k: m for k, m in models.items() if isinstance(m, nn.Module)}
    states = {k: m.training for k, m in modules.items()}
    cuda = torch.cuda.is_available()
    try:
        for m in modules.values():
            m.eval()
        with torch.inference_mode():
            for i in range(warmup + iters):
                for name, model in list(models.items())[:: 1 if i % 2 else -1]:
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    call_model(model, inputs) if name in modules else model(inputs)
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= warmup:
                        times[name].append(time.perf_counter() - start)
    finally:
        for k, m in modules.items():
            m.train(states[k])
    dense = times["dense"]
    speedup = {k: statistics.median(d / t for d, t in zip(dense, v)) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}, speedup


def count_tokens(model: nn.Module, structures: list, example_inputs: Any) -> None:
    """Run one forward to learn how many tokens per sample each slot of each structure sees (set as ``tokens`` on
    the structures and their slots): every token that reaches it over the forward, divided by the batch (a model that
    encodes two images per sample counts both). A slot whose module is not called (a projection applied by its
    parent's functional code) sees the queries."""
    seen: dict[int, int] = {}
    handles = []
    slots = {id(slot.module): slot.module for s in structures for slot in (*s.rows, *s.cols)}
    for key, module in slots.items():

        def hook(module, inputs, out, key=key):
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor) and x.dim() >= 1:
                seen[key] = seen.get(key, 0) + (x.numel() // x.shape[-1] if x.dim() > 1 else 1)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    batch = max(1, batch_size_of(example_inputs))
    for s in structures:
        s.tokens = seen.get(id(s.rows[0].module), 0) // batch
        for slot in (*s.rows, *s.cols):
            slot.tokens = seen.get(id(slot.module), 0) // batch or s.tokens
