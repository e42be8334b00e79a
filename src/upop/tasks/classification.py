"""Image classification: top-1 / top-5 accuracy, cross-entropy loss (soft targets under Mixup/CutMix). Data: the
built-in shapes world (the label is the subject's shape and colour) or an ImageNet-style folder (root/train/<class>/*,
root/val/<class>/*). The selection split is carved from train (stratified, seeded); val is the report split."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from upop.data import augment
from upop.data.config import DataConfig
from upop.data.images import IMAGENET_MEAN, IMAGENET_STD, class_folders, image_folder, same_classes
from upop.data.shapes import ShapesWorld, class_names, subject_label
from upop.data.splits import ROLES, Carved, Splits, carve, carved_about, default_select_size
from upop.errors import UPopError
from upop.tasks.base import Task, evaluating, register_task

SHAPES_MEAN, SHAPES_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


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


@register_task
class Classification(Task):
    name = "classification"
    main_metric = "top1"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixer = None

    @classmethod
    def num_outputs(cls, data: DataConfig) -> int:
        """The classes: the built-in world's, or the class folders of ``root/train`` (of ``root/val`` without it)."""
        if data.builtin:
            return len(class_names())
        root = Path(data.root)
        return len(class_folders(root, "train" if (root / "train").is_dir() else "val"))

    def datasets(self, data: DataConfig, roles: tuple[str, ...] = ROLES) -> Splits:
        preset = augment.task_preset(data.augment, data.builtin, ("none", "light", "deit"), self.name)
        if "train" not in roles:
            return self._report_only(data)
        if data.builtin:
            tf = None if preset == "none" else augment.train_transform(preset, data.image_size, SHAPES_MEAN, SHAPES_STD)
            full = ShapesClassification(data.train_size, data.seed, data.image_size, data.noise, tf)
            plain, labels = full.plain(), full.labels
            report = ShapesClassification(data.val_size, data.seed + 1, data.image_size, data.noise)
            sources = (f"built-in train scenes (seed {data.seed})", f"built-in val scenes (seed {data.seed + 1})")
        else:
            root = Path(data.root)
            eval_tf = augment.eval_transform(data.image_size, IMAGENET_MEAN, IMAGENET_STD)
            tf = (
                eval_tf
                if preset == "none"
                else augment.train_transform(preset, data.image_size, IMAGENET_MEAN, IMAGENET_STD)
            )
            full = image_folder(root, "train", tf)
            report = image_folder(root, "val", eval_tf)
            same_classes(root, full.classes, report.classes)
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

    def _report_only(self, data: DataConfig) -> Splits:
        """The report split alone: the built-in val scenes, or the folder's val (no train folder needed)."""
        if data.builtin:
            report = ShapesClassification(data.val_size, data.seed + 1, data.image_size, data.noise)
            source = f"built-in val scenes (seed {data.seed + 1})"
        else:
            root = Path(data.root)
            report = image_folder(root, "val", augment.eval_transform(data.image_size, IMAGENET_MEAN, IMAGENET_STD))
            source = f"{root}/val"
        return Splits(None, None, report, {"report": {"source": source, "size": len(report)}})

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
