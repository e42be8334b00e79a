"""Unified ranking and the progressive schedule: pure functions of tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def _grid_units(
    score: torch.Tensor, grid: tuple[int, int], align: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``_units`` for a mixed-granularity structure: its (head, dim) pairs (head-major) are removed in one chain
    whose every step takes away either the least important kept head (its pairs over the kept dims) or the least
    important aligned block of kept dims (their pairs over the kept heads), whichever has the larger mean score
    (heads on a tie). Dims go as in ``_units`` (first the head_dim mod a least important, then blocks of a), so the
    kept head_dim stays a multiple of a; the chain stops before it would keep fewer than ``keep`` pairs, no head
    or under one aligned block of dims."""
    heads, dims = grid
    s = score.reshape(heads, dims)
    a = max(1, min(align, dims))
    r = dims % a
    kept_h = torch.ones(heads, dtype=torch.bool)
    kept_d = torch.ones(dims, dtype=torch.bool)
    members: list[torch.Tensor] = []
    while True:
        n_h, n_d = int(kept_h.sum()), int(kept_d.sum())
        options: list[tuple[float, str, torch.Tensor]] = []
        if n_h > 1 and (n_h - 1) * n_d >= keep:
            head_mean = s[:, kept_d].mean(1).masked_fill(~kept_h, float("-inf"))
            h = torch.argmax(head_mean).reshape(1)
            options.append((float(head_mean[h]), "head", h))
        block = r if n_d == dims and r else a
        if n_d - block >= a and n_h * (n_d - block) >= keep:
            dim_mean = s[kept_h].mean(0).masked_fill(~kept_d, float("-inf"))
            d = torch.sort(dim_mean, descending=True, stable=True).indices[:block]
            options.append((float(dim_mean[d].mean()), "dims", d))
        if not options:
            break
        _, what, chosen = max(options, key=lambda o: o[0])  # the first (a head) on a tie
        if what == "head":
            members.append(chosen * dims + kept_d.nonzero().squeeze(1))
            kept_h[chosen] = False
        else:
            members.append((kept_h.nonzero() * dims + chosen[None, :]).reshape(-1))
            kept_d[chosen] = False
    if not members:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0
    order = torch.cat(members)
    unit = torch.cat([torch.full((m.numel(),), i, dtype=torch.long) for i, m in enumerate(members)])
    return order, unit, len(members)


def fewest_kept(n: int, align: int, keep: int, grid: tuple[int, int] | None = None) -> int:
    """The fewest elements a structure of ``n`` can keep under ``select``: ``keep`` rounded up to a multiple of the
    alignment (at least one aligned block), or all ``n`` when that leaves nothing prunable. For a ``grid`` (heads,
    head_dim), the fewest pairs of a kept heads x kept dims shape (dims a multiple of the alignment, or all) not
    under ``keep``."""
    if grid is not None:
        heads, dims = grid
        a = max(1, min(align, dims))
        widths = {dims, *range(a, dims + 1, a)}
        return min(h * d for h in range(1, heads + 1) for d in widths if h * d >= keep)
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
    grids: list[tuple[int, int] | None] | None = None,
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
        grids: per structure, None or, for mixed granularity, its (heads, head_dim): its elements are (head, dim)
            pairs removed as whole heads and aligned blocks of dims shared by the kept heads (``_grid_units``).

    Returns:
        per structure, a bool tensor (n_i,) marking the chosen elements. Every structure keeps at least its most
        important element (its ``align`` most important ones). Units (elements, or aligned blocks scored by their
        mean) are ranked in one list by score, descending, and the prefix is cut where its cumulative cost is
        closest to ``ratio`` x total cost. A structure's units are taken in its own order (a unit's score is at most
        the score of the unit before it: a running minimum, which changes nothing but in a grid's chain).
    """
    align = align or [1] * len(scores)
    keep = keep or [1] * len(scores)
    grids = grids or [None] * len(scores)
    flat_scores = [s.reshape(-1).double() for s in scores]
    units = _unit_table(flat_scores, costs, align, keep, grids)
    target = ratio * sum(total_cost(c, s.numel()) for s, c in zip(flat_scores, costs))
    taken = _cut(units.score, units.cost, target)
    chosen = []
    for (i, order_i), unit in zip(units.members, units.unit_of):
        c = torch.zeros(flat_scores[i].numel(), dtype=torch.bool)
        c[order_i] = taken[unit]
        chosen.append(c)
    return chosen


@dataclass
class _Units:
    """The prunable units of every structure in one table: per structure its elements in removal order and their
    unit numbers (global), and per unit its score (the mean of its elements', kept in its structure's order) and
    cost."""

    members: list[tuple[int, torch.Tensor]]
    unit_of: list[torch.Tensor]
    score: torch.Tensor
    cost: torch.Tensor


def _unit_table(
    scores: list[torch.Tensor],
    costs: list[Cost],
    align: list[int],
    keep: list[int],
    grids: list[tuple[int, int] | None],
) -> _Units:
    members, unit_of, unit_cost_each, offset, starts, counts = [], [], [], 0, [], []
    for i, (s, c, a, k, g) in enumerate(zip(scores, costs, align, keep, grids)):
        if g is not None and isinstance(c, torch.Tensor):
            raise ValueError("a grid structure's units are priced per element, not by a latency curve")
        order, unit, count = _units(s, a, k) if g is None else _grid_units(s, g, a, k)
        members.append((i, order))
        unit_of.append(unit + offset)
        starts.append(offset)
        counts.append(count)
        sizes = torch.bincount(unit, minlength=count).double()
        if isinstance(c, torch.Tensor):  # units are removed in order: each takes the width down by its size
            after = (s.numel() - torch.cumsum(sizes, 0)).long()
            unit_cost_each.append((c.double()[after + sizes.long()] - c.double()[after]).clamp(min=0))
        else:
            unit_cost_each.append(float(c) * sizes)
        offset += count
    element_unit = torch.cat(unit_of)
    element_score = torch.cat([scores[i][order] for i, order in members])
    size = torch.zeros(offset, dtype=torch.float64).index_add_(0, element_unit, torch.ones_like(element_score))
    unit_score = torch.zeros(offset, dtype=torch.float64).index_add_(0, element_unit, element_score) / size
    for start, count in zip(starts, counts):
        if count:
            unit_score[start : start + count] = torch.cummin(unit_score[start : start + count], 0).values
    return _Units(members, unit_of, unit_score, torch.cat(unit_cost_each))


def _cut(unit_score: torch.Tensor, unit_cost: torch.Tensor, target: float) -> torch.Tensor:
    """Which units to take (bool per unit): ranked by score, descending, the prefix whose cumulative cost is
    closest to ``target``."""
    # Stable sort: ties keep structure order, then within-structure order, on every rank and run.
    order = torch.sort(unit_score, descending=True, stable=True).indices
    cumulative = torch.cumsum(unit_cost[order], 0)
    k = int((cumulative <= target).sum())  # the longest prefix not above the target...
    if k < len(order) and abs(float(cumulative[k]) - target) < abs((float(cumulative[k - 1]) if k else 0.0) - target):
        k += 1  # ...or one more unit when that lands closer to it
    taken = torch.zeros(len(unit_score), dtype=torch.bool)
    taken[order[:k]] = True
    return taken


def schedule_summary(p: float, total_steps: int, rank_steps: list[int], interval: int) -> str:
    """One line describing a search's schedule: T, the re-ranking interval and count, and pi at the re-rankings."""
    pis = [(t, pi_at(t, total_steps, p)) for t in rank_steps]
    shown = pis if len(pis) <= 6 else [*pis[:3], None, *pis[-2:]]
    values = ", ".join("..." if x is None else f"t={x[0]} {x[1]:.3f}" for x in shown)
    return (
        f"search: T = {total_steps} steps, re-ranking every {interval} step(s), {len(rank_steps)} times; "
        f"pi (pruned share of the cost) at the re-rankings: {values}"
    )
