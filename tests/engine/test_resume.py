"""Fault tolerance end to end: a run SIGKILLed at a random step and resumed ends exactly like an uninterrupted one
(plan, weights, metrics and step log), on one process and on two ranks under torchrun with --max-restarts."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLI_DATA, assert_same_result, run_log
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("fault_worker.py")
# 15 steps per epoch per process (243 training scenes once the selection split is carved; batch 16 on one process,
# 8 per rank on two): 30 search steps, then 30 retraining steps; a checkpoint every 3 steps
ARGS = [
    "compress",
    *CLI_DATA,
    *"--epochs-search 2 --epochs 2 --checkpoint-every 3 --seed 3".split(),
]
STEPS = 60


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _single(out: Path, kill_at: int = 0, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKER), str(kill_at), "0", *ARGS, "--output-dir", str(out), *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _torchrun(out: Path, kill_at: int, kill_rank: int, restarts: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        str(WORKER),
        str(kill_at),
        str(kill_rank),
        *ARGS,
        "--batch-size",
        "8",
        "--output-dir",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = _single(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_result(uninterrupted, tmp_path):
    kill_at = random.randint(2, STEPS - 1)
    out = tmp_path / "run"
    killed = _single(out, kill_at)
    assert killed.returncode == -9, f"kill at step {kill_at}: {killed.stderr[-2000:]}"
    assert not (out / "report.json").exists()
    # the kill comes after step kill_at's optimizer step, before the step ends: the step-3 checkpoint exists from 4 on
    assert (out / "checkpoints").is_dir() == (kill_at > 3), f"kill at step {kill_at}"
    resumed = _single(out, 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # killed before the first checkpoint (at the end of step 3), --resume starts the run afresh
    assert ("resuming from" in resumed.stdout) == (kill_at > 3), f"kill at step {kill_at}"
    assert_same_result(uninterrupted, out)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [5, 40])  # during the search and during retraining
def test_kill_in_each_phase_then_resume(uninterrupted, tmp_path, kill_at):
    out = tmp_path / "run"
    assert _single(out, kill_at).returncode == -9
    assert _single(out, 0, "--resume").returncode == 0
    assert_same_result(uninterrupted, out)


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_needs_the_same_settings_and_a_finished_run_is_left_alone(uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert _single(out, 7).returncode == -9
    other = _single(out, 0, "--resume", "--p", "0.6")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"upop: error: the run in {out} was started with other settings: prune.p (saved 0.5, now 0.6)"
    ]
    plain = _single(out, 0)
    assert plain.returncode == 2 and "--resume to continue" in plain.stderr
    before = (uninterrupted / "model.safetensors").read_bytes()
    again = _single(uninterrupted, 0, "--resume")
    assert again.returncode == 0 and "already complete" in again.stdout
    assert (uninterrupted / "model.safetensors").read_bytes() == before


@pytest.mark.ddp
@pytest.mark.e2e
def test_two_ranks_elastic_restart_after_a_rank_is_killed(tmp_path):
    ref = tmp_path / "ref"
    result = _torchrun(ref, 0, 0, 0)
    assert result.returncode == 0, result.stderr[-3000:]
    kill_at = random.randint(2, STEPS - 1)
    out = tmp_path / "run"
    # rank 1 dies at kill_at; torchrun restarts both ranks with the same command, which resumes by itself
    result = _torchrun(out, kill_at, 1, 1, "--resume")
    assert result.returncode == 0, f"kill at step {kill_at}: {result.stderr[-3000:]}"
    # rank 1 dies inside step kill_at, so rank 0 cannot finish it either (the mask gradients are all-reduced)
    assert ("resuming from" in result.stdout) == (kill_at > 3), f"kill at step {kill_at}"
    assert_same_result(ref, out)


@pytest.mark.e2e
@pytest.mark.slow
def test_base_training_killed_and_resumed_gives_the_same_weights(tmp_path):
    train = ["train", *CLI_DATA, "--epochs", "2", "--checkpoint-every", "3"]

    def run(out: Path, kill_at: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(WORKER), str(kill_at), "0", *train, "--output-dir", str(out), *extra]
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "ref", 0).returncode == 0
    assert run(tmp_path / "run", 11).returncode == -9
    resumed = run(tmp_path / "run", 0, "--resume")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run_log(tmp_path / "ref") == run_log(tmp_path / "run")
