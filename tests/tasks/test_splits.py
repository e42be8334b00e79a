"""The split that selects is never the split that is reported: the selection split is carved from train
(deterministic, stratified, disjoint, recorded), keep-best chooses by it, and every reported number comes from the
report split, the last epoch's as well as the selected one's."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLI_DATA, compress_argv

from upop.cli import main
from upop.data.config import DataConfig
from upop.data.splits import carve
from upop.tasks import get_task
from upop.tasks.classification import Classification


def test_carve_is_stratified_disjoint_and_deterministic():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    kept, picked = carve(labels, 10, seed=3)
    assert len(picked) == 10 and len(kept) == 90
    assert not set(kept.tolist()) & set(picked.tolist())
    assert sorted(kept.tolist() + picked.tolist()) == list(range(100))
    assert [int((labels[picked] == c).sum()) for c in range(3)] == [5, 3, 2]  # each class gives its share
    again = carve(labels, 10, seed=3)[1]
    assert torch.equal(picked, again)
    assert not torch.equal(picked, carve(labels, 10, seed=4)[1])


def test_builtin_classification_splits_and_their_record():
    splits = get_task("classification").datasets(DataConfig(image_size=16, train_size=400, val_size=50))
    assert len(splits.train) + len(splits.select) == 400 and len(splits.select) == 20  # 5% of train
    assert len(splits.report) == 50
    train_idx, select_idx = set(splits.train.indices), set(splits.select.indices)
    assert not train_idx & select_idx
    assert splits.about["select"]["size"] == 20 and len(splits.about["select"]["indices_sha256"]) == 16
    assert splits.about["report"]["source"] == "built-in val scenes (seed 1)"
    none = get_task("classification").datasets(DataConfig(image_size=16, train_size=400, val_size=50, select_size=0))
    assert none.select is None and len(none.train) == 400


@pytest.mark.e2e
@pytest.mark.parametrize("gap", [10.0, 70.0])
def test_keep_best_chooses_on_the_select_split_and_reports_the_report_split(tmp_path, capsys, monkeypatch, gap):
    """Scripted metrics: the select split peaks at epoch 2, the report split would have preferred epoch 3. On 13
    selection samples a 10-point lead is noise (the guarded default keeps the last epoch; ``--selection best``
    takes it), a 70-point lead is not."""
    rule = ["--selection", "best"] if gap == 10.0 else []  # the paper's rule: the best, whatever the lead
    select_script, report_script = [10.0, 20.0 + gap, 20.0], [50.0, 40.0]
    seen: list[str] = []
    real = Classification.evaluate

    def scripted(self, model, loader, device):
        split = "select" if len(loader.dataset) == 13 else "report"  # CLI_DATA: 13 carved, 64 report scenes
        seen.append(split)
        script = select_script if split == "select" else report_script
        return {**real(self, model, loader, device), "top1": script[seen.count(split) - 1]}

    monkeypatch.setattr(Classification, "evaluate", scripted)
    out = tmp_path / "base"
    assert main(["train", *CLI_DATA, *rule, "--epochs", "3", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert seen == ["select", "select", "select", "report", "report"]  # the last weights, then the selected ones
    assert report["selected_epoch"] == 2
    assert [h["top1"] for h in report["history"]] == select_script
    assert report["metrics_last"]["top1"] == 50.0 and report["metrics"]["top1"] == 40.0
    selection = report["selection"]
    assert report["splits"]["select"]["size"] == 13 and selection["split"] == "select" and selection["size"] == 13
    assert selection["rule"] == ("best" if gap == 10.0 else "guarded") and selection["kept_epoch"] == 2
    assert selection["standard_error"] == pytest.approx((20 * 80 / 13) ** 0.5)  # at the last epoch's 20%


@pytest.mark.e2e
def test_guarded_selection_keeps_the_last_epoch_over_a_lead_within_noise(tmp_path, monkeypatch):
    select_script = [10.0, 30.0, 20.0]  # +10 points on 13 samples: within the noise margin
    real = Classification.evaluate
    calls: list[int] = []

    def scripted(self, model, loader, device):
        metrics = real(self, model, loader, device)
        if len(loader.dataset) == 13:
            calls.append(1)
            metrics["top1"] = select_script[len(calls) - 1]
        return metrics

    monkeypatch.setattr(Classification, "evaluate", scripted)
    out = tmp_path / "base"
    assert main(["train", *CLI_DATA, "--epochs", "3", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["selected_epoch"] == 3 and report["metrics"] == report["metrics_last"]
    selection = report["selection"]
    assert selection["rule"] == "guarded" and selection["best_epoch"] == 2 and selection["kept_epoch"] == 3
    assert selection["margin"] > 10.0 and "within the noise margin" in selection["reason"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("splits") / "c"
    assert main(compress_argv(None, out, "--epochs", "2")) == 0
    return out


def test_compress_report_names_its_splits_and_reports_the_last_epoch(compressed):
    report = json.loads((compressed / "report.json").read_text())
    assert {"train", "select", "report"} == set(report["splits"])
    assert report["compressed_last"]["epoch"] == 2 and set(report["compressed_last"]["metrics"]) == {"top1", "top5"}
    assert len(report["retrain_history"]) == 2  # select-split metrics per retraining epoch
    assert report["compressed"]["epoch"] in (1, 2)
    text = (compressed / "report.md").read_text()
    for needle in (
        "report split: built-in val scenes (seed 1), 64 samples",
        "select split: carved from built-in",
        "chosen by top1 on the select split (rule guarded: ",
        "the split's standard error",
        "p = 0.5",
        "seed 0",
        "machine: cpu",
    ):
        assert needle in text, needle


def test_evaluate_reports_on_the_report_split(compressed, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--compressed", str(compressed)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"]["source"] == "built-in val scenes (seed 1)"
    report = json.loads((compressed / "report.json").read_text())
    assert result["metrics"] == pytest.approx(report["compressed"]["metrics"])


def test_karpathy_data_needs_a_test_file_for_the_report(tmp_path, capsys):
    from test_retrieval import _karpathy

    _karpathy(tmp_path / "data")
    (tmp_path / "data" / "coco_karpathy_test.json").unlink()
    argv = ["train", "--task", "retrieval", "--model", "clip-micro", "--data", str(tmp_path / "data")]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no *test.json annotation file (the report split" in err and len(err.splitlines()) == 1
