"""Schedule values and the unified ranking as pure functions."""

from __future__ import annotations

import math

import pytest
import torch

from upop.core.ranking import pi_at, select, selected_value, standardise


def test_schedule_values():
    p, T = 0.6, 100
    assert pi_at(0, T, p) == 0.0
    assert pi_at(T, T, p) == p
    assert pi_at(T // 2, T, p) == pytest.approx(p * math.sqrt(0.5))
    assert pi_at(25, T, p) == pytest.approx(p * math.sqrt((1 - math.cos(math.pi / 4)) / 2))
    values = [pi_at(t, T, p) for t in range(T + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))  # strictly rising to p
    assert selected_value(pi_at(T, T, p), p) == 0.0
    assert selected_value(0.3, 0.6) == pytest.approx(0.5)


def test_standardise_uses_one_mean_and_std_over_all_structures():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    za, zb = standardise([a, b])
    flat = torch.cat([za, zb])
    assert flat.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert flat.std().item() == pytest.approx(1.0)
    # per-structure standardisation would make b's top element equal a's: the unified one does not
    assert zb.max() > za.max()


def test_select_prunes_the_highest_scores_first_in_one_budget():
    scores = [torch.tensor([0.0, 5.0, 1.0, 4.0]), torch.tensor([3.0, -1.0, 2.0])]
    chosen = select(scores, costs=[1.0, 1.0], ratio=3 / 7)
    assert chosen[0].tolist() == [False, True, False, True]
    assert chosen[1].tolist() == [True, False, False]


def test_select_weights_elements_by_cost():
    # structure 0 elements are 10x as costly: removing one of them already meets a 50% budget
    scores = [torch.tensor([5.0, -5.0]), torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])]
    chosen = select(scores, costs=[10.0, 1.0], ratio=0.4)  # total 25, target 10
    assert chosen[0].tolist() == [True, False]
    assert not chosen[1].any()


def test_select_keeps_at_least_one_element_per_structure_even_at_extreme_ratio():
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(n, generator=g) for n in (1, 4, 9, 30)]
    chosen = select(scores, costs=[3.0, 5.0, 1.0, 2.0], ratio=0.999)
    for s, c in zip(scores, chosen):
        assert (~c).sum() >= 1
        assert not c[torch.argmin(s)]  # the most important element stays


def test_select_budget_is_closest_achievable():
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(50, generator=g), torch.randn(200, generator=g)]
    costs = [37.0, 11.0]
    total = 50 * 37 + 200 * 11
    for ratio in (0.1, 0.5, 0.75):
        chosen = select(scores, costs, ratio)
        achieved = (chosen[0].sum() * 37 + chosen[1].sum() * 11).item() / total
        assert abs(achieved - ratio) <= 37 / total / 2 + 1e-12
