"""BLIP's training augmentation of images (``--augment blip``), the one its NLVR2, captioning, VQA and retrieval
scripts (and UPop's CLIP retrieval) train with, written on torchvision's tensor ops:

1. a random resized crop of 50-100% of the image's area (aspect 3/4-4/3) to the training size, bicubic;
2. a horizontal flip with probability 0.5;
3. BLIP's ``RandomAugment(2, 5)``: two operations drawn (with replacement) from identity, autocontrast, brightness,
   sharpness, equalize, shear x/y, translate x/y and rotate, each applied with probability 0.5 at magnitude 5 of 10:
   shear by a factor of 0.15, translation by 5 pixels, rotation by 15 degrees (each with a random sign), gaps filled
   with grey 128; at magnitude 5 BLIP's brightness and sharpness factors are exactly 1, so those two leave the image
   as it is (kept, as the draw is over all ten).

Images are uint8 (3, H, W) tensors; randomness comes from torch's generator (seeded per data-loader worker).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

CROP_SCALE = (0.5, 1.0)
LEVEL, MAX_LEVEL = 5, 10
OPS = (
    "identity",
    "autocontrast",
    "brightness",
    "sharpness",
    "equalize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
)
FILL = [128.0, 128.0, 128.0]
SHEAR = LEVEL / MAX_LEVEL * 0.3  # 0.15
TRANSLATE = LEVEL / MAX_LEVEL * 10.0  # 5 pixels
ROTATE = LEVEL / MAX_LEVEL * 30.0  # 15 degrees
ENHANCE = LEVEL / MAX_LEVEL * 1.8 + 0.1  # 1.0: brightness and sharpness unchanged at this level


def _sign() -> float:
    return -1.0 if float(torch.rand(())) < 0.5 else 1.0


def apply_op(image: torch.Tensor, op: str) -> torch.Tensor:
    """One of BLIP's operations at magnitude 5 on a uint8 image (3, H, W)."""
    if op == "autocontrast":
        return TF.autocontrast(image)
    if op == "equalize":
        return TF.equalize(image)
    if op == "brightness":
        return TF.adjust_brightness(image, ENHANCE)
    if op == "sharpness":
        return TF.adjust_sharpness(image, ENHANCE)
    linear = InterpolationMode.BILINEAR
    if op in ("shear_x", "shear_y"):  # about the top-left corner, as cv2.warpAffine with [[1, f, 0], [0, 1, 0]]
        degrees = math.degrees(math.atan(SHEAR)) * _sign()
        shear = [degrees, 0.0] if op == "shear_x" else [0.0, degrees]
        return TF.affine(
            image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=linear, fill=FILL, center=[0, 0]
        )
    if op in ("translate_x", "translate_y"):
        offset = TRANSLATE * _sign()
        move = [offset, 0.0] if op == "translate_x" else [0.0, offset]
        return TF.affine(image, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=linear, fill=FILL)
    if op == "rotate":
        return TF.rotate(image, ROTATE * _sign(), interpolation=linear, fill=FILL)
    return image


def random_augment(image: torch.Tensor, n: int = 2, probability: float = 0.5) -> torch.Tensor:
    """BLIP's RandomAugment(2, 5): ``n`` operations drawn with replacement, each applied with ``probability``."""
    for index in torch.randint(len(OPS), (n,)).tolist():
        if float(torch.rand(())) < probability:
            image = apply_op(image, OPS[index])
    return image


def blip_train_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 image (3, H, W) of any size -> BLIP's augmented training image (3, size, size), uint8."""
    top, left, h, w = RandomResizedCrop.get_params(image, scale=list(CROP_SCALE), ratio=[3 / 4, 4 / 3])
    image = TF.resized_crop(
        image, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    if float(torch.rand(())) < 0.5:
        image = TF.horizontal_flip(image)
    return random_augment(image)


def augmented(
    load: Callable[[int], torch.Tensor], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[int], torch.Tensor]:
    """``load`` (i -> a normalised image (3, S, S), or a stack (..., 3, S, S)) with BLIP's augmentation applied to
    every image: back to uint8, augmented, normalised again (for images already in memory, e.g. the built-in
    world's)."""
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def one(x: torch.Tensor) -> torch.Tensor:
        pixels = ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
        return (blip_train_image(pixels, size).float() / 255 - m) / s

    def wrapped(i: int) -> torch.Tensor:
        x = load(i)
        return one(x) if x.dim() == 3 else torch.stack([one(y) for y in x.reshape(-1, *x.shape[-3:])]).view_as(x)

    return wrapped
