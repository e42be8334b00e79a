"""The kept epoch is one noise cannot pick: on a selection split whose scores are pure noise the guarded rule keeps
the last epoch; a lead well beyond the split's standard error still wins; the error is the split's."""

from __future__ import annotations

import math

import pytest
import torch

from upop.engine.selection import choose_epoch, margin
from upop.errors import UPopError
from upop.tasks.caption import caption_scores
from upop.tasks.classification import Classification
from upop.utils.stats import binomial_error, mean_error


def _noise_history(generator: torch.Generator, epochs: int, size: int, true: float) -> list[dict]:
    """Scores of ``epochs`` equally good models on a split of ``size`` samples: binomial noise around ``true``."""
    hits = torch.binomial(torch.full((epochs,), float(size)), torch.full((epochs,), true), generator=generator)
    return [{"epoch": e + 1, "top1": 100.0 * float(h) / size} for e, h in enumerate(hits)]


@pytest.mark.parametrize("epochs,size", [(3, 72), (5, 200), (20, 72), (20, 1000)])
def test_pure_noise_keeps_the_last_epoch(epochs, size):
    generator = torch.Generator().manual_seed(epochs * 1000 + size)
    trials, moved, best_moved = 400, 0, 0
    for _ in range(trials):
        history = _noise_history(generator, epochs, size, 0.8)
        error = binomial_error(history[-1]["top1"], size)
        moved += choose_epoch(history, "top1", error, "guarded", size)["kept_epoch"] != epochs
        best_moved += choose_epoch(history, "top1", error, "best", size)["kept_epoch"] != epochs
    assert moved / trials <= 0.05  # the family-wise error the margin is built for
    assert best_moved / trials >= 0.3  # what the plain best-epoch rule does with the same noise


def test_a_lead_well_beyond_the_noise_is_kept():
    size = 200
    error = binomial_error(80.0, size)  # 2.83 points
    history = [
        {"epoch": 1, "top1": 70.0},
        {"epoch": 2, "top1": 80.0 + 4 * math.sqrt(2) * error},
        {"epoch": 3, "top1": 80.0},
    ]
    verdict = choose_epoch(history, "top1", error, "guarded", size)
    assert verdict["kept_epoch"] == 2 and verdict["best_epoch"] == 2 and "beats the last" in verdict["reason"]
    assert verdict["margin"] == pytest.approx(margin(error, 3)) and verdict["standard_error"] == error


def test_margin_grows_with_the_epochs_compared_and_vanishes_for_one():
    assert margin(1.0, 1) == 0.0
    assert margin(1.0, 2) == pytest.approx(1.6449 * math.sqrt(2), rel=1e-3)  # one comparison at 5%
    assert margin(1.0, 2) < margin(1.0, 5) < margin(1.0, 20)


def test_rules_best_and_last_and_ties():
    history = [{"epoch": 1, "top1": 50.0}, {"epoch": 2, "top1": 60.0}, {"epoch": 3, "top1": 60.0}]
    assert choose_epoch(history, "top1", 0.0, "best", 10)["kept_epoch"] == 2  # the first of equal bests
    assert choose_epoch(history, "top1", 0.0, "last", 10)["kept_epoch"] == 3
    assert choose_epoch(history, "top1", 0.0, "guarded", 10)["kept_epoch"] == 3  # a tie is no lead
    with pytest.raises(UPopError, match="--selection must be one of guarded, best, last"):
        choose_epoch(history, "top1", 0.0, "newest", 10)


def test_standard_errors_of_the_tasks():
    assert binomial_error(50.0, 100) == pytest.approx(5.0)
    assert binomial_error(100.0, 100) == 0.0 and binomial_error(50.0, 0) == math.inf
    assert Classification().standard_error({"top1": 90.0}, 400) == pytest.approx(1.5)
    assert mean_error([1.0, 3.0]) == pytest.approx(1.0) and mean_error([1.0]) == math.inf


def test_cider_carries_its_own_standard_error():
    pytest.importorskip("pycocoevalcap")
    words = ["red circle", "blue square", "green triangle", "small star", "large cross", "yellow ring"]
    references = {i: [f"a {w} left of a {words[i - 1]}", f"a {w} near a {words[i - 1]}"] for i, w in enumerate(words)}
    candidates = {i: (references[i][0] if i % 2 else "a shape") for i in references}
    scores = caption_scores(references, candidates)
    from upop.tasks.caption import Caption

    assert scores["cider_se"] > 0
    assert Caption().standard_error(scores, 6) == scores["cider_se"]
