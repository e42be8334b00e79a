"""What a job reports, as versioned dataclasses read by attribute. ``report.json`` holds ``to_dict()`` with its
``schema_version``; ``from_dict`` reads this version and the unversioned reports written before it (the same keys),
and ignores keys a newer version added."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from upop.errors import UPopError

SCHEMA_VERSION = 1
R = TypeVar("R", bound="Report")


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


class Record:
    """A dataclass read from a dict that may hold keys of a newer version (ignored)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        return cls(**_known(cls, d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass
class Measurement(Record):
    """A model measured on the report split: metrics (percent where that is the convention), parameters, FLOPs per
    sample and latency at the latency batch; ``epoch``: the retraining epoch it is of (a compressed model's)."""

    metrics: dict[str, float]
    params: int
    flops: int
    latency_ms: float
    epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.epoch is None:
            d.pop("epoch")
        return d


@dataclass
class Speed(Record):
    """The compressed model against the dense one on the run's device, called back to back: median of ``pairs``
    per-call ratios at ``batch``."""

    dense_ms: float
    compressed_ms: float
    speedup: float
    pairs: int
    batch: int
    device: str


@dataclass
class LastEpoch(Record):
    """Report-split metrics of the last retraining epoch (``metrics`` None when there was no retraining)."""

    metrics: dict[str, float] | None
    epoch: int


@dataclass
class Report:
    """What produced a job's numbers: task, model, data, splits, selection, seed, loop settings, machine, versions."""

    task: str
    model: str
    data: dict[str, Any]
    splits: dict[str, Any]
    selection: dict[str, Any]
    seed: int
    batch_size: int
    amp: bool
    device: str
    world_size: int
    upop_version: str
    torch_version: str
    date: str
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Record) else value
        return out

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        version = d.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UPopError(f"report schema version {version!r} is newer than this UPop reads ({SCHEMA_VERSION})")
        values = _known(cls, d)
        values["schema_version"] = SCHEMA_VERSION
        for f in dataclasses.fields(cls):
            kind = _NESTED.get(f.name)
            if kind is not None and isinstance(values.get(f.name), dict):
                values[f.name] = kind.from_dict(values[f.name])
        try:
            return cls(**values)
        except TypeError as e:
            raise UPopError(f"not a {cls.__name__} ({e})") from None

    @classmethod
    def read(cls: type[R], directory: str | os.PathLike) -> R:
        """The report.json of a finished job's directory."""
        path = Path(directory) / "report.json"
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UPopError(f"cannot read {path}: {e}") from None


@dataclass(kw_only=True)
class TrainReport(Report):
    """A dense base model's training: report-split metrics of the selected and of the last epoch."""

    epochs: int
    lr: float
    metrics: dict[str, float]
    selected_epoch: int
    metrics_last: dict[str, float] | None
    history: list[dict[str, Any]]
    nonfinite_steps: dict[str, int]


@dataclass(kw_only=True)
class CompressReport(Report):
    """A compress job: the search's settings and outcome, the dense and the compressed model measured on the report
    split, the speed-up on the run's device, and what was kept per structure and tower."""

    p: float
    cost: str
    allocation: str
    granularity: str
    prune: dict[str, Any]
    recipe: dict[str, Any]
    given_plan: bool
    rerankings: int | None
    alignment: dict[str, Any] | None
    latency_cost: dict[str, float] | None
    stability: dict[str, Any] | None
    latency_batch: int
    speed: Speed
    slower_than_dense: bool
    dense: Measurement
    compressed: Measurement
    compressed_last: LastEpoch
    retrain_history: list[dict[str, Any]]
    searched_metrics: dict[str, float] | None
    kept: dict[str, float]
    pruned_cost_fraction: float
    nonfinite_search_steps: int
    nonfinite_steps: dict[str, int]
    per_structure: list[dict[str, Any]] = field(default_factory=list)
    kept_by_tower: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Evaluation(Record):
    """``upop evaluate``: a model measured on the report split (``split`` says which data that was)."""

    metrics: dict[str, float]
    params: int
    flops: int
    latency_ms: float
    split: dict[str, Any]
    pretrained: dict[str, Any] | None = None  # a --pretrained checkpoint: compressed or not, the widths read from it


_NESTED: dict[str, type[Record]] = {
    "speed": Speed,
    "dense": Measurement,
    "compressed": Measurement,
    "compressed_last": LastEpoch,
}
