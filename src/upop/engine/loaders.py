"""The loaders of a job: training shuffled by (seed, epoch) and sharded over ranks, able to start mid-epoch; the
selection and report splits sharded without padding, so metrics summed over ranks count every sample once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from upop.data.splits import Splits
from upop.errors import UPopError
from upop.utils.dist import DistInfo


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r + W, ... with no padding, so metrics summed over ranks count
    every sample exactly once."""

    def __init__(self, n: int, info: DistInfo) -> None:
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class EpochSampler(DistributedSampler):
    """The training sampler on any number of ranks: the order is a function of (seed, epoch) alone, and an epoch can
    start at any position (``start``, in samples), which is how a resumed run continues mid-epoch without reading the
    batches it already trained on."""

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int) -> None:
        super().__init__(dataset, info.world_size, info.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


@dataclass
class Loaders:
    """The loaders of one job: ``train`` (shuffled by seed and epoch, sharded over ranks; None for an evaluation),
    ``select`` (picks the best epoch; None: the last epoch is kept) and ``report`` (every reported number)."""

    train: DataLoader | None
    select: DataLoader | None
    report: DataLoader


def make_loaders(splits: Splits, batch_size: int, info: DistInfo, seed: int) -> Loaders:
    """``batch_size`` is per rank. The training order depends only on ``seed`` and the epoch."""

    def evaluation(data: Dataset) -> DataLoader:
        collate = getattr(data, "collate", None)
        return DataLoader(data, batch_size=batch_size, sampler=ShardSampler(len(data), info), collate_fn=collate)

    select = evaluation(splits.select) if splits.select is not None else None
    if splits.train is None:
        return Loaders(None, select, evaluation(splits.report))
    sampler = EpochSampler(splits.train, info, seed)
    # the loader's own generator: starting an epoch draws from it, not from the global RNG a resume restores
    train_loader = DataLoader(
        splits.train,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=getattr(splits.train, "collate", None),  # a task's own batching (e.g. a variable answer count)
    )
    if len(train_loader) == 0:
        raise UPopError(
            f"the training set has {len(splits.train)} samples, fewer than one batch of {batch_size} per rank"
        )
    return Loaders(train_loader, select, evaluation(splits.report))
