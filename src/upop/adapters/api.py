"""The core's entry points with their adapter looked up in the registry of families: what ``upop.Pruner`` and
``upop.apply_plan`` are. The core itself is given its adapter and never imports a family."""

from __future__ import annotations

from typing import Any

from torch import nn

from upop.adapters.registry import find_adapter
from upop.core import plan as P
from upop.core import pruner as core
from upop.core.adapter import Adapter
from upop.core.config import PruneConfig


class Pruner(core.Pruner):
    """UPop on ``model``, changed in place: one mask per attention module (length head_dim, shared by all heads and
    by q, k, v) and per MLP (length hidden), applied to the rows of the q/k/v (or fused qkv) and first MLP linears
    (the model's source is not edited; ``detach`` restores it exactly).

    Use::

        pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=T))
        loss = task_loss + pruner.sparsity_loss(); loss.backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step()                # after every optimizer step
        model = pruner.compress()    # after T steps

    The masks are not parameters of the model, so no optimizer sees them, whenever it is built. Their gradients are
    read, averaged over DDP ranks and accumulated by ``step`` (``upop.core.importance``); ``scores`` turns them into
    the ranking's scores (``config.score``: by default an element whose mask gradient has the smaller root mean
    square is less important; the paper's "gradient": a larger accumulated gradient is), ``stability_summary`` says
    how settled it was.

    Args:
        model: the dense model (a DDP wrapper is unwrapped).
        config: the search configuration.
        example_inputs: a batch as the model takes it (tensor, tuple or dict); needed for ``cost="flops"``, and the
            shape the widths of ``align="auto"`` are measured at (a default shape without it).
        adapter: an ``Adapter``, a registered adapter's name ("a+b" for a composite), or None (default) to find the
            registered families the model holds blocks of.
        precisions: what ``align="auto"`` measures in ("fp32", "bf16", "fp16"); default fp32 and the device's half
            precision on a GPU (where models are usually deployed in it), fp32 on a CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruneConfig | None = None,
        example_inputs: Any = None,
        adapter: str | Adapter | None = None,
        precisions: tuple[str, ...] | None = None,
    ) -> None:
        bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        resolved = adapter if isinstance(adapter, Adapter) else find_adapter(bare, adapter)
        super().__init__(model, config, example_inputs, resolved, precisions)


def apply_plan(model: nn.Module, plan: P.Plan) -> nn.Module:
    """Slice a fresh dense ``model`` (in place) to the plan's architecture (``upop.core.plan.apply_plan`` with the
    adapter the plan names)."""
    return P.apply_plan(model, plan, find_adapter(model, plan.adapter))
