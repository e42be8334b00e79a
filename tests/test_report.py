"""What a report tells its reader: slowdowns as "x slower", kept counts per layer with towers named only when there
are several, and a config.json that records only the settings that shaped the run."""

from __future__ import annotations

import json

import pytest
from test_bad_input import _folder

from upop.cli import main
from upop.jobs.render import kept_grid, speed_text


def test_a_slowdown_reads_slower_never_a_fraction_faster():
    assert speed_text(2.0) == "2.00x faster"
    assert speed_text(5.0 / 9.25) == "1.85x slower"
    assert speed_text(0.996) == "1.004x slower" and speed_text(1.0) == "1.000x faster"


def _row(name, tower, kind, kept, size):
    return {"name": name, "tower": tower, "kind": kind, "kept": kept, "size": size}


def test_kept_grid_names_towers_only_when_there_are_several_and_keeps_the_counts():
    single = [_row("blocks.0.attn", "vision", "attn", 3, 8), _row("blocks.0.mlp", "vision", "mlp", 40, 64)]
    labels, layers, grid = kept_grid(single)
    assert labels == ["attention dims", "MLP neurons"] and layers == [0] and grid == [[(3, 8), (40, 64)]]
    two = [*single, _row("text_model.encoder.layers.0.mlp", "text", "mlp", 10, 20)]
    labels, _, grid = kept_grid(two)
    assert labels == ["text MLP neurons", "vision attention dims", "vision MLP neurons"]
    assert grid == [[(10, 20), (3, 8), (40, 64)]]


def test_config_of_a_folder_run_does_not_record_the_builtin_worlds_settings(tmp_path):
    _folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["train", "--model", "vit-micro", "--data", str(tmp_path / "data"), "--batch-size", "4"]
    assert main([*argv, "--epochs", "1", "--select-size", "2", "--output-dir", str(out)]) == 0
    data = json.loads((out / "config.json").read_text())["run"]["data"]
    assert data["root"] == str(tmp_path / "data") and data["select_size"] == 2 and data["augment"] == "auto"
    assert not {"train_size", "val_size", "noise"} & set(data)
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["train"]["augment"] == "light" and report["splits"]["select"]["size"] == 2
    assert report["splits"]["report"]["source"] == f"{tmp_path / 'data'}/val"


@pytest.mark.e2e
def test_a_compressed_model_slower_than_dense_is_said_plainly(tmp_path, capsys, monkeypatch):
    from helpers import compress_argv

    from upop.jobs import compress

    real = compress.paired_latency

    def slower(models, inputs, iters=30, warmup=5):
        latency, speedup = real(models, inputs, iters=3, warmup=1)
        return {"dense": 0.008, "compressed": 0.010}, {**speedup, "compressed": 0.8}

    monkeypatch.setattr(compress, "paired_latency", slower)
    out = tmp_path / "out"
    assert main(compress_argv(None, out, "--epochs", "0")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("upop: warning: the compressed model is 1.25x slower than dense on cpu")
    report = json.loads((out / "report.json").read_text())
    assert report["slower_than_dense"] and report["speed"]["speedup"] == 0.8
    assert "1.25x slower (SLOWER than dense)" in (out / "report.md").read_text()


def test_heatmap_grid_gives_each_twin_cross_attention_branch_its_own_column():
    rows = [
        {"name": "vision_model.encoder.layers.1.self_attn", "kind": "attn", "tower": "vision", "kept": 3, "size": 8},
        {"name": "text_encoder.encoder.layer.1.attention", "kind": "attn", "tower": "text", "kept": 4, "size": 8},
        {
            "name": "text_encoder.encoder.layer.1.crossattention.branches.0",
            "kind": "attn",
            "tower": "cross",
            "kept": 5,
            "size": 8,
        },
        {
            "name": "text_encoder.encoder.layer.1.crossattention.branches.1",
            "kind": "attn",
            "tower": "cross",
            "kept": 6,
            "size": 8,
        },
    ]
    labels, layers, grid = kept_grid(rows)
    assert layers == [1]
    assert labels == [
        "cross attention dims (0)",
        "cross attention dims (1)",
        "text attention dims",
        "vision attention dims",
    ]
    assert grid[0] == [(5, 8), (6, 8), (4, 8), (3, 8)]
