"""Image classification: top-1 / top-5 accuracy, cross-entropy loss (soft targets under Mixup/CutMix). Data: the
built-in shapes world (the label is the subject's shape and colour) or an ImageNet-style folder (root/train/<class>/*,
root/val/<class>/*). The selection split is carved from train (stratified, seeded); val is the report split."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from upop.data import augment
from upop.data.shapes import ShapesWorld, class_names, subject_label
from upop.errors import UPopError
from upop.tasks.base import (
    Carved,
    DataConfig,
    Splits,
    Task,
    carve,
    carved_about,
    default_select_size,
    evaluating,
    register_task,
)

SHAPES_MEAN, SHAPES_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a plain tensor or an HF ModelOutput."""
    return output.logits if hasattr(output, "logits") else output


class ShapesClassification(Dataset):
    """Built-in classification split: scenes rendered once into memory (uint8), labelled by ``subject_label``.
    Without ``transform`` a sample is the normalised tensor; with one, the PIL image goes through it."""

    def __init__(self, n: int, seed: int, image_size: int, noise: float, transform: Any = None) -> None:
        world = ShapesWorld(n, seed=seed, image_size=image_size, noise=noise)
        images = []
        for start in range(0, n, 4096):  # chunks keep the rendering's temporaries small
            x, _ = world.render(torch.arange(start, min(n, start + 4096)))
            images.append((x * 255).round().to(torch.uint8))
        self.images = torch.cat(images)
        self.labels = subject_label(world)
        self.classes = class_names()
        self.transform = transform
        self.mean = torch.tensor(SHAPES_MEAN).view(3, 1, 1)
        self.std = torch.tensor(SHAPES_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transform is not None:
            from PIL import Image

            return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy())), self.labels[i]
        return (self.images[i].float() / 255 - self.mean) / self.std, self.labels[i]

    def plain(self) -> ShapesClassification:
        """The same scenes without augmentation (for selection)."""
        view = copy.copy(self)
        view.transform = None
        return view


def _read_image(path: str) -> Any:
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


def image_folder(root: Path, split: str, transform: Any) -> Any:
    """torchvision ImageFolder over root/split; one clear error if unusable; every image's header checked."""
    from torchvision import datasets

    path = root / split
    if not path.is_dir():
        raise UPopError(
            f"dataset folder {path} does not exist (expected {root}/train/<class>/* and {root}/val/<class>/*)"
        )
    try:
        folder = datasets.ImageFolder(str(path), transform=transform, loader=_read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UPopError(f"dataset folder {path} has no usable images: {str(e).splitlines()[0]}") from None
    check_images([p for p, _ in folder.samples], path)
    return folder


def _same_classes(root: Path, train: list[str], val: list[str]) -> None:
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


@register_task
class Classification(Task):
    name = "classification"
    main_metric = "top1"

    def __init__(self) -> None:
        self.mixer = None

    def datasets(self, data: DataConfig) -> Splits:
        preset = augment.resolve(data.augment, data.builtin)
        if data.builtin:
            tf = None if preset == "none" else augment.train_transform(preset, data.image_size, SHAPES_MEAN, SHAPES_STD)
            full = ShapesClassification(data.train_size, data.seed, data.image_size, data.noise, tf)
            plain, labels = full.plain(), full.labels
            report = ShapesClassification(data.val_size, data.seed + 1, data.image_size, data.noise)
            sources = (f"built-in train scenes (seed {data.seed})", f"built-in val scenes (seed {data.seed + 1})")
        else:
            root = Path(data.root)
            if not root.is_dir():
                raise UPopError(f"dataset folder {root} does not exist")
            eval_tf = augment.eval_transform(data.image_size, IMAGENET_MEAN, IMAGENET_STD)
            tf = (
                eval_tf
                if preset == "none"
                else augment.train_transform(preset, data.image_size, IMAGENET_MEAN, IMAGENET_STD)
            )
            full = image_folder(root, "train", tf)
            report = image_folder(root, "val", eval_tf)
            _same_classes(root, full.classes, report.classes)
            plain, labels = copy.copy(full), torch.tensor(full.targets)
            plain.transform = eval_tf
            sources = (f"{root}/train", f"{root}/val")
        size = default_select_size(len(labels)) if data.select_size is None else data.select_size
        about = {"train": {"source": sources[0]}, "report": {"source": sources[1], "size": len(report)}}
        if size == 0:
            train, select = full, None
        else:
            if size >= len(labels):
                raise UPopError(f"--select-size {size} leaves no training samples (train has {len(labels)})")
            kept, picked = carve(labels, size, data.seed)
            train, select = Carved(full, kept.tolist()), Carved(plain, picked.tolist())
            about["select"] = carved_about(picked, sources[0], data.seed)
        about["train"]["size"] = len(train)
        about["train"]["augment"] = preset
        self.mixer = augment.batch_mixer(preset, len(full.classes))
        return Splits(train, select, report, about)

    def num_outputs(self, train: Dataset) -> int:
        return len(train.classes)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return logits_of(model(batch[0]))

    def loss_from(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        targets = batch[1]
        if targets.is_floating_point():  # soft targets from Mixup/CutMix with label smoothing
            return torch.sum(-targets * F.log_softmax(outputs.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(outputs, targets)

    def train_batch(self, batch: Any) -> Any:
        if self.mixer is None:
            return batch
        images, labels = batch
        return self.mixer(images, labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        num_classes = len(loader.dataset.classes)
        metrics = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device)
            for k in (1, 5)
            if k <= num_classes
        }
        with evaluating(model):
            for images, labels in loader:
                logits = logits_of(model(images.to(device))).float()
                for metric in metrics.values():
                    metric.update(logits, labels.to(device))
        return {name: 100.0 * float(metric.compute()) for name, metric in metrics.items()}

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        return batch if isinstance(batch, torch.Tensor) else batch[0]
