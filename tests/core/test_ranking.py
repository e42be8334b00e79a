"""Schedule values and the unified ranking as pure functions."""

from __future__ import annotations

import math

import pytest
import torch

from upop.core.ranking import fewest_kept, pi_at, select, selected_value, standardise


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


def _grid_shape(chosen: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int]:
    """(kept heads, kept dims) of a grid choice; fails unless the kept pairs are whole heads x shared dims."""
    kept = (~chosen).reshape(grid)
    heads, dims = kept.any(1), kept.any(0)
    assert torch.equal(kept, heads[:, None] & dims[None, :]), "kept pairs are not heads x shared dims"
    return int(heads.sum()), int(dims.sum())


def test_grid_choices_are_heads_times_aligned_dims_and_meet_the_budget():
    g = torch.Generator().manual_seed(4)
    grids = [(12, 64), (6, 64), (4, 37), None, None]
    sizes = [12 * 64, 6 * 64, 4 * 37, 1536, 300]
    costs = [100.0, 130.0, 80.0, 769.0, 50.0]
    align = [8, 8, 8, 32, 1]
    total = sum(n * c for n, c in zip(sizes, costs))
    for ratio in (0.2, 0.5, 0.8):
        for spread in (0.2, 1.0, 3.0):  # how much heads differ from each other, against dims
            scores = [torch.randn(n, generator=g) for n in sizes]
            for i, grid in enumerate(grids[:3]):
                scores[i] = (scores[i].view(grid) + spread * torch.randn(grid[0], 1, generator=g)).reshape(-1)
            chosen = select(scores, costs, ratio, align, grids=grids)
            for c, grid, a in zip(chosen, grids, align):
                if grid is not None:
                    heads, dims = _grid_shape(c, grid)
                    assert heads >= 1 and (dims % a == 0 or dims == grid[1]), (heads, dims, grid)
            achieved = sum(int(c.sum()) * cost for c, cost in zip(chosen, costs)) / total
            # the largest unit: a whole head (64 dims) or a block of 8 dims over 12 heads, or 32 MLP neurons
            biggest = max(64 * 100.0, 96 * 100.0, 64 * 130.0, 32 * 769.0)
            assert abs(achieved - ratio) <= biggest / total / 2 + 1e-12


def test_a_grid_removes_an_unimportant_head_whole_and_unimportant_dims_from_every_head():
    dims = torch.zeros(4, 16)
    heads = dims.clone()
    heads[2] = 5.0  # head 2 is far less important than anything else
    chosen = select([heads.reshape(-1)], [1.0], 0.25, [4], grids=[(4, 16)])[0]
    assert _grid_shape(chosen, (4, 16)) == (3, 16) and chosen.view(4, 16)[2].all()
    dims[:, [1, 5, 9, 13]] = 5.0  # four dims are unimportant in every head
    chosen = select([dims.reshape(-1)], [1.0], 0.25, [4], grids=[(4, 16)])[0]
    assert _grid_shape(chosen, (4, 16)) == (4, 12) and chosen.view(4, 16)[:, [1, 5, 9, 13]].all()


def test_a_grid_of_one_head_is_the_aligned_dim_ranking_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    scores = [torch.randn(37, generator=g), torch.randn(100, generator=g)]
    for ratio in (0.3, 0.6):
        for keep in ([1, 1], [9, 30]):
            plain = select(scores, [5.0, 2.0], ratio, [8, 4], keep)
            grid = select(scores, [5.0, 2.0], ratio, [8, 4], keep, grids=[(1, 37), None])
            assert all(torch.equal(x, y) for x, y in zip(plain, grid))


def test_a_grid_floor_is_never_crossed():
    g = torch.Generator().manual_seed(6)
    for keep in (1, 20, 100, 200):
        chosen = select([torch.randn(8 * 32, generator=g)], [1.0], 0.99, [8], [keep], grids=[(8, 32)])[0]
        heads, dims = _grid_shape(chosen, (8, 32))
        assert heads * dims >= keep and dims >= 8 and heads * dims >= fewest_kept(256, 8, keep, (8, 32))
        # at ratio 0.99 the chain stops only where neither a head nor a block of 8 dims can go
        assert heads == 1 or (heads - 1) * dims < keep
        assert dims == 8 or heads * (dims - 8) < keep
    assert fewest_kept(256, 8, 20, (8, 32)) == 24  # 3 heads x 8 dims
    assert fewest_kept(256, 8, 100, (8, 32)) == 112  # 7 heads x 16 dims (dims 8, 16, 24 or 32)
    assert fewest_kept(4 * 37, 8, 1, (4, 37)) == 8  # 37 dims: 37, or a multiple of 8
