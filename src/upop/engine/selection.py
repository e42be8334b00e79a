"""Which epoch a phase keeps: a rule that a small selection split's noise cannot fool.

Every epoch is scored on the selection split. On a split of n samples a score has a standard error (for a
percentage, the binomial sqrt(m (100 - m) / n): 3.5 points at 50% on 200 samples), and the best of E noisy scores
beats the last one by chance far more often than not. The rules:

- "guarded" (default): keep the best epoch only when it beats the last one by more than the margin a chance win
  stays under: z x sqrt(2) x SE, z the one-sided normal quantile of 0.05 / (E - 1) (Bonferroni over the E - 1 epochs
  compared with the last; sqrt(2): the difference of two scores). Otherwise keep the last epoch.
- "best": the epoch best on the selection split, however small the difference (the paper's scripts).
- "last": the last epoch.

Without a selection split the last epoch is kept.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

from upop.errors import UPopError

SELECTION_RULES = ("guarded", "best", "last")
FAMILY_ERROR = 0.05  # the chance that pure noise moves the kept epoch away from the last, over all the comparisons


def margin(standard_error: float, epochs: int) -> float:
    """How much the best of ``epochs`` scores must beat the last one by before the "guarded" rule believes it."""
    if epochs < 2:
        return 0.0
    z = NormalDist().inv_cdf(1.0 - FAMILY_ERROR / (epochs - 1))
    return z * math.sqrt(2.0) * standard_error


def check_rule(rule: str) -> str:
    if rule not in SELECTION_RULES:
        raise UPopError(f"--selection must be one of {', '.join(SELECTION_RULES)}, got {rule!r}")
    return rule


def choose_epoch(history: list[dict[str, Any]], metric: str, standard_error: float, rule: str, size: int) -> dict:
    """The epoch to keep from ``history`` (per epoch {"epoch", metric, ...}, in order) under ``rule``, and why:
    {"rule", "kept_epoch", "best_epoch", "last_epoch", "best", "last", "standard_error", "margin", "size",
    "reason"}. ``standard_error`` is the selection split's for the last epoch's score; ``size`` its samples."""
    check_rule(rule)
    last = history[-1]
    best = max(history, key=lambda h: h[metric])  # the first of equal bests
    need = margin(standard_error, len(history)) if rule == "guarded" else 0.0
    gain = best[metric] - last[metric]
    if rule == "last" or best["epoch"] == last["epoch"]:
        kept, reason = last, "the last epoch" if rule == "last" else "the last epoch is the best"
    elif rule == "best":
        kept, reason = best, "the best on the selection split"
    elif gain > need:
        kept, reason = best, f"it beats the last epoch by {gain:.2f} > the noise margin {need:.2f}"
    else:
        kept, reason = last, f"the best beats it by {gain:.2f}, within the noise margin {need:.2f}"
    return {
        "rule": rule,
        "kept_epoch": kept["epoch"],
        "best_epoch": best["epoch"],
        "last_epoch": last["epoch"],
        "best": best[metric],
        "last": last[metric],
        "standard_error": standard_error,
        "margin": need,
        "size": size,
        "reason": reason,
    }
