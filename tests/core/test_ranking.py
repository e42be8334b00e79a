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


def test_aligned_selection_keeps_multiples_and_meets_the_budget_at_its_granularity():
    g = torch.Generator().manual_seed(2)
    sizes, align, costs = (
        [64, 64, 37, 1536, 1536, 20],
        [8, 8, 8, 32, 32, 32],
        [1161.0, 1161.0, 900.0, 769.0, 769.0, 50.0],
    )
    scores = [torch.randn(n, generator=g) for n in sizes]
    total = sum(n * c for n, c in zip(sizes, costs))
    for ratio in (0.3, 0.5, 0.7):
        chosen = select(scores, costs, ratio, align)
        for c, a, n in zip(chosen, align, sizes):
            kept = int((~c).sum())
            assert kept >= min(a, n) and (kept % a == 0 or kept == n), (kept, a, n)
        achieved = sum(int(c.sum()) * cost for c, cost in zip(chosen, costs)) / total
        biggest_unit = max(a * c for a, c in zip(align, costs))
        assert abs(achieved - ratio) <= biggest_unit / total / 2 + 1e-12
        # within a structure the least important elements go first: every chosen score is at least every kept one
        for s, c in zip(scores, chosen):
            if c.any() and (~c).any():
                assert s[c].min() >= s[~c].max()


def test_align_one_is_the_elementwise_ranking():
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(n, generator=g) for n in (16, 48, 5)]
    for ratio in (0.2, 0.6):
        a = select(scores, [3.0, 1.0, 7.0], ratio)
        b = select(scores, [3.0, 1.0, 7.0], ratio, [1, 1, 1])
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        # elementwise: every chosen element outranks every unchosen, unprotected one
        flat_s, flat_c = torch.cat(scores), torch.cat(a)
        protected = torch.zeros_like(flat_c)
        offset = 0
        for s in scores:
            protected[offset + int(torch.argmin(s))] = True
            offset += s.numel()
        assert flat_s[flat_c].min() >= flat_s[~flat_c & ~protected].max()


def test_a_floor_is_never_crossed_and_the_budget_is_still_met():
    g = torch.Generator().manual_seed(4)
    sizes, costs = [32, 32, 256, 256, 7], [4.0, 9.0, 1.0, 2.0, 3.0]
    total = sum(n * c for n, c in zip(sizes, costs))
    for trial in range(20):
        scores = [torch.randn(n, generator=g) * (1 + 10 * i) for i, n in enumerate(sizes)]  # uneven spreads
        ratio = [0.3, 0.5, 0.75, 0.9][trial % 4]
        align = [[1] * 5, [8, 8, 32, 32, 1]][trial % 2]
        keep = [int(torch.randint(1, n + 1, (1,), generator=g)) // 3 + 1 for n in sizes]
        chosen = select(scores, costs, ratio, align, keep)
        for c, k, a, n in zip(chosen, keep, align, sizes):
            kept = int((~c).sum())
            assert kept >= min(k, n), (kept, k, n)
            assert kept % a == 0 or kept == n
        # where the floors leave room for the ratio, it is met to the nearest unit
        room = sum(c * (n - min(n, -(-max(k, a) // a) * a)) for n, c, k, a in zip(sizes, costs, keep, align))
        if room > ratio * total + max(a * c for a, c in zip(align, costs)):
            achieved = sum(int(c.sum()) * cost for c, cost in zip(chosen, costs)) / total
            assert abs(achieved - ratio) <= max(a * c for a, c in zip(align, costs)) / total / 2 + 1e-12


def test_a_floor_of_one_element_is_the_paper_selection_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(n, generator=g) for n in (16, 48, 5, 64)]
    for ratio in (0.2, 0.6, 0.95):
        for align in ([1, 1, 1, 1], [8, 8, 1, 32]):
            a = select(scores, [3.0, 1.0, 7.0, 2.0], ratio, align)
            b = select(scores, [3.0, 1.0, 7.0, 2.0], ratio, align, [1, 1, 1, 1])
            assert all(torch.equal(x, y) for x, y in zip(a, b))
