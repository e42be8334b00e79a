"""The Karpathy split files of COCO and Flickr30K (BLIP's ``coco_karpathy_{train,val,test}.json``...): a JSON list
of ``{"image": relative path, "caption": str or [str, ...]}``, one file per split found by its suffix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from upop.data.annotations import read_annotation
from upop.data.images import image_reader
from upop.errors import UPopError


def read_karpathy(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(image paths in first-seen order, captions, caption->image index) of a Karpathy-format annotation file."""
    entries = read_annotation(path, "'image', 'caption'")
    images: dict[str, int] = {}
    captions: list[str] = []
    owner: list[int] = []
    for n, entry in enumerate(entries):
        caption = entry.get("caption") if isinstance(entry, dict) else None
        image = entry.get("image") if isinstance(entry, dict) else None
        texts = [caption] if isinstance(caption, str) else caption
        if (
            not isinstance(image, str)
            or not isinstance(texts, list)
            or not texts
            or not all(isinstance(t, str) for t in texts)
        ):
            raise UPopError(
                f"annotation file {path}, entry {n}: expected {{'image': relative path, 'caption': str or list of "
                f"str}}, got {json.dumps(entry)[:120]}"
            )
        index = images.setdefault(image, len(images))
        captions.extend(texts)
        owner.extend([index] * len(texts))
    return list(images), captions, torch.tensor(owner)


SPLIT_ROLES = {"train": "training", "val": "selection", "test": "report"}


def annotation_file(root: Path, split: str) -> Path:
    found = sorted(root.glob(f"*{split}.json"))
    if len(found) > 1:
        raise UPopError(f"{root} holds several *{split}.json files ({', '.join(p.name for p in found)}); keep one")
    if not found:
        raise UPopError(
            f"{root} has no *{split}.json annotation file (the {SPLIT_ROLES[split]} split; Karpathy format: a list of "
            "image/caption entries, with *train.json, *val.json and *test.json)"
        )
    return found[0]


def folder_split(
    root: Path, image_root: Path, split: str, image_size: int, augment: str = "none"
) -> tuple[Callable, int, list[str], torch.Tensor]:
    annotation = annotation_file(root, split)
    paths, captions, txt2img = read_karpathy(annotation)
    missing = [p for p in paths if not (image_root / p).is_file()]
    if missing:
        raise UPopError(
            f"{len(missing)} image(s) named in {annotation} do not exist under {image_root}, e.g. {missing[0]}"
        )
    return image_reader(image_root, paths, image_size, augment), len(paths), captions, txt2img
