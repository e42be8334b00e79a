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
def _search(model, pruner, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        (model(images(2)).square().mean() + pruner.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()


@pytest.mark.parametrize("penalty_below, expected", [(1, 1), (4, 4), (8, 8), (16, 16)])
def test_the_smallest_alignment_at_full_speed_is_chosen(monkeypatch, penalty_below, expected):
    monkeypatch.setattr(widths, "time_module", _scripted(penalty_below))
    build_mlp = lambda w: widths.MlpProbe(16, w)  # noqa: E731
    align, relative = widths.choose_alignment(768, build_mlp, torch.zeros(1, 1, 16), None)
    assert align == expected
    assert relative[384] == 1.0 and set(relative) == {384, 383, 382, 380, 376, 368}


def test_auto_is_measured_cached_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(widths, "time_module", _scripted(8))
    model = build(timm_vit, (2, 16, 2, 64))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10), example_inputs=images(4))
    assert (pruner.alignment.attn, pruner.alignment.mlp) == (8, 8) and pruner.alignment.device == "cpu"
    cache = json.loads((tmp_path / "widths.json").read_text())
    assert len(cache) == 2 and all("|fp32|" in key and "tokens 17|batch 4" in key for key in cache)
    pruner.detach()
    calls = []
    monkeypatch.setattr(widths, "choose_alignment", lambda *a: calls.append(a) or (1, {}))
    again = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10), example_inputs=images(4))
    assert not calls and (again.alignment.attn, again.alignment.mlp) == (8, 8)  # from the cache
    again.detach()
    given = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10, align_attn=1, align_mlp=4))
    assert (given.alignment.attn, given.alignment.mlp, given.alignment.device) == (1, 4, "given") and not calls


def test_measuring_leaves_the_random_streams_of_the_run_alone(tmp_path, monkeypatch):
    """A cold cache measures (random probes and inputs), a warm one does not: the seeded stream that follows must
    be the same either way, or a run's results would depend on whether the machine had run upop before."""
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path))
    model = build(timm_vit, (2, 16, 2, 64))
    after = []
    for _ in ("cold", "warm"):
        torch.manual_seed(0)
        upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10), example_inputs=images(4)).detach()
        after.append(torch.rand(4))
    assert len(json.loads((tmp_path / "widths.json").read_text())) == 2  # the first one did measure
    assert torch.equal(after[0], after[1])


def test_a_search_with_auto_keeps_multiples_and_a_resumed_search_keeps_its_alignment(tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(widths, "time_module", _scripted(8))
    model = build(timm_vit, (2, 16, 2, 64))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=4), example_inputs=images(2))
    _search(model, pruner, 4)
    assert all(int((~c).sum()) % 8 == 0 for c in pruner.chosen)
    state = pruner.state_dict()
    pruner.detach()
    monkeypatch.setattr(widths, "time_module", _scripted(1))  # the machine now measures otherwise...
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

    monkeypatch.setattr(widths, "time_module", spiky)
    align, relative = widths.choose_alignment(768, lambda w: widths.MlpProbe(16, w), torch.zeros(1, 1, 16), None)
    assert align == 1 and relative[376] < 1.5


@pytest.mark.parametrize("device, expected", [("cuda", 8), ("cpu", 4)])
def test_a_width_a_gpu_runs_slower_than_a_larger_one_is_not_full_speed(monkeypatch, device, expected):
    """What an H200 measured in bf16 for the Segmenter's attention (6 heads, 1024 tokens; time relative to head_dim
    32): 28 took 1.44x as long as 32. On a GPU, whose clock is steady, that is a penalty, and 8 is chosen; a CPU's
    shared cores are noisier, so there only a large penalty counts."""
    measured = {32: 1.0, 31: 1.746, 30: 1.773, 28: 1.443, 24: 1.003, 16: 0.94}
    monkeypatch.setattr(widths, "time_module", lambda module, x, dtype: measured[module.head_dim])
    build_attn = lambda w: widths.AttentionProbe(16, 2, w)  # noqa: E731
    slack = widths.tolerance(torch.device(device))
    align, _ = widths.choose_alignment(64, build_attn, torch.zeros(1, 1, 16), None, slack)
    assert align == expected


# ------------------------------------------------------------------------------------------------ cost="latency"
def test_a_latency_table_becomes_a_non_decreasing_curve_over_every_width():
    curve = widths.curve_from_table({"2": 1.0, "4": 3.0, "6": 2.5, "8": 5.0}, 8)  # 6 measured below 4: noise
    assert curve.shape == (9,) and curve[0] == 0.0  # extrapolated along the first segment, at least 0
    assert curve.tolist() == pytest.approx([0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0])
    assert all(a <= b for a, b in zip(curve, curve[1:]))


def test_select_with_a_curve_charges_each_unit_the_time_it_saves():
    from upop.core.ranking import select

    scores = [torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([3.5, 2.5, 1.5, 0.5])]
    linear = [torch.arange(5, dtype=torch.float64) * 2.0, torch.arange(5, dtype=torch.float64)]
    assert all(torch.equal(a, b) for a, b in zip(select(scores, linear, 0.5), select(scores, [2.0, 1.0], 0.5)))
    # structure 0: its last 2 elements' removal saves nothing (a flat curve below width 3); structure 1 is linear
    flat = torch.tensor([0.0, 6.0, 6.0, 6.0, 6.0], dtype=torch.float64)  # keeping >= 1 element costs the same
    chosen = select(scores, [flat, torch.arange(5, dtype=torch.float64)], 0.4)  # total 6 + 4 = 10: cut at 4
    # order 4.0(s0) 3.5(s1) 3.0(s0) 2.5(s1) 2.0(s0): costs 0, 1, 0, 1, 0, ... -> the prefix closest to 4 takes all
    # three prunable units of structure 0 (free) and three of structure 1
    assert chosen[0].tolist() == [True, True, True, False] and chosen[1].tolist() == [True, True, True, False]


def test_a_latency_cost_search_measures_once_per_shape_and_meets_its_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path))
    calls = []

    def seconds(module, x, dtype):  # attention time grows with the square of its width, the MLP linearly
        calls.append(1)
        w = module.head_dim if hasattr(module, "head_dim") else module.fc1.out_features
        return (w * w * 1e-3) if hasattr(module, "head_dim") else w * 1e-3

    monkeypatch.setattr(widths, "time_module", seconds)
    model = build(timm_vit, (2, 16, 3, 64))
    config = upop.PruneConfig(p=0.5, total_steps=6, cost="latency", align_attn=1, align_mlp=1)
    pruner = upop.Pruner(model, config, example_inputs=images(4))
    assert len(pruner.latency_tables) == 2 and len(calls) == 2 * widths.LATENCY_POINTS  # 3 blocks, 2 shapes
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(6):
        (model(images(4)).square().mean() + pruner.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    assert abs(pruner.pruned_cost_fraction() - 0.5) <= 0.05
    summary = pruner.latency_summary()
    assert summary["kept_ms"] == pytest.approx(summary["target_ms"], rel=0.1)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(pruner.latency_tables))
    pruner.detach()
    monkeypatch.setattr(widths, "time_module", lambda *a: pytest.fail("a given table must not be measured"))
    given = upop.Pruner(model, upop.PruneConfig(**{**config.to_dict(), "latency_table": str(table)}), images(4))
    assert all(torch.equal(a, b) for a, b in zip(given.costs, pruner.costs))
    given.detach()
    other = build(timm_vit, (2, 16, 3, 48))  # another MLP width: not in the table
    with pytest.raises(upop.UPopError, match=r"has no entry for latency\|mlp neurons\|width 32.*upop latency-table"):
        upop.Pruner(other, upop.PruneConfig(**{**config.to_dict(), "latency_table": str(table)}), images(4))


def test_mixed_granularity_probes_head_dims_of_the_block_and_keeps_them_aligned(tmp_path, monkeypatch):
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(widths, "time_module", _scripted(8))
    model = build(timm_vit, (4, 16, 2, 64))
    config = upop.PruneConfig(p=0.5, total_steps=4, granularity="mixed")
    pruner = upop.Pruner(model, config, example_inputs=images(2))
    assert pruner.alignment.attn == 8
    cache = json.loads((tmp_path / "widths.json").read_text())
    assert any("|attn|" in key and "heads 4|" in key and key.endswith("size 16") for key in cache)  # head dims
    _search(model, pruner, 4)
    for s, c in zip(pruner.structures, pruner.chosen):
        kept = (~c).reshape(s.grid) if s.grid else ~c
        width = int(kept.any(0).sum()) if s.grid else int(kept.sum())
        assert width % 8 == 0, (s.name, width)
