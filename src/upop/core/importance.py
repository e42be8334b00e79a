"""Importance: what the search learns about every mask element, and the scores the one ranking sorts.

``Importance`` accumulates the mask gradients of every search step (one flat fp32 vector over every structure) and
turns them into a raw score per element by one of three formulas (``PruneConfig.score``); ``standardised`` then makes
the scores of one scope (per kind, per kind and tower, or per structure) comparable. Larger = less important throughout.

- ``gradient`` (the paper's): the accumulated mask gradient, penalty included.
- ``fisher``: minus the root mean square over the steps of the task-loss part of the mask gradient (its empirical
  Fisher information): an element whose removal moves the loss little on every batch goes first.
- ``snr``: the accumulated task-loss gradient over its standard error (a t-statistic).

The L1 penalty's gradient is known (``w * sign(m)`` per kind), so the task-loss part is the step gradient minus it
whenever the step's loss included the penalty.
"""

from __future__ import annotations

from typing import Any

import torch

from upop.core.ranking import standardise
from upop.core.structure import Structure


class Importance:
    """Accumulated mask gradients of ``structures``: ``total`` (their sum), and the sum and sum of squares of their
    task-loss part, over ``steps`` accumulated steps. ``penalty`` holds each element's L1 weight (its kind's)."""

    def __init__(self, structures: list[Structure], weights: dict[str, float], device: torch.device) -> None:
        self.sizes = [s.size for s in structures]
        n = sum(self.sizes)
        self.total = torch.zeros(n, dtype=torch.float32, device=device)
        self.task_sum = torch.zeros_like(self.total)
        self.task_sq = torch.zeros_like(self.total)
        self.penalty = torch.cat([torch.full((s.size,), weights[s.kind], device=device) for s in structures])
        self.steps = 0

    def per_structure(self) -> list[torch.Tensor]:
        """The accumulated gradient of each structure (views of ``total``)."""
        return list(torch.split(self.total, self.sizes))

    def add(self, grads: torch.Tensor, signs: torch.Tensor | None) -> None:
        """One step's mask gradients (flat, fp32); ``signs``: the masks' signs when the step's loss had the L1
        penalty (its gradient is taken out of the task-loss part), None otherwise."""
        self.total += grads
        task = grads - self.penalty * signs if signs is not None else grads
        self.task_sum += task
        self.task_sq.addcmul_(task, task)
        self.steps += 1

    def raw(self, score: str) -> torch.Tensor:
        """The raw score of every element (float64, CPU; larger = less important) by the formula ``score``. Before
        enough steps for it (fisher: 1, snr: 2) the accumulated gradient stands in."""
        if score == "fisher" and self.steps > 0:
            return -(self.task_sq.double().cpu() / self.steps).sqrt()
        if score == "snr" and self.steps > 1:
            n, total = self.steps, self.task_sum.double().cpu()
            spread = (self.task_sq.double().cpu() - total * total / n).clamp(min=0).sqrt()
            return total / spread.clamp(min=1e-12 * float(spread.max().clamp(min=1e-30)))
        return self.total.double().cpu()

    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": [t.cpu().clone() for t in self.per_structure()],
            "task_sum": self.task_sum.cpu().clone(),
            "task_sq": self.task_sq.cpu().clone(),
            "accumulated_steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for dst, src in zip(self.per_structure(), state["importance"]):
                dst.copy_(src)
            if "task_sum" in state:
                self.task_sum.copy_(state["task_sum"])
                self.task_sq.copy_(state["task_sq"])
                self.steps = int(state["accumulated_steps"])


def standardised(raw: torch.Tensor, structures: list[Structure], scope: str) -> list[torch.Tensor]:
    """Per structure, the scores of ``raw`` (flat over ``structures``) standardised (one mean and std) per kind
    ("kind", the paper's), per kind and tower ("tower") or per structure ("structure")."""
    parts = torch.split(raw, [s.size for s in structures])
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(structures):
        key = (s.kind,) if scope == "kind" else (s.kind, s.tower) if scope == "tower" else (i,)
        groups.setdefault(key, []).append(i)
    scores: list[torch.Tensor] = [torch.empty(0)] * len(structures)
    for idx in groups.values():
        for i, z in zip(idx, standardise([parts[i] for i in idx])):
            scores[i] = z
    return scores
