"""Inputs a new user gives by mistake: each one gives one line ``upop: error: ...`` naming what is wrong and what is
accepted, exit status 2, before anything is trained, and no output directory that looks complete."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import CLI_DATA
from PIL import Image

from upop.cli import main


def _fail(capsys, argv, out_dir=None) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("upop: error: ")
    assert "\x1b" not in err  # no terminal colour codes
    if out_dir is not None:
        assert not out_dir.exists()
    return err


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_train_with_no_epochs(epochs, tmp_path, capsys):
    out = tmp_path / "out"
    err = _fail(capsys, ["train", *CLI_DATA, "--epochs", epochs, "--output-dir", str(out)], out)
    assert f"--epochs must be a positive integer, got {epochs}" in err


def test_train_with_a_learning_rate_of_zero(tmp_path, capsys):
    out = tmp_path / "out"
    assert "--lr must be positive" in _fail(capsys, ["train", *CLI_DATA, "--lr", "0", "--output-dir", str(out)], out)


def _folder(root, classes=("a", "b"), val_classes=None, n=6):
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (40 * c, 120, 200 - 10 * i)).save(folder / f"{i}.png")


@pytest.mark.parametrize(
    "content, why",
    [(b"", "cannot identify image file"), (b"not an image at all\n", "cannot identify image file")],
)
def test_an_unreadable_file_in_an_image_folder_is_named_before_training(tmp_path, capsys, content, why):
    _folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "b" / "broken.png"
    bad.write_bytes(content)
    out = tmp_path / "out"
    argv = ["train", "--model", "vit-micro", "--data", str(tmp_path / "data"), "--output-dir", str(out)]
    err = _fail(capsys, argv, out)
    assert str(bad) in err and "is not a readable image" in err and why in err


def test_a_class_folder_missing_from_val_is_named(tmp_path, capsys):
    _folder(tmp_path / "data", classes=("cat", "dog", "owl"), val_classes=("cat", "owl"))
    out = tmp_path / "out"
    argv = ["train", "--model", "vit-micro", "--data", str(tmp_path / "data"), "--output-dir", str(out)]
    err = _fail(capsys, argv, out)
    assert "class folder 'dog'" in err and "missing from" in err


class Payload:
    """An arbitrary object: loading it would need unpickling code."""


def _weights_file(tmp_path, kind: str):
    path = tmp_path / f"{kind}.pth"
    if kind == "objects":
        torch.save({"model": {"w": torch.zeros(2)}, "payload": Payload()}, path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"payload": Payload()}))
    elif kind == "text":
        path.write_text("these are not weights\n")
    else:
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "kind, why",
    [
        ("objects", "holds pickled Python objects besides tensors"),
        ("pickle", "is a pickle of Python objects"),
        ("text", "neither a safetensors file nor a torch checkpoint"),
        ("empty", "the file is empty"),
    ],
)
def test_pretrained_files_that_are_not_state_dicts(tmp_path, capsys, kind, why):
    out = tmp_path / "out"
    path = _weights_file(tmp_path, kind)
    argv = ["compress", *CLI_DATA, "--pretrained", str(path), "--output-dir", str(out)]
    err = _fail(capsys, argv, out)
    assert why in err and "UPop reads tensors only" in err
    assert "weights_only" not in err.split("UPop reads tensors only")[0]  # our words, not torch's


def test_an_interval_that_would_prune_in_one_shot_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", *CLI_DATA, "--epochs-search", "1", "--interval", "50", "--output-dir", str(out)]
    err = _fail(capsys, argv, out)
    assert "T = 15 steps" in err and "every 50 steps ranks only 1 time" in err and "'auto'" in err


def test_odd_batch_with_mixup_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", *CLI_DATA, "--augment", "deit", "--batch-size", "15", "--output-dir", str(out)]
    assert "the batch size must be even, got 15" in _fail(capsys, argv, out)


def test_mixed_granularity_with_a_latency_cost_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", *CLI_DATA, "--granularity", "mixed", "--cost", "latency", "--output-dir", str(out)]
    err = _fail(capsys, argv, out)
    assert 'granularity "mixed"' in err and 'use cost "params" or "flops"' in err
