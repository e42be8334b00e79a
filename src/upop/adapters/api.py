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
    __doc__ = core.Pruner.__doc__

    def __init__(
        self,
        model: nn.Module,
        config: PruneConfig | None = None,
        example_inputs: Any = None,
        adapter: str | Adapter | None = None,
        precisions: tuple[str, ...] | None = None,
    ) -> None:
        """``adapter``: an Adapter, a registered adapter's name ("a+b" for a composite), or None to find the
        registered families the model holds blocks of."""
        bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        resolved = adapter if isinstance(adapter, Adapter) else find_adapter(bare, adapter)
        super().__init__(model, config, example_inputs, resolved, precisions)


def apply_plan(model: nn.Module, plan: P.Plan) -> nn.Module:
    """Slice a fresh dense ``model`` (in place) to the plan's architecture (``upop.core.plan.apply_plan`` with the
    adapter the plan names)."""
    return P.apply_plan(model, plan, find_adapter(model, plan.adapter))
