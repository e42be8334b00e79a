"""Captioned images, the data of retrieval and captioning: training pairs (image, caption, image id) and evaluation
splits (the images, every caption with the image it belongs to), from the built-in shapes world's captions or from
Karpathy split files (train trains, val selects, test is reported)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from upop.data.augment import task_preset
from upop.data.blip_augment import augmented
from upop.data.captions import CAPTIONS_PER_SCENE, scene_captions
from upop.data.config import DataConfig
from upop.data.images import CLIP_MEAN, CLIP_STD, normalise_clip
from upop.data.karpathy import annotation_file, folder_split
from upop.data.shapes import ShapesWorld
from upop.data.splits import ROLES, Splits, builtin_roles
from upop.errors import UPopError


class CaptionPairs(Dataset):
    """Training pairs: one (image, caption, image id) per caption."""

    def __init__(self, images: Callable[[int], torch.Tensor], captions: list[str], txt2img: torch.Tensor) -> None:
        self.images, self.captions, self.txt2img = images, captions, txt2img

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, int]:
        image = int(self.txt2img[i])
        return self.images(image), self.captions[i], image


class CaptionedImages(Dataset):
    """Evaluation split: the images (items), and every caption with the image it belongs to (``txt2img``)."""

    def __init__(
        self, images: Callable[[int], torch.Tensor], n_images: int, captions: list[str], txt2img: torch.Tensor
    ) -> None:
        self.images, self.n_images, self.captions, self.txt2img = images, n_images, captions, txt2img

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images(i)


def shapes_split(n: int, seed: int, image_size: int, noise: float) -> tuple[Callable, list[str], torch.Tensor]:
    """Rendered images (kept as uint8), captions and caption->image index of ``n`` built-in scenes."""
    world = ShapesWorld(n, seed=seed, image_size=image_size, noise=noise)
    chunks = []
    for start in range(0, n, 4096):
        x, _ = world.render(torch.arange(start, min(n, start + 4096)))
        chunks.append((x * 255).round().to(torch.uint8))
    pixels = torch.cat(chunks)
    captions = [c for i in range(n) for c in scene_captions(world, i)]
    txt2img = torch.arange(n).repeat_interleave(CAPTIONS_PER_SCENE)
    return (lambda i: normalise_clip(pixels[i].float() / 255)), captions, txt2img


def captioned_splits(data: DataConfig, roles: tuple[str, ...] = ROLES, task: str = "retrieval") -> Splits:
    """The train (``CaptionPairs``), select and report (``CaptionedImages``) splits of ``data`` (those in
    ``roles``); the training images augmented as ``data.augment`` says ("none" or "blip")."""
    preset = task_preset(data.augment, data.builtin, ("none", "blip"), task, auto="none")
    if data.builtin:
        splits: dict[str, Any] = {}
        for name, size, seed in builtin_roles(data, roles):
            load, captions, owner = shapes_split(size, seed, data.image_size, data.noise)
            if name == "train" and preset == "blip":
                load = augmented(load, data.image_size, CLIP_MEAN, CLIP_STD)
            splits[name] = (load, size, captions, owner, f"built-in scenes (seed {seed})")
    else:
        root = Path(data.root)
        if not root.is_dir():
            raise UPopError(f"dataset folder {root} does not exist")
        image_root = Path(data.image_root) if data.image_root else root
        splits = {}
        for name, split in (("train", "train"), ("select", "val"), ("report", "test")):
            if name not in roles or name == "select" and data.select_size == 0:
                continue
            augment = preset if name == "train" else "none"
            load, n, captions, owner = folder_split(root, image_root, split, data.image_size, augment)
            splits[name] = (load, n, captions, owner, str(annotation_file(root, split)))
    about = {
        name: {"source": source, "images": n, "captions": len(captions)}
        for name, (_, n, captions, _, source) in splits.items()
    }
    train = None
    if "train" in splits:
        about["train"]["augment"] = preset
        load, _, captions, owner, _ = splits["train"]
        train = CaptionPairs(load, captions, owner)
    select = CaptionedImages(*splits["select"][:4]) if "select" in splits else None
    return Splits(train, select, CaptionedImages(*splits["report"][:4]), about)
