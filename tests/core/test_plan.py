"""Invariant 5: plan + weights -> load into a fresh dense model -> identical outputs; and mismatches are named."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build, hf_clip, hf_vit, images, logits, open_clip_model, timm_vit

import upop


def _compressed(factory, size, tmp_path, seed=0):
    model = build(factory, size, seed=seed)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=4, interval=1))
    x = images(4)
    for _ in range(4):
        (logits(model(x)).square().mean() + pruner.sparsity_loss()).backward()
        pruner.step()
    model = pruner.compress()
    upop.save_compressed(model, tmp_path / "out")
    return model


@pytest.mark.parametrize("factory", [timm_vit, hf_vit, hf_clip, open_clip_model])
def test_save_load_round_trip_gives_identical_outputs(factory, tmp_path):
    size = (3, 7, 2, 19)
    model = _compressed(factory, size, tmp_path)
    fresh = build(factory, size, seed=123)  # other random weights: everything must come from the files
    loaded = upop.load_compressed(fresh, tmp_path / "out")
    x = images(5)
    assert torch.equal(logits(loaded(x)), logits(model(x)))
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["format"] == "upop-plan" and plan["version"] == 1
    assert [len(s["kept"]) for s in plan["structures"]] == [len(s["kept"]) for s in model._upop_plan.structures]
    # a loaded model can be saved again and still carries its plan
    upop.save_compressed(loaded, tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_plan_of_another_architecture_names_the_first_mismatching_keys(tmp_path):
    _compressed(timm_vit, (3, 7, 2, 19), tmp_path)
    other = build(timm_vit, (3, 7, 2, 20))  # only the MLP width differs
    with pytest.raises(
        upop.UPopError, match=r"another architecture .*: blocks\.0\.mlp\.fc1\.weight \(plan: 19x21, model: 20x21\)"
    ):
        upop.load_compressed(other, tmp_path / "out")
    with pytest.raises(upop.UPopError, match="no UPop adapter|another architecture"):
        upop.load_compressed(build(hf_vit, (3, 7, 2, 19)), tmp_path / "out")


def test_corrupt_or_missing_compressed_files_are_reported(tmp_path):
    _compressed(timm_vit, (3, 7, 2, 19), tmp_path)
    out = tmp_path / "out"
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(upop.UPopError, match="not a readable safetensors file"):
        upop.load_compressed(build(timm_vit, (3, 7, 2, 19)), out)
    (out / "plan.json").write_text("{not json")
    with pytest.raises(upop.UPopError, match="not valid JSON"):
        upop.load_compressed(build(timm_vit, (3, 7, 2, 19)), out)
    with pytest.raises(upop.UPopError, match="plan.json is missing"):
        upop.load_compressed(build(timm_vit, (3, 7, 2, 19)), tmp_path / "nowhere")


def test_save_needs_a_compressed_model(tmp_path):
    with pytest.raises(upop.UPopError, match="carries no UPop plan"):
        upop.save_compressed(build(timm_vit, (3, 7, 2, 19)), tmp_path / "x")


def test_profile_counts_params_and_flops_of_a_linear():
    model = torch.nn.Linear(10, 4)
    stats = upop.profile(model, torch.randn(3, 10))
    assert stats == {"params": 44, "flops": 2 * 3 * 10 * 4}


def test_compressed_model_has_fewer_flops(tmp_path):
    model = build(timm_vit, (3, 7, 2, 19))
    dense = upop.profile(model, images(2))
    compressed = _compressed(timm_vit, (3, 7, 2, 19), tmp_path)
    small = upop.profile(compressed, images(2))
    assert small["params"] < dense["params"] and small["flops"] < dense["flops"]
