"""The loaders of a job: training shuffled by (seed, epoch) and sharded over ranks, able to start mid-epoch; the
selection and report splits sharded without padding, so metrics summed over ranks count every sample once.

Loading runs in ``workers`` processes beside each rank (``resolve_workers``). A training sample's random
augmentation draws from a seed made of (run seed, epoch, sample index) alone (``Keyed``), never from a worker's or
the main process's generator, so a run is bitwise the same with any number of workers, on any number of ranks, and
resumed mid-epoch."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` of a run seeded ``seed`` (63 bits, well mixed)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class Keyed(Dataset):
    """A training dataset read by (epoch, index) keys: item (e, i) is ``dataset[i]`` drawn with torch's CPU
    generator, Python's ``random`` and numpy's global generator seeded from ``sample_seed(seed, e, i)`` (timm's and
    torchvision's transforms draw from all three). The caller's generator states are restored afterwards, so reading
    a sample in the main process changes nothing else. Other attributes are the dataset's."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # not set yet (unpickling): no recursion; and no batched __getitems__ of the dataset, which reads plain indices
        if name in ("dataset", "seed") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
        try:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return self.dataset[index]
        finally:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class EpochSampler(DistributedSampler):
    """The training sampler on any number of ranks: the order is a function of (seed, epoch) alone, and an epoch can
    start at any position (``start``, in samples), which is how a resumed run continues mid-epoch without reading the
    batches it already trained on. It yields (epoch, index) keys for ``Keyed``."""

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int) -> None:
        super().__init__(dataset, info.world_size, info.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start :]])

    def __len__(self) -> int:
        return self.num_samples - self.start


@dataclass
class Loaders:
    """The loaders of one job: ``train`` (shuffled by seed and epoch, sharded over ranks; None for an evaluation),
    ``select`` (picks the best epoch; None: the last epoch is kept) and ``report`` (every reported number)."""

    train: DataLoader | None
    select: DataLoader | None
    report: DataLoader


def resolve_workers(workers: int | str, info: DistInfo) -> int:
    """Loader processes per rank: a count, or "auto": on a GPU the CPU cores this process may use, shared between
    the ranks of this node, less one for the rank itself; on the CPU none (the model's own threads use the cores,
    and workers would compete with them)."""
    if workers != "auto":
        return int(workers)
    if info.device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, per_rank - 1)


def parse_workers(text: str) -> int | str:
    """``--workers``: "auto" or a count >= 0."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"--workers takes auto or a number of processes >= 0, got {text!r}")
    return value


def make_loaders(splits: Splits, batch_size: int, info: DistInfo, seed: int, workers: int | str = 0) -> Loaders:
    """``batch_size`` is per rank. The training order depends only on ``seed`` and the epoch, and each training
    sample's augmentation only on (seed, epoch, index). ``workers`` loader processes per rank ("auto": see
    ``resolve_workers``); pinned memory on a GPU."""
    workers = resolve_workers(workers, info)
    pin = info.device.type == "cuda"
    parallel: dict[str, Any] = {"num_workers": workers, "pin_memory": pin}
    if workers:
        parallel["prefetch_factor"] = 4

    def evaluation(data: Dataset) -> DataLoader:
        collate = getattr(data, "collate", None)
        sampler = ShardSampler(len(data), info)
        return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate, **parallel)

    select = evaluation(splits.select) if splits.select is not None else None
    if splits.train is None:
        return Loaders(None, select, evaluation(splits.report))
    keyed = Keyed(splits.train, seed)
    sampler = EpochSampler(keyed, info, seed)
    # the loader's own generator: starting an epoch draws from it, not from the global RNG a resume restores
    train_loader = DataLoader(
        keyed,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=getattr(splits.train, "collate", None),  # a task's own batching (e.g. a variable answer count)
        persistent_workers=workers > 0,
        **parallel,
    )
    if len(train_loader) == 0:
        raise UPopError(
            f"the training set has {len(splits.train)} samples, fewer than one batch of {batch_size} per rank"
        )
    return Loaders(train_loader, select, evaluation(splits.report))
