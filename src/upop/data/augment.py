"""Training augmentation presets, built from timm's maintained transforms (``timm.data.create_transform``,
``timm.data.Mixup``) rather than hand-written ones.

- ``none``: the evaluation preprocessing for training too.
- ``light`` (the default on image folders): RandomResizedCrop with scale (0.5, 1) and ratio (3/4, 4/3), horizontal
  flip with probability 0.5; no colour jitter, no erasing, no label smoothing. Mild enough for small data sets and
  short retraining, where strong augmentation costs more accuracy than it regularises.
- ``deit``: the DeiT recipe that UPop's ImageNet runs use: RandomResizedCrop scale (0.08, 1), flip, RandAugment
  ``rand-m9-mstd0.5-inc1``, bicubic interpolation, random erasing 0.25 (pixel mode), Mixup 0.8 / CutMix 1.0 (switch
  probability 0.5, per batch) with label smoothing 0.1. Needs an even batch size.
- ``blip`` (the image-text tasks: retrieval, captioning, NLVR2, VQA): BLIP's training transform
  (``upop.data.blip_augment``).
- ``segmenter`` (segmentation): the original Segmenter pipeline (``upop.tasks.segmentation``): the class-ratio
  crop, photometric distortion, padding after normalisation.

``light`` and ``deit`` are for classification; the image-text tasks take ``none`` (their ``auto``) or ``blip``;
segmentation takes its own default (``auto``/``light``) or ``segmenter``.

The built-in shapes world defaults to ``none`` (``auto``): its scenes are already random in position, size, depth
order and pixel noise, and a horizontal flip would not change a label but a crop could cut the subject out.
"""

from __future__ import annotations

from typing import Any

from upop.errors import UPopError

PRESETS = ("auto", "none", "light", "deit", "blip", "segmenter")
LIGHT = {"scale": (0.5, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": None}
DEIT = {
    "scale": (0.08, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
    "color_jitter": 0.3,
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "interpolation": "bicubic",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
}
DEIT_MIXUP = {
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "prob": 1.0,
    "switch_prob": 0.5,
    "mode": "batch",
    "label_smoothing": 0.1,
}
EVAL_CROP = 224 / 256  # resize the shorter side to size / 0.875, then centre-crop (the ImageNet convention)


def resolve(augment: str, builtin: bool) -> str:
    """The preset ``auto`` stands for: none on the built-in world, light on an image folder."""
    if augment == "auto":
        return "none" if builtin else "light"
    return augment


def task_preset(augment: str, builtin: bool, accepted: tuple[str, ...], task: str, auto: str | None = None) -> str:
    """The preset a task trains with: ``augment`` (``auto`` resolved: ``auto`` if given, else ``resolve``), refused
    in one line when the task does not take it."""
    preset = (auto if auto is not None else resolve(augment, builtin)) if augment == "auto" else augment
    if preset not in accepted:
        raise UPopError(f"--augment {augment}: the {task} task trains with {' or '.join(accepted)}, not {preset}")
    return preset


def train_transform(preset: str, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """The PIL -> normalised tensor transform of training images for ``preset`` (not "none")."""
    from timm.data import create_transform

    settings = {"light": LIGHT, "deit": DEIT}[preset]
    return create_transform(image_size, is_training=True, mean=mean, std=std, **settings)


def eval_transform(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """Resize the shorter side to image_size / 0.875 (bicubic), centre crop, normalise."""
    from timm.data import create_transform

    return create_transform(
        image_size, is_training=False, interpolation="bicubic", crop_pct=EVAL_CROP, mean=mean, std=std
    )


def check_batch_size(preset: str, batch_size: int) -> None:
    if preset == "deit" and batch_size % 2:
        raise UPopError(
            f"--augment deit mixes pairs of samples (Mixup/CutMix): the batch size must be even, got {batch_size}"
        )


def batch_mixer(preset: str, num_classes: int) -> Any:
    """timm's Mixup/CutMix with label smoothing for ``deit`` (None for the other presets). It turns (images, labels)
    into (mixed images, soft targets (B, C)); it draws from numpy's global RNG, which checkpoints save."""
    if preset != "deit":
        return None
    from timm.data import Mixup

    return Mixup(num_classes=num_classes, **DEIT_MIXUP)
