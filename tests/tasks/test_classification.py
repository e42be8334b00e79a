"""Classification data: augmentation presets from timm (none on the built-in world, light on folders, the DeiT
recipe with Mixup/CutMix and label smoothing on request), and soft-target loss."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLI_DATA
from PIL import Image

from upop.cli import main
from upop.data.config import DataConfig
from upop.tasks import get_task


def _folder(root, n=4):
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 16), (200 * c, 60 + 20 * i, 90)).save(folder / f"{i}.png")


def test_builtin_data_is_not_augmented_by_default_and_folders_get_light():
    builtin = get_task("classification").datasets(DataConfig(image_size=16, train_size=100, val_size=10))
    assert builtin.about["train"]["augment"] == "none"
    x, _ = builtin.train[0]
    assert torch.equal(x, builtin.train[0][0])  # deterministic: no random transform


def test_light_preset_is_timms_random_resized_crop(tmp_path):
    from timm.data.transforms import RandomResizedCropAndInterpolation as RandomResizedCrop
    from torchvision.transforms import ColorJitter, RandomHorizontalFlip

    _folder(tmp_path)
    splits = get_task("classification").datasets(DataConfig(root=str(tmp_path), image_size=16, select_size=2))
    assert splits.about["train"]["augment"] == "light"
    steps = splits.train.dataset.transform.transforms
    crop = next(t for t in steps if isinstance(t, RandomResizedCrop))
    assert crop.scale == (0.5, 1.0) and any(isinstance(t, RandomHorizontalFlip) for t in steps)
    assert not any(isinstance(t, ColorJitter) for t in steps)
    select_steps = splits.select.dataset.transform.transforms  # the selection split is not augmented
    assert not any(isinstance(t, (RandomResizedCrop, RandomHorizontalFlip)) for t in select_steps)
    assert splits.select[0][0].shape == (3, 16, 16)


def test_deit_preset_mixes_batches_into_smoothed_soft_targets():
    task = get_task("classification")
    splits = task.datasets(DataConfig(image_size=16, train_size=64, val_size=8, augment="deit"))
    images = torch.stack([splits.train[i][0] for i in range(8)])
    labels = torch.stack([splits.train[i][1] for i in range(8)])
    mixed, targets = task.train_batch((images.clone(), labels))
    assert targets.shape == (8, 30) and torch.allclose(targets.sum(1), torch.ones(8))
    assert targets.min() > 0  # label smoothing 0.1 spreads mass over every class
    assert not torch.equal(mixed, images)
    logits = torch.randn(8, 30)
    expected = -(targets * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(task.loss_from(logits, (mixed, targets)), expected)
    assert task.loss_from(logits, (images, labels)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels))
    )


def test_train_with_the_deit_recipe_end_to_end(tmp_path):
    out = tmp_path / "deit"
    assert main(["train", *CLI_DATA, "--augment", "deit", "--epochs", "1", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["train"]["augment"] == "deit" and report["data"]["augment"] == "deit"
