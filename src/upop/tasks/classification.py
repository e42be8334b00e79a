"""Image classification: top-1 / top-5 accuracy, cross-entropy loss. Data: the built-in shapes world (the label is
the subject's shape and colour) or an ImageNet-style folder (root/train/<class>/*, root/val/<class>/*)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from upop.data.shapes import ShapesWorld, class_names, subject_label
from upop.errors import UPopError
from upop.tasks.base import DataConfig, Task, register_task

SHAPES_MEAN, SHAPES_STD = 0.5, 0.25
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a plain tensor or an HF ModelOutput."""
    return output.logits if hasattr(output, "logits") else output


class ShapesClassification(Dataset):
    """Built-in classification split: scenes rendered once into memory (uint8), labelled by ``subject_label``."""

    def __init__(self, n: int, seed: int, image_size: int, noise: float) -> None:
        world = ShapesWorld(n, seed=seed, image_size=image_size, noise=noise)
        images = []
        for start in range(0, n, 4096):  # chunks keep the rendering's temporaries small
            x, _ = world.render(torch.arange(start, min(n, start + 4096)))
            images.append((x * 255).round().to(torch.uint8))
        self.images = torch.cat(images)
        self.labels = subject_label(world)
        self.classes = class_names()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[i].float() / 255 - SHAPES_MEAN) / SHAPES_STD, self.labels[i]


def image_folder(root: Path, split: str, image_size: int, train: bool) -> Dataset:
    """torchvision ImageFolder over root/split with ImageNet-style preprocessing; one clear error if unusable."""
    from torchvision import datasets, transforms

    path = root / split
    if not path.is_dir():
        raise UPopError(
            f"dataset folder {path} does not exist (expected {root}/train/<class>/* and {root}/val/<class>/*)"
        )
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        tf = transforms.Compose(
            [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
        )
    else:
        tf = transforms.Compose(
            [
                transforms.Resize(int(image_size * 256 / 224)),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                norm,
            ]
        )
    try:
        return datasets.ImageFolder(str(path), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise UPopError(f"dataset folder {path} has no usable images: {str(e).splitlines()[0]}") from None


@register_task
class Classification(Task):
    name = "classification"
    main_metric = "top1"

    def datasets(self, data: DataConfig) -> tuple[Dataset, Dataset]:
        if data.root is None:
            train = ShapesClassification(data.train_size, data.seed, data.image_size, data.noise)
            val = ShapesClassification(data.val_size, data.seed + 1, data.image_size, data.noise)
            return train, val
        root = Path(data.root)
        if not root.is_dir():
            raise UPopError(f"dataset folder {root} does not exist")
        train = image_folder(root, "train", data.image_size, train=True)
        val = image_folder(root, "val", data.image_size, train=False)
        if train.classes != val.classes:
            raise UPopError(f"{root}/train and {root}/val hold different class folders")
        return train, val

    def num_outputs(self, train: Dataset) -> int:
        return len(train.classes)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(logits_of(model(images)), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        num_classes = len(loader.dataset.classes)
        metrics = {
            f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro").to(device)
            for k in (1, 5)
            if k <= num_classes
        }
        was_training = model.training
        model.eval()
        try:
            for images, labels in loader:
                logits = logits_of(model(images.to(device))).float()
                for metric in metrics.values():
                    metric.update(logits, labels.to(device))
        finally:
            model.train(was_training)
        return {name: 100.0 * float(metric.compute()) for name, metric in metrics.items()}

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        return batch[0]
