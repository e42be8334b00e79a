"""What both callbacks share: the search attached to a model for a number of optimizer steps, its logged scalars,
its state in a checkpoint, and the compressed model saved at the end."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upop.adapters import Pruner
from upop.core.config import PruneConfig
from upop.core.plan import save_compressed
from upop.errors import UPopError

STATE_FILE = "upop_search.pt"  # the search's state, beside a training stack's checkpoint
PREFIX = "upop/"


class Search:
    """A ``Pruner`` attached to ``model`` for ``total_steps`` optimizer steps, with a state restored from a
    checkpoint when one was given before it started (a resumed run)."""

    def __init__(self, config: PruneConfig | None, example_inputs: Any = None) -> None:
        self.config, self.example_inputs = config or PruneConfig(), example_inputs
        self.pruner: Pruner | None = None
        self.pending: dict[str, Any] | None = None

    def start(self, model: nn.Module, total_steps: int) -> Pruner:
        if self.pruner is not None:
            return self.pruner
        config = dataclasses.replace(self.config, total_steps=int(total_steps))
        self.pruner = Pruner(model, config, example_inputs=self.example_inputs)
        if self.pending is not None:
            self.pruner.load_state_dict(self.pending)
            self.pending = None
        return self.pruner

    def step(self) -> None:
        """After an optimizer step; nothing once the search has run its steps (the masks are then exactly 0/1)."""
        if self.pruner is not None and not self.pruner.finished():
            self.pruner.step()

    def scalars(self) -> dict[str, float]:
        """pi, the kept fractions per kind and per tower, the pruned share of the cost, under ``upop/``."""
        if self.pruner is None:
            return {}
        record = self.pruner.log_record()
        towers = record.pop("kept_by_tower", {})
        out = {PREFIX + k: float(v) for k, v in record.items() if k != "step"}
        out.update({f"{PREFIX}kept_{k}": v for k, v in towers.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.pruner.state_dict() if self.pruner is not None else dict(self.pending or {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.pruner is not None:
            self.pruner.load_state_dict(state)
        else:
            self.pending = dict(state)

    def save(self, directory: Path) -> None:
        torch.save(self.state_dict(), directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if not path.is_file():
            raise UPopError(
                f"resuming from {directory}, which holds no UPop search state ({STATE_FILE}); resume from a "
                "checkpoint saved while the UPop callback was attached"
            )
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def finish(self, directory: str | Path | None, save: bool) -> nn.Module | None:
        """The compressed model (saved to ``directory`` when ``save``), or None when the search did not finish."""
        if self.pruner is None or not self.pruner.finished():
            return None
        model = self.pruner.compress()
        self.pruner = None
        if save and directory is not None:
            save_compressed(model, directory)
        return model
