"""The three splits of a task: ``train`` (the weights learn from it), ``select`` (picks the best epoch and is never
reported) and ``report`` (every number in a report). A model is never selected and scored on the same split, unless
the paper's protocol is asked for (``select_on`` "report"), which every report then says. A selection split carved
from train is stratified and seeded, so it is the same on any machine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from upop.data.config import PAPER_PROTOCOL

SELECT_FRACTION, SELECT_MAX = 0.05, 10000  # the default selection split carved from train
ROLES = ("train", "select", "report")  # every split a training job needs; an evaluation needs only "report"


@dataclass
class Splits:
    """The three splits of a task, and how each was made (recorded in every report).

    ``select`` is None when there is no selection split (``select_size`` 0): the last epoch is then kept; ``train``
    and ``select`` are None when only the report split was asked for (an evaluation needs no training data).
    ``about`` maps each split name to a description: its source, size and, for a carved split, the seed and a
    digest of its indices."""

    train: Dataset | None
    select: Dataset | None
    report: Dataset
    about: dict[str, dict[str, Any]] = field(default_factory=dict)

    def selecting_on_report(self) -> Splits:
        """The paper's protocol: the report split also picks the best epoch (said in ``about``)."""
        about = dict(self.about)
        report = about.get("report", {})
        about["select"] = {**report, "source": f"{report.get('source', 'the report split')} ({PAPER_PROTOCOL})"}
        about["select"].pop("seed", None)
        view = Carved(self.report, list(range(len(self.report))))  # the same samples, not the report split itself
        return Splits(self.train, view, self.report, about)


class Carved(Subset):
    """A subset that keeps the attributes tasks read from their datasets (``classes``, ``captions``...)."""

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def carve(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices 0..len(labels)-1 into (kept, carved) with ``size`` carved, stratified by label: every class gives
    its share (largest remainders first), drawn by a generator seeded with ``seed``. Deterministic on any machine."""
    labels = torch.as_tensor(labels).reshape(-1)
    n = labels.numel()
    size = min(size, n - 1)
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * size / n
    share = exact.floor().long()
    short = size - int(share.sum())
    if short > 0:  # largest remainders, ties broken by class order
        order = torch.sort(exact - share, descending=True, stable=True).indices
        share[order[:short]] += 1
    carved = []
    for c, k in zip(classes.tolist(), share.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        carved.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    picked = torch.sort(torch.cat(carved)).values if carved else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[picked] = False
    return mask.nonzero().squeeze(1), picked


def default_select_size(n_train: int) -> int:
    return max(1, min(SELECT_MAX, round(SELECT_FRACTION * n_train)))


def carved_about(picked: torch.Tensor, source: str, seed: int) -> dict[str, Any]:
    digest = hashlib.sha256(picked.numpy().astype("int64").tobytes()).hexdigest()[:16]
    return {
        "source": f"carved from {source}, stratified by class",
        "size": int(picked.numel()),
        "seed": seed,
        "indices_sha256": digest,
    }


def builtin_roles(data: Any, roles: tuple[str, ...] = ROLES) -> list[tuple[str, int, int]]:
    """(split, scenes, seed) of the built-in world's splits asked for in ``roles``: train (``data.seed``), select
    (``seed + 2``; as many scenes as the report split unless ``select_size`` says, none for 0) and report
    (``seed + 1``)."""
    select = data.val_size if data.select_size is None else data.select_size
    every = (
        ("train", data.train_size, data.seed),
        ("select", select, data.seed + 2),
        ("report", data.val_size, data.seed + 1),
    )
    return [(name, size, seed) for name, size, seed in every if name in roles and size]
