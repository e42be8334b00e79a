"""The re-ranking interval: "auto" re-ranks at least 10 times on any search length (every step when it is short), an
explicit interval that would prune in one shot is refused, and the schedule line says what will happen."""

from __future__ import annotations

import pytest
import torch
from helpers import build, images, logits, timm_vit

import upop
from upop.core.ranking import schedule_summary


@pytest.mark.parametrize("T, interval, count", [(22, 2, 11), (5, 1, 5), (19, 1, 19), (200, 20, 10), (10**4, 50, 200)])
def test_auto_interval_reranks_at_least_ten_times(T, interval, count):
    config = upop.PruneConfig(total_steps=T)
    assert config.rank_interval() == interval and config.rerankings() == count
    steps = config.rank_steps()
    assert len(steps) == count and steps[-1] == T


def test_an_explicit_interval_that_prunes_in_one_shot_is_refused_when_the_pruner_is_built():
    model = build(timm_vit, (3, 7, 2, 19))
    with pytest.raises(upop.UPopError, match=r"T = 22 steps; re-ranking every 50 steps ranks only 1 time"):
        upop.Pruner(model, upop.PruneConfig(total_steps=22, interval=50))
    upop.Pruner(model, upop.PruneConfig(total_steps=22, interval=2)).detach()  # 11 re-rankings: fine


def test_a_short_search_is_progressive_step_after_step():
    model = build(timm_vit, (3, 7, 2, 19))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=12))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = []
    for _ in range(12):
        (logits(model(images(4))).square().mean() + pruner.sparsity_loss()).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        seen.append(pruner.pi)
    assert all(a < b for a, b in zip(seen, seen[1:])) and seen[-1] == 0.5  # pi rose at every step


def test_schedule_summary_names_T_interval_and_pi():
    config = upop.PruneConfig(p=0.5, total_steps=22)
    line = schedule_summary(0.5, 22, config.rank_steps(), config.rank_interval())
    assert line.startswith("search: T = 22 steps, re-ranking every 2 step(s), 11 times;")
    assert "t=2 0.071" in line and line.endswith("t=22 0.500")


def test_interval_must_be_positive_or_auto():
    with pytest.raises(upop.UPopError, match="positive integer or 'auto'"):
        upop.PruneConfig(interval=0)
