"""The Pruner over a short real search: budget met, masks kept out of optimizers, schedule applied, NaN steps
skipped, state round trip, misuse rejected."""

from __future__ import annotations

import pytest
import torch
from helpers import ELEMENTWISE, build, hf_clip, hf_vit, images, logits, open_clip_model, timm_vit

import upop
from upop.core.config import PAPER_RANKING
from upop.core.ranking import pi_at, removed_cost, total_cost


def _search(model, config, steps=None, example=None, optimizer_first=True):
    x = images(8)
    y = torch.arange(8) % 5
    if optimizer_first:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    pruner = upop.Pruner(model, config, example_inputs=example)
    if not optimizer_first:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps or config.total_steps):
        loss = torch.nn.functional.cross_entropy(logits(model(x)), y) + pruner.sparsity_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    return pruner, opt


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, hf_clip, open_clip_model])
@pytest.mark.parametrize("cost", ["params", "flops"])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.75])
def test_end_of_search_meets_the_budget_and_masks_are_exact(factory, cost, p):
    model = build(factory, (4, 8, 3, 64))
    pruner, _ = _search(model, upop.PruneConfig(p=p, total_steps=12, cost=cost, **ELEMENTWISE), example=images(2))
    assert pruner.finished() and pruner.pi == p
    # met to the nearest unit: 1% of the cost, or half the costliest element where one element weighs more (in these
    # tiny models a head dim is about 2% of the cost)
    total = sum(float(c) * s.size for c, s in zip(pruner.costs, pruner.structures))
    assert abs(pruner.pruned_cost_fraction() - p) <= max(0.01, max(float(c) for c in pruner.costs) / total / 2 + 1e-9)
    for mask, chosen in zip(pruner.masks, pruner.chosen):
        assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask.detach() == 0, chosen)
        assert (mask == 1).sum() >= 1


def test_masks_never_enter_the_optimizer_built_before_or_after():
    for first in (True, False):
        model = build(timm_vit, (3, 7, 2, 19))
        pruner, opt = _search(model, upop.PruneConfig(p=0.5, total_steps=3), optimizer_first=first)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not any(id(m) in in_opt for m in pruner.masks)
        assert not any(id(m) in {id(p) for p in model.parameters()} for m in pruner.masks)


def test_masks_follow_the_schedule_between_rankings():
    model = build(timm_vit, (3, 7, 2, 19))
    config = upop.PruneConfig(p=0.5, total_steps=20, interval=2)
    pruner, _ = _search(model, config, steps=10)
    pi = pi_at(10, 20, 0.5)
    assert pruner.pi == pytest.approx(pi)
    values = torch.cat([m.detach() for m in pruner.masks]).unique().tolist()
    assert sorted(values) == pytest.approx(sorted([1 - pi / 0.5, 1.0]))


def test_importance_accumulates_mask_gradients_and_sparsity_loss_value():
    model = build(timm_vit, (3, 7, 2, 19))
    config = upop.PruneConfig(p=0.5, total_steps=100, w_attn=0.5, w_mlp=0.25)
    pruner = upop.Pruner(model, config)
    n_attn = sum(s.size for s in pruner.structures if s.kind == "attn")
    n_mlp = sum(s.size for s in pruner.structures if s.kind == "mlp")
    assert pruner.sparsity_loss().item() == pytest.approx(0.5 * n_attn + 0.25 * n_mlp)
    x = images(4)
    logits(model(x)).sum().backward()
    grads = [m.grad.clone() for m in pruner.masks]
    pruner.step()
    logits(model(x)).sum().backward()
    pruner.step()
    for acc, g in zip(pruner.importance, grads):
        torch.testing.assert_close(acc, 2 * g)
    assert all(m.grad is None for m in pruner.masks)


def test_non_finite_mask_gradients_do_not_touch_the_importance():
    model = build(timm_vit, (3, 7, 2, 19))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=100))
    logits(model(images(4))).sum().backward()
    pruner.step()
    before = [a.clone() for a in pruner.importance]
    bad = images(4)
    bad[0, 0, 0, 0] = float("nan")
    logits(model(bad)).sum().backward()
    pruner.step()
    assert pruner.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(pruner.importance, before))


def test_state_dict_round_trip_continues_identically():
    config = upop.PruneConfig(p=0.5, total_steps=8)
    model_a = build(timm_vit, (3, 7, 2, 19))
    pruner_a, _ = _search(model_a, config, steps=4)
    state = pruner_a.state_dict()
    model_b = build(timm_vit, (3, 7, 2, 19), seed=5)
    pruner_b = upop.Pruner(model_b, config)
    pruner_b.load_state_dict(state)
    assert pruner_b.step_count == 4
    assert all(torch.equal(a, b) for a, b in zip(pruner_a.masks, pruner_b.masks))
    assert all(torch.equal(a, b) for a, b in zip(pruner_a.importance, pruner_b.importance))


def test_compress_before_the_end_is_refused_and_double_attach_too():
    model = build(timm_vit, (3, 7, 2, 19))
    pruner, _ = _search(model, upop.PruneConfig(p=0.5, total_steps=10), steps=3)
    with pytest.raises(upop.UPopError, match="3 of 10 steps"):
        pruner.compress()
    with pytest.raises(upop.UPopError, match="already has a Pruner"):
        upop.Pruner(model)


def test_exclude_patterns_leave_structures_unpruned():
    model = build(timm_vit, (3, 7, 2, 19))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1, exclude=("re:blocks\\.0\\.", "blocks.1.mlp")))
    assert [s.name for s in pruner.structures] == ["blocks.1.attn"]


@pytest.mark.parametrize("p", [0.0, 1.0, -0.2, 1.5])
def test_p_outside_the_open_interval_is_rejected(p):
    with pytest.raises(upop.UPopError, match="strictly between 0 and 1"):
        upop.PruneConfig(p=p)


def test_config_round_trips_through_dict():
    config = upop.PruneConfig(p=0.7, total_steps=9, cost="flops", exclude=("re:head",))
    assert upop.PruneConfig.from_dict({**config.to_dict(), "from_a_newer_version": 1}) == config


def test_model_without_adapter_lists_what_is_supported():
    with pytest.raises(upop.UPopError, match="no UPop adapter for a Sequential; supported: .*timm-vit"):
        upop.Pruner(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_aligned_search_keeps_hardware_friendly_widths():
    model = build(timm_vit, (2, 16, 2, 128))
    config = upop.PruneConfig(p=0.5, total_steps=6, align_attn=8, align_mlp=32)
    pruner, _ = _search(model, config)
    for s, c in zip(pruner.structures, pruner.chosen):
        kept = int((~c).sum())
        assert kept % (8 if s.kind == "attn" else 32) == 0 and kept > 0
    model = pruner.compress()
    assert all(b.attn.head_dim in (8, 16) for b in model.blocks)
    assert all(b.mlp.fc1.out_features in (32, 64, 96, 128) for b in model.blocks)


def test_align_must_be_positive():
    with pytest.raises(upop.UPopError, match="align_mlp must be a positive integer"):
        upop.PruneConfig(align_mlp=0)


@pytest.mark.parametrize("factory", [hf_clip, open_clip_model])
def test_one_budget_spans_both_towers_and_uniform_allocation_prunes_each_structure_alike(factory):
    model = build(factory, (4, 8, 3, 64))
    unified, _ = _search(model, upop.PruneConfig(p=0.5, total_steps=12, allocation="unified", **ELEMENTWISE))
    assert {s.tower for s in unified.structures} == {"vision", "text"}
    assert abs(unified.pruned_cost_fraction() - 0.5) <= 0.01
    per_structure = [float(c.float().mean()) for c in unified.chosen]
    assert max(per_structure) - min(per_structure) > 0.2  # the unified budget is not spread evenly
    unified.detach()
    model = build(factory, (4, 8, 3, 64))
    uniform, _ = _search(model, upop.PruneConfig(p=0.5, total_steps=12, allocation="uniform", **ELEMENTWISE))
    for s, c in zip(uniform.structures, uniform.chosen):
        assert abs(float(c.float().mean()) - 0.5) <= 0.5 / s.size + 1e-9, s.name  # p of every structure
    assert abs(uniform.pruned_cost_fraction() - 0.5) <= 0.02


@pytest.mark.parametrize("factory", [hf_clip, timm_vit])
def test_tower_allocation_ranks_within_each_tower_at_its_own_budget(factory):
    """``allocation="tower"`` (the default): each tower loses p of its own cost, ranked across its structures; with
    one tower it is the unified ranking, choice for choice."""
    model = build(factory, (4, 8, 3, 64))
    tower, _ = _search(model, upop.PruneConfig(p=0.5, total_steps=12, **ELEMENTWISE))  # the default
    towers = sorted({s.tower for s in tower.structures})
    for name in towers:
        mine = [i for i, s in enumerate(tower.structures) if s.tower == name]
        total = sum(total_cost(tower.costs[i], tower.structures[i].size) for i in mine)
        removed = sum(removed_cost(tower.costs[i], tower.structures[i].size, int(tower.chosen[i].sum())) for i in mine)
        assert abs(float(removed) / total - 0.5) <= 0.02, name
    tower.detach()
    model = build(factory, (4, 8, 3, 64))
    unified, _ = _search(model, upop.PruneConfig(p=0.5, total_steps=12, allocation="unified", **ELEMENTWISE))
    same = all(torch.equal(a, b) for a, b in zip(unified.chosen, tower.chosen))
    assert same == (towers == ["vision"])  # two towers: the unified budget moves cost between them


def test_towers_restrict_pruning_to_one_tower_and_unknown_towers_are_named():
    model = build(hf_clip, (2, 4, 2, 16))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, towers=("vision",)))
    assert pruner.structures and all(s.tower == "vision" and "vision_model" in s.name for s in pruner.structures)
    pruner.detach()
    with pytest.raises(upop.UPopError, match="no tower 'audio'; its towers: text, vision"):
        upop.Pruner(model, upop.PruneConfig(p=0.5, towers=("audio",)))


@pytest.mark.parametrize("factory", [timm_vit, hf_clip])
@pytest.mark.parametrize("ranking", [{}, PAPER_RANKING], ids=["default", "paper"])
def test_the_l1_weights_do_not_change_the_ranking(factory, ranking):
    """The masks are not optimised, so the L1 term adds the same constant w to the gradient of every mask element of
    a kind: the per-kind standardisation removes it from the paper's score, and the snr score is computed without
    it. Any weights give the same choice as none."""
    choices = []
    for w_attn, w_mlp in ((0.0, 0.0), (4.8e-3, 2e-4), (0.3, 0.01)):
        model = build(factory, (4, 8, 3, 64))
        config = upop.PruneConfig(p=0.5, total_steps=12, w_attn=w_attn, w_mlp=w_mlp, **ELEMENTWISE, **ranking)
        pruner, _ = _search(model, config)
        choices.append(pruner.chosen)
        assert any(c.any() for c in pruner.chosen)
    for other in choices[1:]:
        assert all(torch.equal(a, b) for a, b in zip(choices[0], other))


def _prunable_params_by_hand(width: int, hidden: int, depth: int) -> int:
    """Per block: q, k, v rows with their biases (3d^2 + 3d), the output projection's columns (d^2, its bias is not
    pruned), fc1 rows with bias (dh + h) and fc2's columns (hd)."""
    return depth * (4 * width * width + 3 * width + 2 * width * hidden + hidden)


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, hf_clip])
@pytest.mark.parametrize("p", [0.3, 0.75])
def test_the_compressed_model_has_p_fewer_prunable_parameters(factory, p):
    """The budget checked against the parameter counts of the compressed model, not against the costs that drove
    the selection."""
    model = build(factory, (4, 8, 3, 64))
    dense = sum(t.numel() for t in model.parameters())
    prunable = _prunable_params_by_hand(32, 64, 3)
    if factory is hf_clip:  # the text tower: 2 heads of 9 dims, MLP 67
        prunable += _prunable_params_by_hand(18, 67, 3)
    pruner, _ = _search(model, upop.PruneConfig(p=p, total_steps=12, **ELEMENTWISE))
    compressed = pruner.compress()
    removed = dense - sum(t.numel() for t in compressed.parameters())
    # each tower's cut is the prefix closest to its p: it misses by at most half its coarsest unit, one head dim
    # (vision: 4 heads x (3 x 32 + 3 + 32) parameters; clip's text tower: 2 heads x (3 x 18 + 3 + 18)), and the
    # towers' misses can add up
    coarsest = 4 * (4 * 32 + 3) + (2 * (4 * 18 + 3) if factory is hf_clip else 0)
    assert abs(removed / prunable - p) <= 0.5 * coarsest / prunable


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, hf_clip, open_clip_model])
def test_element_costs_equal_the_real_deltas_of_removing_one_element(factory):
    """element_params / element_flops against the parameter and FLOP counts (torch's counter) of a model with one
    element of the structure sliced away."""
    import copy

    from upop.adapters import find_adapter
    from upop.core.structure import slice_structure

    model = build(factory, (3, 6, 2, 20))
    x = images(1)
    pruner = upop.Pruner(model, upop.PruneConfig(cost="flops"), example_inputs=x)
    structures = list(pruner.structures)
    pruner.detach()
    dense = upop.profile(model, x)
    for s in structures:
        smaller = copy.deepcopy(model)
        twin = next(t for t in find_adapter(smaller).structures(smaller) if t.name == s.name)
        slice_structure(twin, torch.arange(1, s.size))
        stats = upop.profile(smaller, x)
        assert dense["params"] - stats["params"] == s.element_params(), s.name
        assert dense["flops"] - stats["flops"] == s.element_flops(), s.name


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, hf_clip, open_clip_model])
def test_whole_heads_are_ranked_with_mlp_neurons_in_one_budget(factory):
    model = build(factory, (4, 8, 3, 64))
    config = upop.PruneConfig(p=0.5, total_steps=12, granularity="head", **ELEMENTWISE)
    pruner, _ = _search(model, config)
    heads = [s for s in pruner.structures if s.kind == "attn"]
    assert all(s.block == 8 or s.block == 9 for s in heads) and all(s.size in (4, 2) for s in heads)
    total = sum(c * s.size for c, s in zip(pruner.costs, pruner.structures))
    biggest = max(c for c, s in zip(pruner.costs, pruner.structures) if s.kind == "attn")
    assert abs(pruner.pruned_cost_fraction() - 0.5) <= biggest / total / 2 + 1e-9  # the closest a head allows
    plan = pruner.plan()
    assert plan.config["granularity"] == "head"


def _attention_deltas(granularity, keeps):
    """A small HF CLIP, and for each of its attention structures at ``granularity`` and each kept set
    ``keeps(structure)`` gives: (structure, elements removed, params and FLOPs that slicing to it really saved)."""
    import copy

    from upop.adapters import find_adapter
    from upop.core.structure import slice_structure

    model = build(hf_clip, (3, 6, 2, 20))
    x = images(1)
    config = upop.PruneConfig(cost="flops", granularity=granularity, **ELEMENTWISE)
    pruner = upop.Pruner(model, config, example_inputs=x)
    structures = [s for s in pruner.structures if s.kind == "attn"]
    pruner.detach()
    dense = upop.profile(model, x)
    deltas = []
    for s in structures:
        for keep in keeps(s):
            smaller = copy.deepcopy(model)
            twin = next(t for t in find_adapter(smaller).structures(smaller, granularity) if t.name == s.name)
            slice_structure(twin, keep)
            stats = upop.profile(smaller, x)
            deltas.append(
                (s, s.size - keep.numel(), dense["params"] - stats["params"], dense["flops"] - stats["flops"])
            )
    return model, deltas


def test_whole_head_costs_equal_the_real_deltas_and_the_plan_round_trips(tmp_path):
    import copy

    model, deltas = _attention_deltas("head", lambda s: [torch.arange(1, s.size)])
    for s, removed, params, flops in deltas:
        assert removed == 1 and params == s.element_params() and flops == s.element_flops(), s.name
    reference = copy.deepcopy(model)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1, granularity="head", **ELEMENTWISE))
    pruner.set_choice([torch.arange(s.size) % 2 == 1 for s in pruner.structures], 0.0)
    compressed = pruner.compress(force=True)
    upop.save_compressed(compressed, tmp_path)
    loaded = upop.load_compressed(reference, tmp_path)
    assert torch.equal(loaded(images(3)), compressed(images(3)))


def test_granularity_is_dim_head_or_mixed():
    with pytest.raises(upop.UPopError, match="granularity must be one of dim, head, mixed"):
        upop.PruneConfig(granularity="channel")
    with pytest.raises(upop.UPopError, match='granularity "mixed" .* use cost "params" or "flops"'):
        upop.PruneConfig(granularity="mixed", cost="latency")


def _grid_shape(pruner, s, chosen):
    kept = (~chosen).reshape(s.grid)
    heads, dims = kept.any(1), kept.any(0)
    assert torch.equal(kept, heads[:, None] & dims[None, :])
    return int(heads.sum()), int(dims.sum())


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, hf_clip, open_clip_model])
@pytest.mark.parametrize("align", [1, 4])
def test_mixed_search_ranks_heads_and_aligned_dims_with_mlp_neurons_in_one_budget(factory, align):
    model = build(factory, (4, 8, 3, 64))
    config = upop.PruneConfig(p=0.5, total_steps=12, granularity="mixed", cost="flops", align_attn=align, align_mlp=1)
    pruner, _ = _search(model, config, example=images(2))
    shapes = [_grid_shape(pruner, s, c) for s, c in zip(pruner.structures, pruner.chosen) if s.grid is not None]
    assert shapes and all(d % align == 0 and h >= 1 for h, d in shapes)
    costs = [float(c) for c in pruner.costs]
    total = sum(c * s.size for c, s in zip(costs, pruner.structures))
    # the largest step: a head (8 dims) or a block of dims over 4 heads
    biggest = max(c * (max(8, 4 * align) if s.grid else 1) for c, s in zip(costs, pruner.structures))
    assert abs(pruner.pruned_cost_fraction() - 0.5) <= biggest / total / 2 + 1e-9
    x = images(3)
    model.eval()
    masked = logits(model(x))
    compressed = pruner.compress()
    torch.testing.assert_close(logits(compressed(x)), masked, rtol=1e-5, atol=1e-5)


def test_mixed_pair_costs_add_up_to_the_real_deltas_of_a_head_and_of_a_dim_and_the_plan_loads_on_meta(tmp_path):
    def one_head_or_one_dim_less(s):
        heads, dims = s.grid
        pairs = torch.arange(heads * dims).view(heads, dims)
        return [pairs[1:].reshape(-1), pairs[:, 1:].reshape(-1)]

    model, deltas = _attention_deltas("mixed", one_head_or_one_dim_less)
    for i, (s, removed, params, flops) in enumerate(deltas):
        assert removed == s.grid[1] if i % 2 == 0 else removed == s.grid[0]  # a head's dims, a dim's heads
        assert params == removed * s.element_params() and flops == removed * s.element_flops(), s.name
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1, granularity="mixed", **ELEMENTWISE))
    pruner.set_choice(
        [
            (torch.arange(s.size) // s.grid[1] == 0) | (torch.arange(s.size) % s.grid[1] >= 2)
            if s.grid
            else torch.arange(s.size) % 2 == 1
            for s in pruner.structures
        ],
        0.0,
    )
    compressed = pruner.compress(force=True)
    upop.save_compressed(compressed, tmp_path)
    loaded = upop.load_compressed(lambda: build(hf_clip, (3, 6, 2, 20), seed=7), tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(loaded(images(3)), compressed(images(3)))
