"""Loading in worker processes: a training sample's augmentation depends on (seed, epoch, index) alone, so a run is
bitwise the same with 0 or 2 workers, on any number of ranks, and across a kill and resume with workers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_result
from PIL import Image

from upop.engine.loaders import EpochSampler, Keyed, make_loaders, resolve_workers
from upop.utils.dist import DistInfo

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
WORKER = Path(__file__).with_name("fault_worker.py")


def jpeg_folder(root: Path) -> Path:
    """An ImageNet-style folder of JPEGs of varied sizes: 2 classes, 24 training and 8 validation images."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n // 2):
                h, w = rng.integers(30, 50, 2)
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return root


def deit_argv(data: Path, out: Path, workers: int) -> list[str]:
    """A search and a retraining with the DeiT augmentation: RandAugment and the crop draw from Python's random,
    random erasing from torch, Mixup from numpy."""
    argv = f"compress --task classification --model vit-micro --data {data} --image-size 32 --batch-size 8"
    argv += f" --epochs-search 2 --epochs 2 --augment deit --select-size 0 --seed 5 --workers {workers}"
    return [*argv.split(), "--output-dir", str(out)]


class Noisy(torch.utils.data.Dataset):
    """Each item draws from all three generators a transform may use."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, torch.rand(()).item(), random.random(), np.random.rand()])


def test_a_sample_is_a_function_of_seed_epoch_and_index_and_leaves_the_caller_s_generators_alone():
    data = Keyed(Noisy(), seed=3)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = data[(1, 4)]
    assert torch.equal(first, data[(1, 4)]) and torch.equal(first, Keyed(Noisy(), seed=3)[(1, 4)])
    for other in (data[(2, 4)], data[(1, 5)], Keyed(Noisy(), seed=4)[(1, 4)]):
        assert (other[1:] != first[1:]).all()  # every generator is reseeded by each part of the key
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    assert len(data) == 10 and data.dataset.__class__ is Noisy


def test_two_ranks_read_the_samples_of_one_rank_with_the_same_keys():
    data = Keyed(Noisy(), seed=0)
    one = EpochSampler(data, CPU, seed=0)
    ranks = [EpochSampler(data, DistInfo(r, 2, r, torch.device("cpu")), seed=0) for r in (0, 1)]
    for s in (one, *ranks):
        s.set_position(3, 0)
    keys = list(one)
    assert all(k[0] == 3 for k in keys) and sorted(i for _, i in keys) == list(range(10))
    assert sorted(k for r in ranks for k in r) == sorted(keys)


def test_workers_auto_is_none_on_the_cpu_and_the_cores_less_one_per_rank_on_a_gpu(monkeypatch):
    assert resolve_workers("auto", CPU) == 0 and resolve_workers(3, CPU) == 3
    gpu = DistInfo(0, 2, 0, torch.device("cuda", 0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers("auto", gpu) == 7


def test_the_loaders_run_in_workers_with_the_training_samples_keyed():
    from upop.data.splits import Splits

    loaders = make_loaders(Splits(Noisy(), None, Noisy(), {}), 5, CPU, seed=0, workers=2)
    assert loaders.train.num_workers == 2 and loaders.train.persistent_workers
    assert loaders.report.num_workers == 2 and not loaders.train.pin_memory  # pinned on a GPU only
    loaders.train.sampler.set_position(0, 0)
    in_workers = torch.cat(list(loaders.train))
    alone = make_loaders(Splits(Noisy(), None, Noisy(), {}), 5, CPU, seed=0, workers=0)
    alone.train.sampler.set_position(0, 0)
    assert torch.equal(in_workers, torch.cat(list(alone.train)))


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_with_two_workers_and_one_killed_and_resumed_with_them_equal_a_run_without(tmp_path):
    data = jpeg_folder(tmp_path / "jpg")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: Path, workers: int, kill_at: int = 0, *extra: str) -> subprocess.CompletedProcess:
        argv = [*deit_argv(data, out, workers), "--checkpoint-every", "2", *extra]
        cmd = [sys.executable, str(WORKER), str(kill_at), "0", *argv]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    reference = tmp_path / "w0"
    assert run(reference, 0).returncode == 0
    assert run(tmp_path / "w2", 2).returncode == 0
    assert_same_result(reference, tmp_path / "w2")
    # killed during the search (3 steps per epoch: step 4 is in its second epoch), resumed, both with 2 workers
    out = tmp_path / "killed"
    assert run(out, 2, 4).returncode == -9
    resumed = run(out, 2, 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_result(reference, out)
