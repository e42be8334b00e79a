"""How settled a search's ranking ended: one record per re-ranking (how much the decision moved since the previous
one), and the summary a report prints with the warnings it calls for."""

from __future__ import annotations

from typing import Any

import torch

from upop.core.config import PruneConfig
from upop.core.structure import Structure

STARVED_SHARE = 0.25  # a structure keeping under this fraction of the uniform share 1 - p is reported as starved
SETTLED = 0.9  # the ranking had settled when the last two re-rankings agree this much (overlap and rank correlation)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors (ties broken by position)."""
    ra = torch.argsort(torch.argsort(a, stable=True)).double()
    rb = torch.argsort(torch.argsort(b, stable=True)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else 1.0


class Stability:
    """The re-rankings of one search: ``records`` (step, pi, chosen count, and from the second on the share of the
    previously chosen elements still chosen and the scores' rank correlation)."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.last_scores: torch.Tensor | None = None

    def record(self, step: int, pi: float, scores: torch.Tensor, before: torch.Tensor, chosen: torch.Tensor) -> None:
        """A re-ranking at ``step``: flat ``scores`` and the choice ``chosen``, ``before`` the previous choice."""
        entry = {"step": step, "pi": pi, "chosen": int(chosen.sum())}
        if self.last_scores is not None:
            entry["overlap"] = float((before & chosen).sum()) / max(1, int(before.sum())) if before.any() else 1.0
            entry["rank_correlation"] = rank_correlation(self.last_scores, scores)
        self.last_scores = scores
        self.records.append(entry)

    def summary(
        self, structures: list[Structure], chosen: list[torch.Tensor], config: PruneConfig, floor: float
    ) -> dict[str, Any]:
        """The final ranking's stability: the overlap of the chosen sets and the rank correlation of the scores at
        the last two re-rankings, the smallest kept fraction of any structure, and the warnings they call for
        (``floor``: the floor the ranking used, lower than the configured one when p needed it)."""
        last = self.records[-1] if self.records else {}
        kept = [(1.0 - float(c.sum()) / c.numel(), s.name) for c, s in zip(chosen, structures)]
        smallest, where = min(kept)
        overlap, correlation = last.get("overlap"), last.get("rank_correlation")
        return {
            "overlap": overlap,
            "rank_correlation": correlation,
            "min_kept_fraction": smallest,
            "min_kept_structure": where,
            "floor": floor,
            "rerankings": [dict(r) for r in self.records],
            "warnings": self._warnings(config, floor, smallest, where),
        }

    def _warnings(self, config: PruneConfig, floor: float, smallest: float, where: str) -> list[str]:
        last = self.records[-1] if self.records else {}
        warn_below = max(floor, STARVED_SHARE) * (1.0 - config.p)
        warnings = []
        if floor < config.floor:
            warnings.append(
                f"the floor was lowered from {config.floor:g} to {floor:.3g} of the uniform share: with "
                f"{config.cost} costs the configured floors left less than p = {config.p:g} to remove"
            )
        if config.allocation != "uniform" and smallest < warn_below - 1e-9:
            warnings.append(
                f"{where} keeps {smallest:.1%} of its elements, under {warn_below:.1%} ({STARVED_SHARE:g} of the "
                f"uniform share 1 - p): a noisy ranking may have starved it; consider --floor or a longer search"
            )
        overlap, correlation = last.get("overlap"), last.get("rank_correlation")
        if overlap is not None and (overlap < SETTLED or correlation < SETTLED):
            warnings.append(
                f"the ranking was still changing at the end of the search: between steps {self.records[-2]['step']} "
                f"and {last['step']} {overlap:.1%} of the chosen elements stayed chosen and the scores' rank "
                f"correlation was {correlation:.2f} (settled: both >= {SETTLED:g}); a longer search (--epochs-search) "
                "or --score snr ranks more reliably"
            )
        return warnings

    def state_dict(self) -> dict[str, Any]:
        return {
            "stability": [dict(r) for r in self.records],
            "last_scores": self.last_scores.clone() if self.last_scores is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stability" in state:
            self.records = [dict(r) for r in state["stability"]]
            self.last_scores = state["last_scores"].clone() if state["last_scores"] is not None else None
