"""TensorBoard events of a run (every scalar of log.jsonl, the kept fractions per tower, the selection metrics per
epoch, the kept-width picture), and `upop report DIR --plot` (the search's progress from log.jsonl)."""

from __future__ import annotations

import json

import pytest

from upop.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ARGV = "compress --task retrieval --model clip-micro --train-size 32 --val-size 8 --batch-size 8 --select-size 8"
ARGV += " --epochs-search 1 --epochs 1"


def _events(directory) -> EventAccumulator:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_a_run_s_events_hold_its_log_the_towers_the_selection_and_the_kept_widths(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ARGV.split(), "--output-dir", str(out), "--log-dir", str(tmp_path / "tb")]) == 0
    events = _events(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    search = [r for r in log if r["phase"] == "search" and "pi" in r]
    assert search and {"search/pi", "search/task_loss", "search/lr", "search/kept_attn", "search/kept_mlp"} <= tags
    assert {"search/kept_by_tower/attn_vision", "search/kept_by_tower/mlp_text"} <= tags  # two towers
    pis = {e.step: e.value for e in events.Scalars("search/pi")}
    assert pis == pytest.approx({r["step"]: r["pi"] for r in search})
    selected = [r for r in log if "select" in r]
    assert {"retrain/select/r_mean", "retrain/select/i2t_r1"} <= tags
    assert [e.value for e in events.Scalars("retrain/select/r_mean")] == pytest.approx(
        [r["select"]["r_mean"] for r in selected if r["phase"] == "retrain"]
    )
    assert events.Tags()["images"] == ["kept widths"]
    # upop report prints the report and draws the search's progress beside kept.png
    assert main(["report", str(out), "--plot"]) == 0
    assert (out / "report.md").read_text().strip() in capsys.readouterr().out
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_events_go_to_the_run_s_tb_by_default_and_nowhere_with_none(tmp_path):
    assert main([*ARGV.split(), "--epochs", "0", "--output-dir", str(tmp_path / "a")]) == 0
    assert "search/pi" in _events(tmp_path / "a" / "tb").Tags()["scalars"]
    assert main([*ARGV.split(), "--epochs", "0", "--output-dir", str(tmp_path / "b"), "--log-dir", "none"]) == 0
    assert not (tmp_path / "b" / "tb").exists()


def test_report_of_a_directory_without_a_report_is_refused_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"upop: error: {tmp_path} holds no report.md: give a directory written by `upop compress` or `upop train`"
    ]
