"""Invariants 1 and 2 over every registered adapter: masks at 1 change nothing (bitwise) and detaching restores the
model; exact 0/1 masks give the compressed model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import CASE_IDS, CASES, ELEMENTWISE, build, every_adapter_has_models, images, logits

import upop


def test_every_registered_adapter_has_test_models():
    assert every_adapter_has_models() == set()


def _patched(model):
    """Modules carrying anything beyond their class's behaviour: instance forwards and hooks."""
    return sum(("forward" in vars(m)) + len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("granularity", ["dim", "head", "mixed"])
@pytest.mark.parametrize("adapter,factory,size", CASES, ids=CASE_IDS)
def test_masks_at_one_are_bitwise_identity_and_detach_restores(adapter, factory, size, granularity):
    model = build(factory, size)
    x = images()
    reference = copy.deepcopy(model)
    before = logits(model(x))
    patched_before = _patched(model)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10, granularity=granularity, **ELEMENTWISE))
    assert adapter in pruner.adapter.name.split("+")
    assert _patched(model) > patched_before  # masks really are attached
    assert torch.equal(logits(model(x)), before)
    pruner.detach()
    assert _patched(model) == patched_before
    assert torch.equal(logits(model(x)), logits(reference(x)))
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())


def _random_choice(pruner, seed):
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for s in pruner.structures:
        if s.grid is not None:  # mixed granularity: a random set of heads x a random set of dims
            heads, dims = (torch.rand(n, generator=g) < 0.5 for n in s.grid)
            heads[torch.randint(0, s.grid[0], (1,), generator=g)] = True
            dims[torch.randint(0, s.grid[1], (1,), generator=g)] = True
            chosen.append(~(heads[:, None] & dims[None, :]).reshape(-1))
            continue
        c = torch.rand(s.size, generator=g) < 0.5
        c[torch.randint(0, s.size, (1,), generator=g)] = False  # keep at least one
        chosen.append(c)
    return chosen


@pytest.mark.parametrize("granularity", ["dim", "head", "mixed"])
@pytest.mark.parametrize("adapter,factory,size", CASES, ids=CASE_IDS)
def test_exact_masks_equal_compressed_outputs(adapter, factory, size, granularity):
    model = build(factory, size)
    x = images()
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10, granularity=granularity, **ELEMENTWISE))
    pruner.set_choice(_random_choice(pruner, seed=sum(size)), value=0.0)
    masked = logits(model(x))
    params_before = sum(p.numel() for p in model.parameters())
    compressed = pruner.compress(force=True)
    out = logits(compressed(x))
    assert sum(p.numel() for p in compressed.parameters()) < params_before
    assert _patched(compressed) == 0
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)
    # the compressed weights really are smaller: each kept element count matches the plan
    for s, entry in zip(pruner.structures, compressed._upop_plan.structures):
        assert s.size == len(entry["kept"])
        for slot in s.rows:
            assert slot.out_features == slot.groups * len(entry["kept"]) * slot.block


def test_timm_unfused_attention_path_keeps_the_original_scale():
    from helpers import timm_vit

    torch.manual_seed(0)
    model = timm_vit(heads=3, head_dim=7).eval()
    x = images()
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1))
    pruner.set_choice(_random_choice(pruner, 3), 0.0)
    masked = model(x)
    model = pruner.compress(force=True)
    fused = model(x)
    for block in model.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, masked, rtol=1e-5, atol=1e-5)


def test_a_deep_copy_of_a_masked_model_computes_with_its_own_weights():
    from helpers import timm_vit

    torch.manual_seed(0)
    model = timm_vit().eval()
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1))
    pruner.set_choice(_random_choice(pruner, 1), 0.0)
    twin = copy.deepcopy(model)
    x = images()
    before = model(x)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert torch.equal(model(x), before)  # changing the copy's weights leaves the original alone
    assert not torch.equal(twin(x), before)


def _timm_4x6(fused: bool, granularity: str):
    """A timm ViT of 4 heads x 6 dims on its fused or unfused attention path, with a Pruner at ``granularity``."""
    from helpers import timm_vit

    torch.manual_seed(0)
    model = timm_vit(heads=4, head_dim=6).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1, granularity=granularity, **ELEMENTWISE))
    return model, images(), pruner


@pytest.mark.parametrize("fused", [True, False])
def test_whole_heads_keep_head_dim_and_scale_and_every_derived_attribute(fused):
    model, x, pruner = _timm_4x6(fused, "head")
    assert [s.size for s in pruner.structures if s.kind == "attn"] == [4, 4]
    prune = {"blocks.0.attn": [True, False, True, False], "blocks.1.attn": [False, True, True, True]}
    pruner.set_choice([torch.tensor(prune.get(s.name, [False] * s.size)) for s in pruner.structures], 0.0)
    masked = model(x)
    model = pruner.compress(force=True)
    heads = [(b.attn.num_heads, b.attn.head_dim, b.attn.attn_dim, b.attn.scale) for b in model.blocks]
    assert heads == [(2, 6, 12, 6**-0.5), (1, 6, 6, 6**-0.5)]
    assert model.blocks[0].attn.qkv.out_features == 3 * 12 and model.blocks[1].attn.proj.in_features == 6
    torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_mixed_granularity_keeps_fewer_heads_of_a_narrower_head_dim_and_the_original_scale(fused):
    model, x, pruner = _timm_4x6(fused, "mixed")
    assert [(s.size, s.grid) for s in pruner.structures if s.kind == "attn"] == [(24, (4, 6))] * 2
    keep = {"blocks.0.attn": ([0, 2, 3], [1, 4]), "blocks.1.attn": ([1], [0, 1, 2, 3, 4, 5])}
    chosen = []
    for s in pruner.structures:
        if s.name in keep:
            heads, dims = keep[s.name]
            kept = torch.zeros(s.grid, dtype=torch.bool)
            kept[torch.tensor(heads)[:, None], torch.tensor(dims)[None, :]] = True
            chosen.append(~kept.reshape(-1))
        else:
            chosen.append(torch.zeros(s.size, dtype=torch.bool))
    pruner.set_choice(chosen, 0.0)
    masked = model(x)
    model = pruner.compress(force=True)
    shapes = [(b.attn.num_heads, b.attn.head_dim, b.attn.attn_dim) for b in model.blocks]
    assert shapes == [(3, 2, 6), (1, 6, 6)]
    assert model.blocks[0].attn.qkv.out_features == 3 * 6 and model.blocks[0].attn.proj.in_features == 6
    torch.testing.assert_close(model(x), masked, rtol=1e-5, atol=1e-5)


def test_a_mixed_choice_that_is_not_heads_times_shared_dims_is_refused():
    from helpers import timm_vit

    model = timm_vit(heads=2, head_dim=4)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1, granularity="mixed", **ELEMENTWISE))
    chosen = [torch.zeros(s.size, dtype=torch.bool) for s in pruner.structures]
    chosen[0][[1, 6]] = True  # dim 1 of head 0 and dim 2 of head 1: the heads would keep different dims
    with pytest.raises(upop.UPopError, match="whole heads x head dims shared by all kept heads"):
        pruner.set_choice(chosen, 0.0)
