"""The learning-rate schedules and optimizers of the paper's recipes: BLIP's per-epoch cosine, Segmenter's polynomial
decay, both ending at the minimum LR, and SGD with Nesterov momentum."""

from __future__ import annotations

import math

import pytest
import torch

from upop.engine.loop import lr_schedule, make_optimizer


def _lrs(kind: str, total: int, per_epoch: int = 1, warmup: int = 0, floor: float = 0.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(opt, total, warmup, kind, floor, per_epoch)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return out


def test_epoch_cosine_is_blip_s_per_epoch_formula_and_constant_within_an_epoch():
    lrs = _lrs("epoch-cosine", total=12, per_epoch=3)
    for step, lr in enumerate(lrs):
        epoch = step // 3
        assert lr == pytest.approx(0.5 * (1 + math.cos(math.pi * epoch / 4)))  # BLIP: init_lr -> 0 over 4 epochs


def test_poly_is_segmenter_s_decay_to_the_minimum():
    lrs = _lrs("poly", total=10, floor=0.01)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx((1 - 0.01) * (1 - step / 10) ** 0.9 + 0.01)
    assert lrs == sorted(lrs, reverse=True)


def test_cosine_ends_at_the_floor_and_warms_up_first():
    lrs = _lrs("cosine", total=11, warmup=2, floor=0.1)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, 11, 2, "cosine", 0.1)
    assert sched.lr_lambdas[0](11) == pytest.approx(0.1)
    assert _lrs("constant", total=4) == [1.0] * 4


def test_sgd_is_nesterov_with_momentum_and_adamw_is_the_default():
    p = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(p, "sgd", 0.1, 0.0)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 0.0
    assert isinstance(make_optimizer(p, "adamw", 0.1, 0.05), torch.optim.AdamW)
    with pytest.raises(ValueError):
        make_optimizer(p, "lamb", 0.1, 0.0)
