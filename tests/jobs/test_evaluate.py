"""`upop evaluate` as a user of released files runs it: no training data (a folder with only the split it reports on,
a batch larger than any training split), no flag the model spec already answers (segmenter:DIR, hf:DIR and
open_clip:ARCH:WEIGHTS hold their weights), and a named open_clip architecture buildable without its weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import ade_folder, blip_original_layout, released_segmenter
from test_bad_input import _folder

from upop.cli import main
from upop.models import build


def _evaluate(capsys, *argv: str) -> dict:
    assert main(["evaluate", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.e2e
def test_a_classification_folder_with_only_val_is_evaluated(tmp_path, capsys):
    _folder(tmp_path / "data", classes=("a", "b", "c"))
    shutil.rmtree(tmp_path / "data" / "train")
    torch.save({"model": build("vit-micro", "classifier", 3).model.state_dict()}, tmp_path / "w.pth")
    result = _evaluate(
        capsys, "--model", "vit-micro", "--data", str(tmp_path / "data"), "--pretrained", str(tmp_path / "w.pth")
    )
    assert result["split"]["size"] == 18 and "top1" in result["metrics"]


@pytest.mark.e2e
def test_a_batch_larger_than_the_training_split_does_not_matter_to_an_evaluation(tmp_path, capsys):
    torch.save(build("vit-micro", "classifier", 30).model.state_dict(), tmp_path / "w.pth")
    argv = ["--model", "vit-micro", "--train-size", "4", "--val-size", "8", "--batch-size", "64"]
    assert "top1" in _evaluate(capsys, *argv, "--pretrained", str(tmp_path / "w.pth"))["metrics"]


def _karpathy_test_only(root):
    from PIL import Image

    root.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 12), (80 * i, 40, 200)).save(root / f"{i}.png")
    entries = [{"image": f"{i}.png", "caption": ["a red circle", "a blue square"]} for i in range(3)]
    (root / "coco_karpathy_test.json").write_text(json.dumps(entries))


@pytest.mark.e2e
def test_a_retrieval_folder_with_only_its_test_file_is_evaluated(tmp_path, capsys):
    _karpathy_test_only(tmp_path / "coco")
    torch.save(
        {"model": blip_original_layout(build("blip-micro", "dual_encoder").model.state_dict())}, tmp_path / "b.pth"
    )
    argv = ["--task", "retrieval", "--model", "blip-micro", "--data", str(tmp_path / "coco"), "--batch-size", "4"]
    result = _evaluate(capsys, *argv, "--pretrained", str(tmp_path / "b.pth"))
    assert result["split"]["images"] == 3 and "r_mean" in result["metrics"]


@pytest.mark.e2e
def test_a_released_segmenter_is_evaluated_from_its_directory_alone(tmp_path, capsys):
    ckpt = tmp_path / "seg"
    released_segmenter(ckpt)
    shutil.rmtree(ade_folder(tmp_path / "ade") / "images" / "training")  # and no training images either
    argv = [
        "--task",
        "segmentation",
        "--model",
        f"segmenter:{ckpt}",
        "--data",
        str(tmp_path / "ade"),
        "--batch-size",
        "2",
    ]
    assert "miou" in _evaluate(capsys, *argv)["metrics"]


def test_a_model_without_weights_of_its_own_needs_a_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["evaluate", "--model", "vit-micro", "--train-size", "8", "--val-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compressed DIR or --pretrained FILE" in err[0] and "segmenter:DIR" in err[0]


def test_a_named_open_clip_architecture_is_built_on_the_meta_device():
    from upop.core.plan import parameters_on_meta

    with parameters_on_meta():
        bundle = build("open_clip:ViT-B-16-quickgelu", "dual_encoder", weights=False)
    assert all(p.is_meta for p in bundle.model.parameters()) and bundle.image_size == 224
    assert bundle.tokenizer is not None
