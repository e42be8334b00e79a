"""One run per output directory: a second run into a directory another run is writing (with --resume or
--overwrite) is refused with one line naming the other run, and a lock left by a dead run is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import CLI_DATA

from upop.cli import main
from upop.engine.lock import LOCK_FILE, DirLock
from upop.errors import UPopError

HOLD = textwrap.dedent(
    """
    import sys, time
    from upop.engine.lock import DirLock
    DirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_held_lock_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UPopError, match=rf"another upop run \(pid {holder.pid} on "):
            DirLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up, the lock file stays
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()
    lock = DirLock(tmp_path)
    lock.acquire()  # the kernel released the dead process's flock: stale, taken over
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_second_run_into_a_running_runs_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *CLI_DATA, "--epochs", "2", "--output-dir", str(out)]
    first = subprocess.Popen(
        [sys.executable, "-m", "upop.cli", *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, lock taken
        for extra in (["--resume"], ["--overwrite"]):
            assert main([*argv, *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0].startswith(f"upop: error: another upop run (pid {first.pid} on ")
            assert "wait for it to finish or choose another --output-dir" in err[0]
        assert (out / "config.json").exists()  # --overwrite did not clear the running run's files
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r["step"], "select" in r) for r in records]
    assert records and len(keys) == len(set(keys))  # every step logged once: one run wrote
    assert not (out / LOCK_FILE).exists()  # a finished run leaves no lock
