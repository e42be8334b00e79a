"""The ranking's options: the paper's ranking kept bit for bit, the signal-to-noise score, the standardisation scopes,
the floor per structure, and the stability the Pruner reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import ELEMENTWISE, build, hf_clip, images, logits, timm_vit

import upop
from upop.core.config import PAPER_RANKING

# The chosen elements (per structure, the pruned indices) after each of the 12 steps of `_history`, for each model,
# as UPop chose them at commit 3d7b037, before the ranking had options: the paper's ranking must keep choosing them
# bit for bit. (The file stores what a hash of them pinned before, so a difference names its step and structure.)
PAPER_HISTORY = json.loads((Path(__file__).parent / "data" / "paper_history.json").read_text())


def _history(factory, **ranking) -> list:
    torch.manual_seed(0)
    model = build(factory, (4, 8, 3, 64))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.6, total_steps=12, **ELEMENTWISE, **ranking))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = images(8), torch.arange(8) % 5
    history = []
    for _ in range(12):
        (torch.nn.functional.cross_entropy(logits(model(x)), y) + pruner.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        history.append([c.nonzero().squeeze(1).tolist() for c in pruner.chosen])
    return history


@pytest.mark.parametrize("factory", [timm_vit, hf_clip])
def test_the_paper_ranking_reproduces_the_original_choices_bit_for_bit(factory):
    expected = PAPER_HISTORY[factory.__name__]
    for step, (got, want) in enumerate(zip(_history(factory, **PAPER_RANKING), expected, strict=True), start=1):
        for structure, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"step {step}, structure {structure}: chose {g}, the paper's ranking chose {w}"


def _fed(config, grads_per_step):
    """A Pruner whose mask gradients are set by hand, step after step."""
    pruner = upop.Pruner(build(timm_vit, (2, 6, 2, 10)), config)
    for grads in grads_per_step:
        for mask, g in zip(pruner.masks, grads):
            mask.grad = g.clone()
        pruner.step()
    return pruner


def _random_grads(pruner_sizes, steps, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = [torch.randn(n, generator=g) + 0.3 * torch.arange(n) / n for n in pruner_sizes]
        if scale is not None:
            grads = [x * s for x, s in zip(grads, scale)]
        out.append(grads)
    return out


def test_the_snr_score_does_not_see_how_loud_a_structure_is_and_the_gradient_score_does():
    sizes = [s.size for s in upop.Pruner(build(timm_vit, (2, 6, 2, 10)), upop.PruneConfig()).structures]
    loud = [1.0, 1.0, 50.0, 1.0]  # the third structure's gradients 50x larger, same signal-to-noise
    for score, invariant in (("snr", True), ("gradient", False)):
        config = upop.PruneConfig(p=0.5, total_steps=100, score=score)
        quiet = _fed(config, _random_grads(sizes, 6)).scores()
        scaled = _fed(config, _random_grads(sizes, 6, scale=loud)).scores()
        same = all(torch.allclose(a, b, atol=1e-9) for a, b in zip(quiet, scaled))
        assert same is invariant, score


def test_snr_is_the_sum_over_its_standard_error():
    sizes = [s.size for s in upop.Pruner(build(timm_vit, (2, 6, 2, 10)), upop.PruneConfig()).structures]
    steps = _random_grads(sizes, 5, seed=3)
    pruner = _fed(upop.PruneConfig(p=0.5, total_steps=100, score="snr", standardise="structure"), steps)
    for i, z in enumerate(pruner.scores()):
        g = torch.stack([s[i] for s in steps]).double()  # (steps, n)
        t = g.sum(0) / (g.var(0, unbiased=False) * len(steps)).sqrt()
        torch.testing.assert_close(z, (t - t.mean()) / t.std(), atol=1e-5, rtol=1e-5)  # float32 sums


@pytest.mark.parametrize("scope", ["kind", "tower", "structure"])
def test_standardisation_scopes(scope):
    model = build(hf_clip, (2, 6, 2, 10))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=100, standardise=scope))
    g = torch.Generator().manual_seed(1)
    for mask in pruner.masks:
        mask.grad = torch.randn(mask.numel(), generator=g) * (1 + 5 * torch.rand(1, generator=g))
    pruner.step()
    scores = pruner.scores()
    groups: dict = {}
    for s, z in zip(pruner.structures, scores):
        key = {"kind": (s.kind,), "tower": (s.kind, s.tower), "structure": (s.name,)}[scope]
        groups.setdefault(key, []).append(z)
    assert len(groups) == {"kind": 2, "tower": 4, "structure": len(scores)}[scope]
    for zs in groups.values():
        flat = torch.cat(zs)
        assert abs(float(flat.mean())) < 1e-9 and float(flat.std()) == pytest.approx(1.0)


@pytest.mark.parametrize("floor", [0.0, 0.5, 1.0])
def test_a_search_never_crosses_the_floor_and_meets_the_budget(floor):
    model = build(timm_vit, (2, 32, 3, 64))
    config = upop.PruneConfig(p=0.75, total_steps=8, floor=floor, score="gradient", **ELEMENTWISE)
    pruner = upop.Pruner(model, config)
    # one structure made to look useless: without a floor the ranking starves it
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        for i, mask in enumerate(pruner.masks):
            mask.grad = torch.randn(mask.numel(), generator=g) + (20.0 if i == 0 else 0.0)
        pruner.step()
    assert abs(pruner.pruned_cost_fraction() - 0.75) <= 0.01
    for s, c in zip(pruner.structures, pruner.chosen):
        assert int((~c).sum()) >= max(1, math.ceil(floor * 0.25 * s.size - 1e-9))
    summary = pruner.stability_summary()
    starved = [w for w in summary["warnings"] if "blocks.0.attn keeps" in w]
    assert summary["min_kept_structure"] == "blocks.0.attn" or floor > 0
    assert bool(starved) == (floor < 0.25), summary["warnings"]
    if floor == 1.0:  # every structure keeps its uniform share: uniform allocation
        assert all(int((~c).sum()) == math.ceil(0.25 * s.size) for s, c in zip(pruner.structures, pruner.chosen))


def test_stability_records_the_overlap_of_consecutive_choices_and_warns_when_unsettled():
    model = build(timm_vit, (2, 6, 2, 10))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=2, interval=1, score="gradient", **ELEMENTWISE))
    sizes = [s.size for s in pruner.structures]
    first = [torch.linspace(1, -1, n) for n in sizes]  # low indices least important first...
    for mask, g in zip(pruner.masks, first):
        mask.grad = g
    pruner.step()
    before = [c.clone() for c in pruner.chosen]
    for mask, g in zip(pruner.masks, first):  # ...then reversed, outweighing it: the choice moves
        mask.grad = -3 * g
    pruner.step()
    after = pruner.chosen
    expected = sum(int((b & a).sum()) for b, a in zip(before, after)) / sum(int(b.sum()) for b in before)
    summary = pruner.stability_summary()
    assert [r["step"] for r in summary["rerankings"]] == [1, 2]
    assert summary["overlap"] == pytest.approx(expected) and expected < 0.95
    assert summary["rank_correlation"] < 0
    assert any("still changing" in w for w in summary["warnings"])
    kept = min((1 - float(c.sum()) / c.numel()) for c in after)
    assert summary["min_kept_fraction"] == pytest.approx(kept)


def test_ranking_options_are_validated():
    for bad in ({"score": "taylor"}, {"standardise": "layer"}, {"floor": 1.5}, {"floor": -0.1}, {"floor": True}):
        with pytest.raises(upop.UPopError, match=next(iter(bad))):
            upop.PruneConfig(**bad)


def test_fisher_is_the_root_mean_square_of_the_task_gradient():
    sizes = [s.size for s in upop.Pruner(build(timm_vit, (2, 6, 2, 10)), upop.PruneConfig()).structures]
    steps = _random_grads(sizes, 5, seed=4)
    pruner = _fed(upop.PruneConfig(p=0.5, total_steps=100, score="fisher", standardise="structure"), steps)
    for i, z in enumerate(pruner.scores()):
        rms = torch.stack([s[i] for s in steps]).double().pow(2).mean(0).sqrt()
        torch.testing.assert_close(z, (-rms - (-rms).mean()) / rms.std(), atol=1e-5, rtol=1e-5)  # float32 sums


@pytest.mark.parametrize("score", ["fisher", "snr"])
def test_the_task_scores_leave_out_the_l1_penalty_gradient(score):
    config = upop.PruneConfig(p=0.5, total_steps=100, score=score, w_attn=0.3, w_mlp=0.02)
    plain = upop.Pruner(build(timm_vit, (2, 6, 2, 10)), config)
    penalised = upop.Pruner(build(timm_vit, (2, 6, 2, 10)), config)
    for grads in _random_grads([s.size for s in plain.structures], 4, seed=5):
        penalised.sparsity_loss()  # in the loss: its gradient w * sign(m) arrives with the task's
        for a, b, g, s in zip(plain.masks, penalised.masks, grads, plain.structures):
            a.grad = g.clone()
            b.grad = g + (0.3 if s.kind == "attn" else 0.02)
        plain.step()
        penalised.step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain.scores(), penalised.scores()))


def test_a_floor_that_leaves_too_little_to_remove_is_lowered_just_enough_and_reported():
    pruner = upop.Pruner(build(timm_vit, (2, 32, 2, 64)), upop.PruneConfig(p=0.75, floor=1.0, **ELEMENTWISE))
    assert pruner.floor == 1.0  # parameter costs are linear: any floor leaves p to remove
    # a latency-like curve T(w) = 0.2 + w / n (w >= 1): a fixed part no width removes
    pruner.costs = [torch.cat([torch.zeros(1), 0.2 + torch.arange(1, s.size + 1) / s.size]) for s in pruner.structures]
    floor = pruner._fit_floor()
    assert 0.0 < floor < 1.0

    def removable(f):
        keep = pruner.floors(f)
        return sum(float(c[s.size] - c[k]) for c, s, k in zip(pruner.costs, pruner.structures, keep))

    need = 0.99 * 0.75 * 1.2 * len(pruner.structures)
    assert removable(floor) >= need > removable(floor + 0.01)  # the highest floor that leaves p to remove
    pruner.floor = floor
    assert any("lowered from 1 to" in w for w in pruner.stability_summary()["warnings"])


def test_the_paper_cost_prices_head_dims_and_neurons_with_the_original_constants():
    config = upop.PruneConfig(p=0.5, total_steps=6, cost="paper", attn_cost=9234 / 769, **PAPER_RANKING, **ELEMENTWISE)
    sizes = [s.size for s in upop.Pruner(build(timm_vit, (2, 6, 2, 10)), upop.PruneConfig()).structures]
    pruner = _fed(config, _random_grads(sizes, 6, seed=3))
    assert pruner.costs == [9234 / 769 if s.kind == "attn" else 1.0 for s in pruner.structures]
    # the budget is met in those units (head dims x 12.008 + neurons), to within half the costliest element
    total = sum(s.size * c for s, c in zip(pruner.structures, pruner.costs))
    removed = sum(int(ch.sum()) * c for ch, c in zip(pruner.chosen, pruner.costs))
    assert abs(removed - 0.5 * total) <= 9234 / 769 / 2 + 1e-9
    params = upop.Pruner(build(timm_vit, (2, 6, 2, 10)), upop.PruneConfig(**ELEMENTWISE)).costs
    assert params != pruner.costs  # the true parameter costs differ from the constants


def test_the_paper_cost_needs_its_constant_and_element_granularity():
    for bad in ({"cost": "paper"}, {"cost": "paper", "attn_cost": 36, "granularity": "head"}, {"attn_cost": 36}):
        with pytest.raises(upop.UPopError, match="attn_cost"):
            upop.PruneConfig(**bad)
