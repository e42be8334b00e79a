"""Unified ranking and the progressive schedule: pure functions of tensors."""

from __future__ import annotations

import math

import torch


def pi_at(step: int, total_steps: int, p: float) -> float:
    """The progressive ratio pi(t) = p * sqrt((1 - cos(pi * t / T)) / 2) for t in [0, T]; pi(T) = p exactly."""
    if step >= total_steps:
        return float(p)
    t = max(step, 0) / total_steps
    return float(p) * math.sqrt((1.0 - math.cos(math.pi * t)) / 2.0)


def selected_value(pi: float, p: float) -> float:
    """Mask value of an element chosen for pruning when the current ratio is pi: 1 - pi / p (0 at the end)."""
    return 0.0 if pi >= p else 1.0 - pi / p


def standardise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Standardise a kind's accumulated gradients with ONE mean and std over every structure (of every tower)."""
    if not scores:
        return []
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    std = flat.std() if flat.numel() > 1 else flat.new_tensor(0.0)
    std = std if std > 0 else flat.new_tensor(1.0)
    mean = flat.mean()
    return [(s.double() - mean) / std for s in scores]


def select(scores: list[torch.Tensor], costs: list[float], ratio: float) -> list[torch.Tensor]:
    """Choose the elements to prune, over all structures in one ranking.

    Args:
        scores: per structure, standardised scores (n_i,); a larger score means less important.
        costs: per structure, the cost of one of its elements (what removing it saves).
        ratio: the fraction of the total cost (over all structures) to remove.

    Returns:
        per structure, a bool tensor (n_i,) marking the chosen elements. The most important element of every
        structure is never chosen. The prefix of the ranking is cut where its cumulative cost is closest to
        ``ratio`` x total cost.
    """
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    cost = torch.cat([torch.full((n,), float(c), dtype=torch.float64) for n, c in zip(sizes, costs)])
    # Protect each structure's most important (lowest-score) element: every mask keeps at least one element.
    protected = torch.zeros_like(flat, dtype=torch.bool)
    offset = 0
    for s in scores:
        protected[offset + int(torch.argmin(s.reshape(-1)))] = True
        offset += s.numel()
    target = ratio * float(cost.sum())
    candidates = (~protected).nonzero().squeeze(1)
    # Sort by score, descending; ties broken by position so every rank and run orders identically.
    order = candidates[torch.sort(flat[candidates], descending=True, stable=True).indices]
    cumulative = torch.cumsum(cost[order], 0)
    k = int((cumulative <= target).sum())  # the longest prefix not above the target...
    if k < len(order) and abs(float(cumulative[k]) - target) < abs((float(cumulative[k - 1]) if k else 0.0) - target):
        k += 1  # ...or one more element when that lands closer to it
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order[:k]] = True
    return list(torch.split(chosen, sizes))
