"""Family specifics: HF models loaded from a local directory, timm variants that cannot be pruned exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import ELEMENTWISE, hf_vit, images

import upop
from upop.adapters import find_adapter
from upop.models import build_model


def test_hf_directory_loads_offline_with_a_new_head_and_is_prunable(tmp_path):
    torch.manual_seed(0)
    hf_vit(heads=2, head_dim=8, depth=2, mlp_hidden=32).save_pretrained(tmp_path / "vit")
    model = build_model(f"hf:{tmp_path / 'vit'}", num_classes=7).eval()
    assert model.config.num_labels == 7
    assert find_adapter(model).name == "hf-vit"
    saved = _safetensors(tmp_path / "vit" / "model.safetensors")
    # every encoder weight came from the directory (only the classifier is new), not from a fresh initialisation
    # (transformers saves the legacy key names: compare by value)
    state = model.state_dict()
    encoder = [v for k, v in saved.items() if ".encoder." in k]
    assert len(encoder) == 2 * 16  # q/k/v/o, fc1/fc2 (weight + bias) and two layer norms per layer
    assert all(any(t.shape == v.shape and torch.equal(t, v) for t in state.values()) for v in encoder)
    assert not torch.equal(
        state["vit.layers.0.attention.q_proj.weight"],
        hf_vit(heads=2, head_dim=8, depth=2, mlp_hidden=32).state_dict()["vit.layers.0.attention.q_proj.weight"],
    )
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1))
    assert len(pruner.structures) == 4


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_hf_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(upop.UPopError, match="not an HF model directory"):
        build_model(f"hf:{tmp_path}", num_classes=3)


def test_timm_qk_norm_is_refused_with_the_reason():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, qk_norm=True)
    with pytest.raises(upop.UPopError, match="qk_norm normalises over head_dim"):
        upop.Pruner(model)


def test_bf16_autocast_search_keeps_importance_finite_and_budget_met():
    from upop.engine.loop import amp_context

    torch.manual_seed(0)
    model = build_model("vit-micro", 5)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=6, **ELEMENTWISE))
    autocast, scaler = amp_context(torch.device("cpu"), True)
    assert scaler is None  # bf16 needs no scaler
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = images(8), torch.arange(8) % 5
    for _ in range(6):
        with autocast():
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        (loss + pruner.sparsity_loss()).backward()
        assert all(m.grad.dtype == torch.float32 for m in pruner.masks)
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert pruner.skipped_steps == 0
    assert all(torch.isfinite(a).all() and a.abs().sum() > 0 for a in pruner.importance)
    assert abs(pruner.pruned_cost_fraction() - 0.5) <= 0.01
