"""Reading images of the real formats: decoded as RGB with one clear line for an unreadable file, ImageNet-style
class folders checked before anything trains, and the fixed-size reader of the annotation-file tasks."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from upop.errors import UPopError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise_clip(x: torch.Tensor) -> torch.Tensor:
    """Images (..., 3, H, W) in [0, 1] normalised with CLIP's mean and std (the image-text tasks' convention)."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def read_image(path: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise UPopError(f"cannot read the image {path}: {str(e).splitlines()[0]}") from None


def _unreadable(path: str) -> str | None:
    """Why ``path`` is not an image PIL can open (header check only), or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (parsing the header is the check)
    except Exception as e:  # UnidentifiedImageError, truncated headers, permissions...
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def check_images(paths: list[str], where: Path) -> None:
    """Open every image's header before training starts; one line naming the first unreadable file."""
    with ThreadPoolExecutor(8) as pool:
        problems = [(p, why) for p, why in zip(paths, pool.map(_unreadable, paths)) if why]
    if problems:
        path, why = problems[0]
        more = f" ({len(problems)} unreadable files in all)" if len(problems) > 1 else ""
        raise UPopError(f"{path} in {where} is not a readable image: {why}{more}")


def _split_folder(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise UPopError(f"dataset folder {root} does not exist")
    path = root / split
    if not path.is_dir():
        raise UPopError(
            f"dataset folder {path} does not exist (expected {root}/train/<class>/* and {root}/val/<class>/*)"
        )
    return path


def class_folders(root: Path, split: str) -> list[str]:
    """The class folder names of ``root/split`` (sorted, as torchvision's ImageFolder orders them)."""
    return sorted(entry.name for entry in _split_folder(root, split).iterdir() if entry.is_dir())


def image_folder(root: Path, split: str, transform: Any) -> Any:
    """torchvision ImageFolder over root/split; one clear error if unusable; every image's header checked."""
    from torchvision import datasets

    path = _split_folder(root, split)
    try:
        folder = datasets.ImageFolder(str(path), transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UPopError(f"dataset folder {path} has no usable images: {str(e).splitlines()[0]}") from None
    check_images([p for p, _ in folder.samples], path)
    return folder


def same_classes(root: Path, train: list[str], val: list[str]) -> None:
    missing = [c for c in train if c not in val]
    extra = [c for c in val if c not in train]
    if missing:
        raise UPopError(
            f"class folder {missing[0]!r} of {root}/train is missing from {root}/val "
            f"({len(missing)} missing in all); both splits need the same classes"
        )
    if extra:
        raise UPopError(
            f"{root}/val has the class folder {extra[0]!r}, which {root}/train lacks; both splits need the same classes"
        )


def image_reader(
    image_root: Path, paths: list[str], image_size: int, augment: str = "none"
) -> Callable[[int], torch.Tensor]:
    """``load(i)``: the image ``image_root / paths[i]`` as RGB, resized (bicubic) to ``image_size`` x ``image_size``
    without cropping, as BLIP's evaluation (and UPop's, for CLIP too) prepares images, normalised with CLIP's mean
    and std; one clear line when a file cannot be read. With ``augment`` "blip" (training), BLIP's augmentation
    (``upop.data.blip_augment``) instead of the resize, cropping from the image at its own size."""
    from PIL import Image
    from torchvision import transforms

    resize = transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC)
    normalise = transforms.Normalize(CLIP_MEAN, CLIP_STD)
    tf = transforms.Compose([resize, transforms.ToTensor(), normalise])

    def augmented(im: Any) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        from upop.data.blip_augment import blip_train_image

        return normalise(blip_train_image(pil_to_tensor(im), image_size).float() / 255)

    def load(i: int) -> torch.Tensor:
        try:
            with Image.open(image_root / paths[i]) as im:
                rgb = im.convert("RGB")
                return augmented(rgb) if augment == "blip" else tf(rgb)
        except OSError as e:
            raise UPopError(f"cannot read the image {image_root / paths[i]}: {e}") from None

    return load
