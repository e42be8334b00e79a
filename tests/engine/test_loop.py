"""The loop's recipe and its behaviour in a job log: the search LR is constant by default (the reference's) and
cosine on request, distillation from the dense model, progress lines when stderr is not a terminal, and a log that
cannot be appended stops the run with one line and no partial line."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from helpers import CLI_DATA

from upop.cli import main
from upop.engine import logs
from upop.tasks.base import kl_distill

COMPRESS = ["compress", *CLI_DATA, "--epochs-search", "1", "--epochs", "1"]


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["default", "cosine"])
def test_the_search_lr_is_constant_by_default_and_cosine_on_request(tmp_path, schedule):
    out = tmp_path / schedule
    extra = [] if schedule == "default" else ["--lr-schedule-search", "cosine"]
    assert main([*COMPRESS, *extra, "--output-dir", str(out)]) == 0
    lrs = [r["lr"] for r in _log(out) if r["phase"] == "search" and "lr" in r]
    retrain = [r["lr"] for r in _log(out) if r["phase"] == "retrain" and "lr" in r]
    assert len(lrs) >= 2 and retrain[-1] < 5e-4  # retraining always decays
    if schedule == "default":
        assert lrs == [5e-4] * len(lrs)
    else:
        assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_kl_distillation_is_zero_for_the_teacher_itself_and_scaled_by_t_squared():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    assert float(kl_distill(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(teacher / 2, 1)
    by_hand = (p * (torch.log_softmax(teacher / 2, 1) - torch.log_softmax(student / 2, 1))).sum(1).mean() * 4
    torch.testing.assert_close(kl_distill(student, teacher, 2.0), by_hand)


@pytest.mark.e2e
def test_distillation_enters_the_retraining_loss_only(tmp_path):
    out = tmp_path / "kd"
    argv = [*COMPRESS, "--distill", "--distill-weight", "0.7", "--distill-temperature", "3", "--output-dir", str(out)]
    assert main(argv) == 0
    records = _log(out)
    retrain = [r for r in records if r["phase"] == "retrain" and "loss" in r]
    assert retrain and all("distill_loss" in r for r in retrain)
    assert not any("distill_loss" in r for r in records if r["phase"] == "search")
    r = retrain[-1]
    assert r["loss"] == pytest.approx(0.3 * r["task_loss"] + 0.7 * r["distill_loss"] + r["sparsity_loss"], rel=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["distill"] == 0.7 and report["recipe"]["temperature"] == 3.0
    assert "distillation from the dense model (weight 0.7, temperature 3.0)" in (out / "report.md").read_text()


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UPOP_PROGRESS_SECONDS", "0")
    assert main([*COMPRESS, "--output-dir", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "upop: search: T = 15 steps, re-ranking every 1 step(s), 15 times" in text
    assert "upop: search epoch 1/1 step 1/15 loss " in text and " pi 0.052 " in text
    assert "left in the epoch" in text and "upop: retrain epoch 1/1 step 15/15" in text


def test_a_full_disk_while_appending_to_the_log_is_one_line_and_no_partial_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    writes = 0
    real_open = open

    class FillingFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # half a line reaches the disk, then it is full
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    def filling_open(path, mode="r", *args, **kwargs):
        nonlocal writes
        if str(path).endswith("log.jsonl") and "a" in mode:
            writes += 1
            if writes > 2:
                return FillingFile(real_open(path, mode, *args, **kwargs))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(logs, "open", filling_open, raising=False)
    assert main([*COMPRESS, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"upop: error: cannot append to {out / 'log.jsonl'}")
    assert "No space left on device" in err[0] and "--resume" in err[0]
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)  # whole lines only
    assert not (out / "report.json").exists()
