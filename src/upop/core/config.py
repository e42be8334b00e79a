"""Configuration of a UPop search: a frozen, versioned dataclass validated on construction."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from upop.errors import UPopError

CONFIG_VERSION = 1
COST_MODELS = ("params", "flops", "latency", "paper")
ALLOCATIONS = ("unified", "tower", "uniform")
GRANULARITIES = ("dim", "head", "mixed")
SCORES = ("gradient", "snr", "fisher")
STANDARDISE = ("kind", "tower", "structure")
# UPop's ranking as published (read-only): PruneConfig(**PAPER_RANKING), `--paper-ranking`
PAPER_RANKING = MappingProxyType({"score": "gradient", "standardise": "kind", "floor": 0.0, "allocation": "unified"})
MIN_RERANKINGS = 10  # a search re-ranks at least this often (or at every step when it is shorter)
MAX_AUTO_INTERVAL = 50  # the paper's interval, for long searches


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how fast.

    Attributes:
        p: target fraction of the total prunable cost to remove, in (0, 1). 0.5 = "2x" on the prunable part.
        total_steps: T, the number of search steps (optimizer steps) over which pi(t) rises from 0 to p.
        interval: re-rank every ``interval`` steps (and always at the last step). "auto" (default):
            min(50, T // 10), at least 1, so every search re-ranks at least 10 times (every step when T < 20). An
            explicit interval that re-ranks fewer than min(10, T) times is refused: pi would jump to p in a few
            steps, which is one-shot pruning, not progressive.
        w_attn / w_mlp: weights of the L1 penalty on attention / MLP masks (the paper's w_sp_attn, w_sp_mlp). They are
            per rank: the mask gradients are averaged over ranks, so the same weights mean the same on any world size.
            They do not change which elements are chosen: the masks are not optimised, so the penalty adds the same
            constant w * sign(m) = w to the gradient of every mask element of a kind; the per-kind standardisation of
            the paper's score removes any constant, and the snr score is computed without it. They are kept for
            compatibility with the paper's scripts and show in the logged loss.
        cost: what an element's removal saves: "params" (default), "flops" (at the example input size given to the
            Pruner) or "latency": measured on the model's device, per structure shape, as a table of the time of a
            module shaped like the structure at kept widths (``upop.core.widths.latency_curves``), so the one ranking
            spends the budget where time goes (an element's saving depends on the width it leaves).
            "paper": the original code's constants, ``attn_cost`` per attention element (a head dim) and 1 per MLP
            neuron, whatever the structure's shape.
        attn_cost: for cost="paper", what one attention element costs against one MLP neuron: 36 in the original
            BLIP and CLIP scripts (12 heads x q, k, v), 9234/769 in its DeiT and Segmenter scripts (the parameters of
            a head dim and of a neuron of a width-384, 6-head block).
        latency_table: for cost="latency", a JSON table measured on the deploying machine (``upop latency-table``)
            to use instead of measuring here.
        exclude: module names (exact) or ``re:``-prefixed patterns; structures whose module name matches are not
            pruned and do not count in the budget.
        align_attn / align_mlp: keep a multiple of this many head dimensions / MLP neurons per structure. "auto"
            (default): the smallest alignment whose widths the model's device runs at full speed, measured when the
            Pruner is built (``upop.core.widths``): 8 on an H200 in bf16, where other widths run 2-5x slower than
            their share; typically 1 on a CPU. 1 is the paper's setting (element-wise).
        allocation: "tower" (default): one ranking over every structure of a tower (attention and MLP of every
            layer), each tower losing p of its own cost; "unified" (the paper's): one ranking over every structure of
            every tower, so the budget also moves between towers (the same as "tower" for a model of one tower);
            "uniform": the same fraction p removed from each structure separately, ranked within it (the
            hand-picked-ratio baseline UPop is compared with). On the built-in benchmarks the paper's cross-tower
            budget gave CLIP's text tower 33-43% of its widths at 2x against vision's 55-65%, and lost to "tower"
            there (How UPop compares, docs/comparison.md).
        towers: prune only the structures of these towers (e.g. ("vision",)); empty = every tower.
        granularity: what an attention element is: "dim" (default, the paper's: one head dimension, shared by all
            heads and by q, k, v) or "head" (a whole head: the compressed attention keeps head_dim and loses heads;
            its cost is its share of q/k/v/proj, ranked in the same list as MLP neurons) or "mixed": whole heads, then
            aligned head dims, in one search. Every (head, dim) pair carries a mask; a structure's removals form one
            chain, each step taking away the less important of its least important head (scored over the dims still
            kept) and its least important aligned block of dims (scored over the heads still kept, shared by them
            all), so the compressed attention is a standard one: fewer heads of a narrower, aligned head_dim. The
            chains' steps are ranked in the same list as MLP neurons. Not with cost "latency".
        score: what ranks an element (larger = less important): "gradient" (the paper's: its accumulated mask
            gradient); "fisher" (default): the root mean square over the search steps of the task-loss part of the
            mask's gradient, its empirical Fisher information (Molchanov et al. 2019's squared first-order Taylor
            score on gates): an element whose removal would move the loss little on every batch is less important;
            or "snr": the accumulated task-loss gradient over its standard error (a t-statistic). On the built-in 4x
            benchmark the paper's score starved layers to 1 of 32 head dims and varied by 1.8 points over seeds;
            fisher's ranking had settled (rank correlation 1.00 between the last two re-rankings, against 0.8) and
            its subnet scored 91% before retraining, against 25-67% (README, "How UPop compares"); snr did worse.
        standardise: the scores are standardised (one mean and std) per "kind" (the paper's: attention and MLP
            separately, over every structure of every tower), per kind and "tower", or per "structure".
        floor: the least a structure keeps, as a fraction of what uniform allocation keeps (1 - p): every structure
            keeps at least ceil(floor x (1 - p) x n) of its n elements (rounded up to its alignment), so a noisy
            ranking cannot starve a layer. Default 0.75 (over three seeds it beat 0.5 on the mean of the peer
            benchmark's tasks and budgets: docs/comparison.md); 0 = the paper's floor of one element. In [0, 1]; 1 is
            uniform allocation. ``PAPER_RANKING`` (``--paper-ranking``) holds the paper's four settings (score,
            standardise, floor, allocation).
        version: format version of this config, stored beside every output.
    """

    p: float = 0.5
    total_steps: int = 1000
    interval: int | str = "auto"
    w_attn: float = 4.8e-3
    w_mlp: float = 2e-4
    cost: str = "params"
    exclude: tuple[str, ...] = field(default_factory=tuple)
    align_attn: int | str = "auto"
    align_mlp: int | str = "auto"
    allocation: str = "tower"
    towers: tuple[str, ...] = field(default_factory=tuple)
    granularity: str = "dim"
    latency_table: str | None = None
    attn_cost: float | None = None
    score: str = "fisher"
    standardise: str = "kind"
    floor: float = 0.75
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if not (isinstance(self.p, (int, float)) and 0.0 < float(self.p) < 1.0):
            raise UPopError(
                f"p must be a number strictly between 0 and 1 (the fraction of cost to remove), got {self.p!r}"
            )
        if not (isinstance(self.total_steps, int) and self.total_steps >= 1):
            raise UPopError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        if self.interval != "auto":
            if isinstance(self.interval, bool) or not (isinstance(self.interval, int) and self.interval >= 1):
                raise UPopError(f"interval must be a positive integer or 'auto', got {self.interval!r}")
        for name in ("w_attn", "w_mlp"):
            if getattr(self, name) < 0:
                raise UPopError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("align_attn", "align_mlp"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not (isinstance(value, int) and value >= 1)):
                raise UPopError(f"{name} must be a positive integer or 'auto', got {value!r}")
        if self.cost not in COST_MODELS:
            raise UPopError(f"cost must be one of {', '.join(COST_MODELS)}, got {self.cost!r}")
        if self.granularity not in GRANULARITIES:
            raise UPopError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity == "mixed" and self.cost == "latency":
            raise UPopError(
                'granularity "mixed" ranks heads and head dims together, which one latency curve per '
                'structure cannot price; use cost "params" or "flops" with it, or granularity "dim"/"head"'
            )
        if self.cost == "paper":
            if self.granularity != "dim" or not (isinstance(self.attn_cost, (int, float)) and self.attn_cost > 0):
                raise UPopError(
                    'cost "paper" prices head dims and neurons with the original constants: it needs granularity '
                    f'"dim" and a positive attn_cost (36 for BLIP/CLIP, 9234/769 for DeiT/Segmenter); got granularity '
                    f"{self.granularity!r}, attn_cost {self.attn_cost!r}"
                )
        elif self.attn_cost is not None:
            raise UPopError(f'attn_cost prices elements only with cost "paper", not with cost {self.cost!r}')
        if self.score not in SCORES:
            raise UPopError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.standardise not in STANDARDISE:
            raise UPopError(f"standardise must be one of {', '.join(STANDARDISE)}, got {self.standardise!r}")
        if isinstance(self.floor, bool) or not (isinstance(self.floor, (int, float)) and 0.0 <= self.floor <= 1.0):
            raise UPopError(
                f"floor must be a number in [0, 1] (a fraction of the uniform share 1 - p), got {self.floor!r}"
            )
        if self.allocation not in ALLOCATIONS:
            raise UPopError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "towers", tuple(self.towers))
        for pattern in self.exclude:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise UPopError(f"exclude pattern {pattern!r} is not a valid regular expression: {e}") from None
        if self.version != CONFIG_VERSION:
            raise UPopError(f"PruneConfig version {self.version} is not supported (this UPop reads {CONFIG_VERSION})")

    def check_schedule(self) -> None:
        """Refuse an explicit interval that re-ranks fewer than min(10, T) times over ``total_steps`` (checked by the
        Pruner and by the compress job, once T is known)."""
        needed = min(MIN_RERANKINGS, self.total_steps)
        if self.rerankings() < needed:
            raise UPopError(
                f"the search has T = {self.total_steps} steps; re-ranking every {self.interval} steps ranks only "
                f"{self.rerankings()} time(s), so pi would jump towards p in one shot; use an interval of at most "
                f"{max(1, self.total_steps // needed)} or 'auto' (at least {needed} re-rankings)"
            )

    def rank_interval(self) -> int:
        """The interval in steps between re-rankings ("auto" resolved for ``total_steps``)."""
        if self.interval == "auto":
            return max(1, min(MAX_AUTO_INTERVAL, self.total_steps // MIN_RERANKINGS))
        return int(self.interval)

    def rank_steps(self) -> list[int]:
        """The steps t in 1..T at which the Pruner re-ranks: every ``rank_interval()`` steps and the last."""
        every = self.rank_interval()
        steps = list(range(every, self.total_steps + 1, every))
        return steps if steps and steps[-1] == self.total_steps else [*steps, self.total_steps]

    def rerankings(self) -> int:
        every = self.rank_interval()
        return self.total_steps // every + (1 if self.total_steps % every else 0)

    def excludes(self, name: str) -> bool:
        """Whether the structure at module ``name`` is excluded from pruning."""
        for pattern in self.exclude:
            if pattern.startswith("re:"):
                if re.search(pattern[3:], name):
                    return True
            elif pattern == name:
                return True
        return False

    def searches(self, structure: Any) -> bool:
        """Whether the search ranks ``structure`` (a ``Structure``): not excluded, and in ``towers`` when given."""
        return not self.excludes(structure.name) and (not self.towers or structure.tower in self.towers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        d["towers"] = list(self.towers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        """Build from ``to_dict`` output; unknown keys (from newer versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for key in ("exclude", "towers"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)
