"""NLVR2 in BLIP's format: ``*train.json``, ``*dev.json``, ``*test.json``, each a JSON list of ``{"images": [left,
right], "sentence": str, "label": "True" | "False"}`` (``"image"`` is read too), and the dataset of (two images,
statement, label) samples the NLVR task trains and evaluates on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from upop.data.annotations import read_annotation
from upop.data.images import image_reader
from upop.data.text import STATEMENT_WORDS, pre_caption
from upop.errors import UPopError

SPLITS = (("train", "train", "training"), ("select", "dev", "selection"), ("report", "test", "report"))
LABELS = {"False": 0, "True": 1, False: 0, True: 1}
SWAPPED = {"left": "right", "right": "left"}


def swap_sides(sentence: str) -> str:
    """The statement about the swapped pair, as BLIP's NLVR2 code makes it: cleaned (``pre_caption``, 40 words),
    then every word that is exactly "left" or "right" exchanged for the other."""
    return " ".join(SWAPPED.get(w, w) for w in pre_caption(sentence, STATEMENT_WORDS).split(" "))


class Statements(Dataset):
    """(two images (2, 3, S, S), statement, label) samples. With ``swap`` (training, ``--nlvr-swap``), a sample's
    two images are swapped with probability 0.5 and its statement with them (``swap_sides``): the label holds."""

    def __init__(
        self, images: Callable[[int], torch.Tensor], sentences: list[str], labels: torch.Tensor, swap: bool = False
    ) -> None:
        self.images, self.sentences, self.labels, self.swap = images, sentences, labels, swap

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, torch.Tensor]:
        images, sentence = self.images(i), self.sentences[i]
        if self.swap and float(torch.rand(())) < 0.5:
            images, sentence = images.flip(0), swap_sides(sentence)
        return images, sentence, self.labels[i]


def read_nlvr(path: Path) -> tuple[list[tuple[str, str]], list[str], torch.Tensor]:
    """(image pairs, statements, labels) of a BLIP-format NLVR2 annotation file."""
    entries = read_annotation(path, "'images', 'sentence', 'label'")
    pairs, sentences, labels = [], [], []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UPopError(f"annotation file {path}, entry {n}: expected an object, got {json.dumps(entry)[:80]}")
        image = entry.get("images", entry.get("image"))  # BLIP's key, and the singular some copies use
        sentence, label = entry.get("sentence"), entry.get("label")
        if not isinstance(image, list) or len(image) != 2 or not all(isinstance(p, str) for p in image):
            raise UPopError(
                f"annotation file {path}, entry {n}: 'images' must be a list of two image paths (left, right), "
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


def folder_split(root: Path, image_root: Path, split: str, role: str, image_size: int, augment: str = "none") -> tuple:
    annotation = _annotation(root, split, role)
    pairs, sentences, labels = read_nlvr(annotation)
    missing = next((p for pair in pairs for p in pair if not (image_root / p).is_file()), None)
    if missing is not None:
        raise UPopError(f"an image named in {annotation} does not exist under {image_root}: {missing}")
    read = image_reader(image_root, [p for pair in pairs for p in pair], image_size, augment)

    def load(i: int) -> torch.Tensor:
        return torch.stack([read(2 * i), read(2 * i + 1)])

    return load, sentences, labels, str(annotation)
