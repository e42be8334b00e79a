"""NLVR (natural-language visual reasoning over two images, NLVR2): is a statement about a pair of images true?
Cross-entropy over (False, True); the metric is accuracy.

Data: the built-in shapes world's statements about scene pairs (``upop.data.statements``: balanced labels, every
statement needs both images), or BLIP's NLVR2 annotation files: ``DIR/*train.json`` (training), ``DIR/*dev.json``
(selection) and ``DIR/*test.json`` (report; test-P), each a JSON list of ``{"image": [left, right], "sentence": str,
"label": "True" | "False"}`` with images under ``--image-root`` (default ``DIR``).

Models take ``(pixel_values (B, 2, 3, S, S), input_ids, attention_mask)`` and return logits (B, 2); statements are
tokenised by the model's own tokenizer (``model.upop_tokenizer``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from upop.data.statements import statement_split
from upop.errors import UPopError
from upop.tasks.base import DataConfig, Splits, Task, evaluating, read_annotation, register_task
from upop.tasks.retrieval import _normalise, image_reader, tokenize

SPLITS = (("train", "train", "training"), ("select", "dev", "selection"), ("report", "test", "report"))
LABELS = {"False": 0, "True": 1, False: 0, True: 1}


class Statements(Dataset):
    """(two images (2, 3, S, S), statement, label) samples."""

    def __init__(self, images: Callable[[int], torch.Tensor], sentences: list[str], labels: torch.Tensor) -> None:
        self.images, self.sentences, self.labels = images, sentences, labels

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        return self.images(i), self.sentences[i], self.labels[i]


def read_nlvr(path: Path) -> tuple[list[tuple[str, str]], list[str], torch.Tensor]:
    """(image pairs, statements, labels) of a BLIP-format NLVR2 annotation file."""
    entries = read_annotation(path, "'image', 'sentence', 'label'")
    pairs, sentences, labels = [], [], []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UPopError(f"annotation file {path}, entry {n}: expected an object, got {json.dumps(entry)[:80]}")
        image, sentence, label = entry.get("image"), entry.get("sentence"), entry.get("label")
        if not isinstance(image, list) or len(image) != 2 or not all(isinstance(p, str) for p in image):
            raise UPopError(
                f"annotation file {path}, entry {n}: 'image' must be a list of two image paths (left, right), "
                f"got {json.dumps(image)[:80]}"
            )
        if not isinstance(sentence, str) or not sentence.strip():
            raise UPopError(f"annotation file {path}, entry {n}: 'sentence' must be a non-empty string")
        if label not in LABELS:
            raise UPopError(
                f'annotation file {path}, entry {n}: \'label\' must be "True" or "False", got {json.dumps(label)}'
            )
        pairs.append((image[0], image[1]))
        sentences.append(sentence)
        labels.append(LABELS[label])
    return pairs, sentences, torch.tensor(labels)


def _annotation(root: Path, split: str, role: str) -> Path:
    found = sorted(root.glob(f"*{split}.json"))
    if len(found) != 1:
        what = "several" if found else "no"
        raise UPopError(
            f"{root} holds {what} *{split}.json annotation file(s) (the {role} split; NLVR2 in BLIP's format needs "
            "one each of *train.json, *dev.json and *test.json)"
        )
    return found[0]


def folder_split(root: Path, image_root: Path, split: str, role: str, image_size: int) -> tuple:
    annotation = _annotation(root, split, role)
    pairs, sentences, labels = read_nlvr(annotation)
    missing = next((p for pair in pairs for p in pair if not (image_root / p).is_file()), None)
    if missing is not None:
        raise UPopError(f"an image named in {annotation} does not exist under {image_root}: {missing}")
    read = image_reader(image_root, [p for pair in pairs for p in pair], image_size, crop=False)

    def load(i: int) -> torch.Tensor:
        return torch.stack([read(2 * i), read(2 * i + 1)])

    return load, sentences, labels, str(annotation)


@register_task
class Nlvr(Task):
    name = "nlvr"
    main_metric = "accuracy"
    model_kind = "nlvr"

    def datasets(self, data: DataConfig) -> Splits:
        made: dict[str, Any] = {}
        if data.builtin:
            for name, size, seed in (
                ("train", data.train_size, data.seed),
                ("select", data.val_size if data.select_size is None else data.select_size, data.seed + 2),
                ("report", data.val_size, data.seed + 1),
            ):
                if size:
                    load, sentences, labels = statement_split(size, seed, data.image_size, data.noise, _normalise)
                    made[name] = (load, sentences, labels, f"built-in statements on scene pairs (seed {seed})")
        else:
            root = Path(data.root)
            if not root.is_dir():
                raise UPopError(f"dataset folder {root} does not exist")
            image_root = Path(data.image_root) if data.image_root else root
            for name, split, role in SPLITS:
                if name == "select" and data.select_size == 0:
                    continue
                made[name] = folder_split(root, image_root, split, role, data.image_size)
        about = {
            name: {"source": source, "size": len(sentences), "true": int(labels.sum())}
            for name, (_, sentences, labels, source) in made.items()
        }
        about["train"]["augment"] = "none"
        sets = {name: Statements(*made[name][:3]) for name in made}
        return Splits(sets["train"], sets.get("select"), sets["report"], about)

    def num_outputs(self, train: Dataset) -> int:
        return 2

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, sentences, _ = batch
        return model(pixel_values=images, **tokenize(model, sentences, images.device))

    def loss_from(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch[2])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        metric = MulticlassAccuracy(2, average="micro").to(device)
        with evaluating(model):
            for images, sentences, labels in loader:
                images = images.to(device)
                logits = model(pixel_values=images, **tokenize(model, sentences, device)).float()
                metric.update(logits, labels.to(device))
        return {"accuracy": 100.0 * float(metric.compute())}

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        if model is None:
            raise UPopError("NLVR example inputs need the model (its tokenizer)")
        images, sentences = batch[0], list(batch[1])
        device = next(model.parameters()).device
        return {"pixel_values": images.to(device), **tokenize(model, sentences, device)}
