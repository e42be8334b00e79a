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


def _units(score: torch.Tensor, align: int, keep: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Split a structure into prunable units, least important first. Returns (element indices, their unit number,
    number of units). With ``align`` a the kept count stays a multiple of a: the first unit is the n mod a least
    important elements (if any), then blocks of a. The max(a, ``keep`` rounded up to a multiple of a) most important
    elements belong to no unit: every structure keeps at least one element (one aligned block), and at least ``keep``
    (a floor) when the structure is large enough (otherwise it keeps all of its elements)."""
    n = score.numel()
    a = max(1, min(align, n))
    r = n % a
    fixed = fewest_kept(n, align, keep)
    order = torch.sort(score, descending=True, stable=True).indices[: n - fixed]
    position = torch.arange(order.numel())
    unit = (position - r) // a + (1 if r else 0)
    unit[:r] = 0
    count = 0 if fixed == n else (1 if r else 0) + (n - fixed - r) // a
    return order, unit, count


def fewest_kept(n: int, align: int, keep: int) -> int:
    """The fewest elements a structure of ``n`` can keep under ``select``: ``keep`` rounded up to a multiple of the
    alignment (at least one aligned block), or all ``n`` when that leaves nothing prunable."""
    a = max(1, min(align, n))
    fixed = max(a, -(-keep // a) * a)
    return n if fixed > n - n % a else fixed


Cost = float | torch.Tensor  # per element, or a curve T(w) for w = 0..n: the cost of keeping w elements


def removed_cost(cost: Cost, n: int, removed: torch.Tensor | int) -> torch.Tensor | float:
    """What removing ``removed`` elements of a structure of ``n`` saves: c * removed for a cost per element, T(n) -
    T(n - removed) for a curve (a measured latency table: the saving of an element depends on the width)."""
    if isinstance(cost, torch.Tensor):
        return cost[n] - cost[n - removed]
    return float(cost) * removed


def total_cost(cost: Cost, n: int) -> float:
    """The cost of a whole structure: c * n, or T(n) - T(0)."""
    return float(removed_cost(cost, n, n))


def select(
    scores: list[torch.Tensor],
    costs: list[Cost],
    ratio: float,
    align: list[int] | None = None,
    keep: list[int] | None = None,
) -> list[torch.Tensor]:
    """Choose the elements to prune, over all structures in one ranking.

    Args:
        scores: per structure, standardised scores (n_i,); a larger score means less important.
        costs: per structure, the cost of one of its elements (what removing it saves), or a curve T(w), w = 0..n_i,
            of the cost of keeping w elements (a unit's cost is then the drop of T over the widths it removes).
        ratio: the fraction of the total cost (over all structures) to remove.
        align: per structure, keep a multiple of this many elements (1, the paper's setting, by default). Larger
            values give hardware-friendly widths (e.g. head_dim a multiple of 8) at a coarser budget granularity.
        keep: per structure, the fewest elements it keeps (a floor; 1 by default). The ranking never crosses it.

    Returns:
        per structure, a bool tensor (n_i,) marking the chosen elements. Every structure keeps at least its most
        important element (its ``align`` most important ones). Units (elements, or aligned blocks scored by their
        mean) are ranked in one list by score, descending, and the prefix is cut where its cumulative cost is
        closest to ``ratio`` x total cost.
    """
    align = align or [1] * len(scores)
    keep = keep or [1] * len(scores)
    flat_scores = [s.reshape(-1).double() for s in scores]
    members, unit_of, unit_cost_each, offset = [], [], [], 0
    for i, (s, c, a, k) in enumerate(zip(flat_scores, costs, align, keep)):
        order, unit, count = _units(s, a, k)
        members.append((i, order))
        unit_of.append(unit + offset)
        sizes = torch.bincount(unit, minlength=count).double()
        if isinstance(c, torch.Tensor):  # units are removed in order: each takes the width down by its size
            after = (s.numel() - torch.cumsum(sizes, 0)).long()
            unit_cost_each.append((c.double()[after + sizes.long()] - c.double()[after]).clamp(min=0))
        else:
            unit_cost_each.append(float(c) * sizes)
        offset += count
    element_unit = torch.cat(unit_of)
    element_score = torch.cat([flat_scores[i][order] for i, order in members])
    size = torch.zeros(offset, dtype=torch.float64).index_add_(0, element_unit, torch.ones_like(element_score))
    unit_score = torch.zeros(offset, dtype=torch.float64).index_add_(0, element_unit, element_score) / size
    unit_cost = torch.cat(unit_cost_each)
    target = ratio * sum(total_cost(c, s.numel()) for s, c in zip(flat_scores, costs))
    # Stable sort: ties keep structure order, then within-structure order, on every rank and run.
    order = torch.sort(unit_score, descending=True, stable=True).indices
    cumulative = torch.cumsum(unit_cost[order], 0)
    k = int((cumulative <= target).sum())  # the longest prefix not above the target...
    if k < len(order) and abs(float(cumulative[k]) - target) < abs((float(cumulative[k - 1]) if k else 0.0) - target):
        k += 1  # ...or one more unit when that lands closer to it
    taken = torch.zeros(offset, dtype=torch.bool)
    taken[order[:k]] = True
    chosen = []
    for (i, order_i), unit in zip(members, unit_of):
        c = torch.zeros(flat_scores[i].numel(), dtype=torch.bool)
        c[order_i] = taken[unit]
        chosen.append(c)
    return chosen


def schedule_summary(p: float, total_steps: int, rank_steps: list[int], interval: int) -> str:
    """One line describing a search's schedule: T, the re-ranking interval and count, and pi at the re-rankings."""
    pis = [(t, pi_at(t, total_steps, p)) for t in rank_steps]
    shown = pis if len(pis) <= 6 else [*pis[:3], None, *pis[-2:]]
    values = ", ".join("..." if x is None else f"t={x[0]} {x[1]:.3f}" for x in shown)
    return (
        f"search: T = {total_steps} steps, re-ranking every {interval} step(s), {len(rank_steps)} times; "
        f"pi (pruned share of the cost) at the re-rankings: {values}"
    )
