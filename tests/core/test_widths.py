"""align="auto": the alignment is measured on the run's device (probes shaped like the model's structures), the
smallest one whose widths run at full speed; cached per device and shape; kept by a resumed search; recorded."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build, images, timm_vit

import upop
from upop.core import widths


def _scripted(slow_unless_multiple_of: int):
    """A timer under which a probe width runs 4x slower than its share unless it is a multiple of
    ``slow_unless_multiple_of`` (an H200 in bf16 measured 2-5x)."""

    def seconds(module, x, dtype):
        width = module.fc1.out_features if hasattr(module, "fc1") else module.head_dim
        return width * (1.0 if width % slow_unless_multiple_of == 0 else 4.0)

    return seconds


@pytest.mark.parametrize("penalty_below, expected", [(1, 1), (4, 4), (8, 8), (16, 16)])
def test_the_smallest_alignment_at_full_speed_is_chosen(monkeypatch, penalty_below, expected):
    monkeypatch.setattr(widths, "_seconds", _scripted(penalty_below))
    build_mlp = lambda w: widths.MlpProbe(16, w)  # noqa: E731
    align, relative = widths._choose(768, build_mlp, torch.zeros(1, 1, 16), None)
    assert align == expected
    assert relative[384] == 1.0 and set(relative) == {384, 383, 382, 380, 376, 368}


def test_auto_is_measured_cached_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(widths, "_seconds", _scripted(8))
    model = build(timm_vit, (2, 16, 2, 64))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10), example_inputs=images(4))
    assert (pruner.alignment.attn, pruner.alignment.mlp) == (8, 8) and pruner.alignment.device == "cpu"
    cache = json.loads((tmp_path / "widths.json").read_text())
    assert len(cache) == 2 and all("|fp32|" in key and "tokens 17|batch 4" in key for key in cache)
    pruner.detach()
    calls = []
    monkeypatch.setattr(widths, "_choose", lambda *a: calls.append(a) or (1, {}))
    again = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10), example_inputs=images(4))
    assert not calls and (again.alignment.attn, again.alignment.mlp) == (8, 8)  # from the cache
    again.detach()
    given = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10, align_attn=1, align_mlp=4))
    assert (given.alignment.attn, given.alignment.mlp, given.alignment.device) == (1, 4, "given") and not calls


def test_a_search_with_auto_keeps_multiples_and_a_resumed_search_keeps_its_alignment(tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(widths, "_seconds", _scripted(8))
    model = build(timm_vit, (2, 16, 2, 64))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=4), example_inputs=images(2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(4):
        (model(images(2)).square().mean() + pruner.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert all(int((~c).sum()) % 8 == 0 for c in pruner.chosen)
    state = pruner.state_dict()
    pruner.detach()
    monkeypatch.setattr(widths, "_seconds", _scripted(1))  # the machine now measures otherwise...
    (tmp_path / "widths.json").unlink()
    resumed = upop.Pruner(build(timm_vit, (2, 16, 2, 64)), upop.PruneConfig(p=0.5, total_steps=4), images(2))
    assert resumed.alignment.attn == 1
    resumed.load_state_dict(state)
    assert (resumed.alignment.attn, resumed.alignment.mlp) == (8, 8)  # ...the resumed search keeps its own


def test_auto_or_a_positive_integer():
    with pytest.raises(upop.UPopError, match="align_attn must be a positive integer or 'auto'"):
        upop.PruneConfig(align_attn="fast")


def test_a_one_off_spike_from_another_tenant_does_not_coarsen_the_widths(monkeypatch):
    calls = {"n": 0}

    def spiky(module, x, dtype):
        width = module.fc1.out_features
        calls["n"] += 1
        return width * (4.0 if width == 376 and calls["n"] < 12 else 1.0)  # 376: slow only the first time

    monkeypatch.setattr(widths, "_seconds", spiky)
    align, relative = widths._choose(768, lambda w: widths.MlpProbe(16, w), torch.zeros(1, 1, 16), None)
    assert align == 1 and relative[376] < 1.5
