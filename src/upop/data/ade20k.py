"""ADE20K in its release layout: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``
(single-channel class ids; 0 is "other" and ignored, 1..150 become classes 0..149). Every annotation is checked
before training: an image without an annotation, an annotation of another size than its image, an RGB annotation, or
a label above 150 is refused, naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from upop.errors import UPopError

IGNORE = 255  # the label of pixels no loss or metric counts
ADE_CLASSES = 150
ADE20K_CLASSES: tuple[str, ...] = tuple(
    (
        "wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|earth|door|table|"
        "mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|rug|field|armchair|seat|fence|"
        "desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|box|column|signboard|chest of drawers|counter|sand|"
        "sink|skyscraper|fireplace|refrigerator|grandstand|path|stairs|runway|case|pool table|pillow|screen door|"
        "stairway|river|bridge|bookcase|blind|coffee table|toilet|flower|book|hill|bench|countertop|stove|palm|"
        "kitchen island|computer|swivel chair|boat|bar|arcade machine|hovel|bus|towel|light|truck|tower|chandelier|"
        "awning|streetlight|booth|television|airplane|dirt track|apparel|pole|land|bannister|escalator|ottoman|"
        "bottle|buffet|poster|stage|van|ship|fountain|conveyer belt|canopy|washer|plaything|swimming pool|stool|"
        "barrel|basket|waterfall|tent|bag|minibike|cradle|oven|ball|food|step|tank|trade name|microwave|pot|animal|"
        "bicycle|lake|dishwasher|screen|blanket|sculpture|hood|sconce|vase|traffic light|tray|ashcan|fan|pier|"
        "crt screen|plate|monitor|bulletin board|shower|radiator|glass|clock|flag"
    ).split("|")
)


def ade_split(root: Path, split: str) -> tuple[Callable[[int], tuple], int, str]:
    """An ADE20K split: (load, count, source). Every image must have an annotation; every annotation is checked
    (single channel, the image's size, labels <= 150) before anything trains."""
    import numpy as np
    from PIL import Image

    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise UPopError(f"{root} is not an ADE20K folder: it needs images/{split}/*.jpg and annotations/{split}/*.png")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise UPopError(f"{image_dir} holds no images (*.jpg)")
    pairs = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise UPopError(f"the image {image} has no annotation (expected {label})")
        try:
            with Image.open(image) as im, Image.open(label) as lab:
                if lab.mode not in ("L", "P", "I;16", "I"):
                    raise UPopError(
                        f"the annotation {label} is {lab.mode}, not a single-channel PNG of class ids "
                        "(ADE20K's annotations hold one class id per pixel)"
                    )
                if lab.size != im.size:
                    raise UPopError(
                        f"the annotation {label} is {lab.size[0]}x{lab.size[1]}, its image {image.name} "
                        f"{im.size[0]}x{im.size[1]}; they must be the same size"
                    )
                top = int(np.asarray(lab).max())
        except OSError as e:
            raise UPopError(f"cannot read {image} or its annotation: {e}") from None
        if top > ADE_CLASSES:
            raise UPopError(f"the annotation {label} has label {top}; ADE20K's are 0 (ignored) to {ADE_CLASSES}")
        pairs.append((image, label))

    def load(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = pairs[i]
        with Image.open(image) as im, Image.open(label) as lab:
            x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
            y = torch.from_numpy(np.asarray(lab).astype(np.int64))
        y = torch.where(y == 0, IGNORE, y - 1)  # 0 is "other": ignored; 1..150 -> classes 0..149
        return x.float() / 255, y

    return load, len(pairs), str(image_dir)
