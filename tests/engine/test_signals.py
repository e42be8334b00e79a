"""SIGTERM (what schedulers send before they kill) and SIGINT (Ctrl-C): the run finishes its step, writes a
checkpoint, prints one line saying how to resume and exits 143 / 130; resuming gives the uninterrupted result."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from test_resume import ARGS, STEPS, WORKER, _env, assert_same_result, uninterrupted  # noqa: F401  (fixture)


def _signalled(out, at: int, name: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKER), str(at), "0", *ARGS, "--output-dir", str(out)]
    env = {**_env(), "UPOP_TEST_SIGNAL": name}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, code, at",
    [("TERM", 143, None), ("TERM", 143, STEPS // 2), ("INT", 130, None)],  # None: a random step
    ids=["TERM-random-step", "TERM-last-search-step", "INT-random-step"],
)
def test_a_signal_checkpoints_and_resume_gives_the_uninterrupted_result(uninterrupted, tmp_path, name, code, at):  # noqa: F811
    at = at or random.randint(1, STEPS - 1)
    out = tmp_path / "run"
    stopped = _signalled(out, at, name)
    assert stopped.returncode == code, f"signal at step {at}: {stopped.stderr[-2000:]}"
    err = stopped.stderr.strip().splitlines()
    assert len(err) == 1, stopped.stderr
    phase, step = ("search", at) if at <= STEPS // 2 else ("retrain", at - STEPS // 2)
    assert err[0].startswith(f"upop: stopped by SIG{name} at {phase} step {step}: checkpoint {out / 'checkpoints'}")
    assert err[0].endswith("rerun the same command with --resume to continue")
    names = os.listdir(out / "checkpoints")
    assert not [n for n in names if n.startswith(".tmp")] and not (out / ".upop.lock").exists()
    assert f"-{phase}-{step:09d}" in " ".join(names)  # the step it stopped at
    resumed = subprocess.run(
        [sys.executable, str(WORKER), "0", "0", *ARGS, "--output-dir", str(out), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_result(uninterrupted, out)
