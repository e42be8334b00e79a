"""Invariant 4 under a real 2-process gloo DDP run (torchrun): every rank holds identical masks after every update."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLI_DATA, compress_argv

WORKER = Path(__file__).with_name("ddp_search_worker.py")


def _torchrun(args, tmp_path, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.ddp
@pytest.mark.e2e
def test_two_rank_search_takes_identical_decisions(tmp_path):
    result = _torchrun([str(WORKER), str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["masks"].shape[0] >= 4  # several rankings happened
    assert torch.equal(r0["masks"], r1["masks"])
    assert torch.equal(r0["importance"], r1["importance"])  # the averaged gradients themselves agree
    assert all(torch.equal(a, b) for a, b in zip(r0["kept"], r1["kept"]))
    assert torch.equal(r0["weights"], r1["weights"])
    assert set(r0["masks"][-1].unique().tolist()) == {0.0, 1.0}


@pytest.mark.ddp
@pytest.mark.e2e
def test_cli_compress_runs_under_torchrun(tmp_path):
    base = tmp_path / "base"
    argv = ["train", *CLI_DATA, "--batch-size", "16", "--epochs", "1", "--output-dir", str(base)]
    result = _torchrun(["-m", "upop.cli", *argv], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    argv = compress_argv(base / "model.safetensors", out, "--batch-size", "16")
    result = _torchrun(["-m", "upop.cli", *argv], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "plan.json").is_file() and (out / "model.safetensors").is_file()
    assert "pruned share of prunable cost" in result.stdout


@pytest.mark.ddp
@pytest.mark.e2e
def test_importance_does_not_depend_on_the_number_of_ranks(tmp_path):
    result = _torchrun([str(WORKER), str(tmp_path), "importance"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), "importance"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    two = torch.load(tmp_path / "importance2_0.pt", weights_only=True)["importance"]
    one = torch.load(tmp_path / "importance1_0.pt", weights_only=True)["importance"]
    assert two.abs().sum() > 0
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)


@pytest.mark.ddp
@pytest.mark.e2e
def test_cli_retrieval_compress_runs_under_torchrun(tmp_path):
    out = tmp_path / "clip"
    argv = [
        "compress",
        *"--task retrieval --model clip-micro --train-size 128 --val-size 32 --batch-size 16".split(),
        *"--epochs-search 1 --epochs 1".split(),
        "--output-dir",
        str(out),
    ]
    result = _torchrun(["-m", "upop.cli", *argv], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "plan.json").is_file() and (out / "kept.png").is_file()
    assert "kept text attention dims" in result.stdout
