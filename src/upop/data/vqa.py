"""VQA in BLIP's format: ``*train.json``, ``*val.json`` and optionally ``*test.json``, each a JSON list of
``{"question_id", "question", "answer": [...], "image"}``, and ``answer_list.json`` (the candidate answers); and the
dataset of (image, question, human answers, index) samples the VQA task trains and evaluates on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from upop.data.annotations import read_annotation
from upop.data.images import image_reader
from upop.errors import UPopError

VG_WEIGHT = 0.2  # BLIP's VQA training: a Visual Genome answer weighs this much (a VQAv2 question's answers weigh 1)


class Questions(Dataset):
    """(image, question, human answers, index, answer weight) samples; ``answers`` None for a test split (hidden
    answers); ``weights`` the weight of a sample's answers in the loss (1, or ``VG_WEIGHT`` for Visual Genome's)."""

    def __init__(
        self,
        images: Any,
        questions: list[str],
        answers: list[list[str]] | None,
        types: list[str] | None = None,
        ids: list[Any] | None = None,
        weights: list[float] | None = None,
    ) -> None:
        self.images, self.questions, self.answers, self.types = images, questions, answers, types
        self.ids = ids if ids is not None else list(range(len(questions)))
        self.weights = weights

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, list[str], int, float]:
        weight = self.weights[i] if self.weights is not None else 1.0
        return self.images(i), self.questions[i], self.answers[i] if self.answers else [], i, weight

    @staticmethod
    def collate(batch: list[tuple]) -> tuple[torch.Tensor, list[str], list[list[str]], torch.Tensor, torch.Tensor]:
        images, questions, answers, index, weights = zip(*batch)
        return torch.stack(images), list(questions), list(answers), torch.tensor(index), torch.tensor(weights)


@dataclass
class VqaFile:
    """The entries of a BLIP-format VQA file: question ids, questions, human answers (None for a test file without
    them), image paths and each entry's ``dataset`` ("vqa", or "vg" for Visual Genome's QA)."""

    ids: list[Any]
    questions: list[str]
    answers: list[list[str]] | None
    images: list[str]
    sources: list[str]


def read_vqa(path: Path, answers_needed: bool) -> VqaFile:
    """The entries of a BLIP-format VQA file; one line naming the entry when an entry is malformed, has no answers
    or repeats an id."""
    entries = read_annotation(path, "'question_id', 'question', 'answer', 'image'")
    ids, questions, answers, images, sources, seen = [], [], [], [], [], {}
    for n, e in enumerate(entries):
        where = f"annotation file {path}, entry {n}"
        if not isinstance(e, dict):
            raise UPopError(f"{where}: expected an object, got {json.dumps(e)[:80]}")
        qid, question, image, answer = e.get("question_id"), e.get("question"), e.get("image"), e.get("answer")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise UPopError(f"{where}: 'question_id' must be an integer or a string, got {json.dumps(qid)}")
        if qid in seen:
            raise UPopError(f"{where}: question_id {json.dumps(qid)} repeats entry {seen[qid]}; ids must be unique")
        seen[qid] = n
        if not isinstance(question, str) or not question.strip():
            raise UPopError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(image, str):
            raise UPopError(f"{where}: 'image' must be an image path relative to the image root")
        if answers_needed or answer is not None:
            if isinstance(answer, str):
                answer = [answer]
            if not isinstance(answer, list) or not answer or not all(isinstance(a, str) and a.strip() for a in answer):
                raise UPopError(
                    f"{where} (question_id {json.dumps(qid)}) has no answers: 'answer' must be a non-empty "
                    "list of the human answers"
                )
            answers.append(answer)
        ids.append(qid)
        questions.append(question)
        images.append(image)
        sources.append(str(e.get("dataset", "vqa")))
    return VqaFile(ids, questions, (answers if answers else None), images, sources)


def read_answer_list(root: Path) -> list[str]:
    path = root / "answer_list.json"
    if not path.is_file():
        raise UPopError(
            f"{root} has no answer_list.json (the candidate answers of rank inference: a JSON list of strings)"
        )
    try:
        answers = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UPopError(f"cannot read the answer list {path}: {e}") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise UPopError(f"the answer list {path} must be a non-empty JSON list of non-empty strings")
    return answers


def split_file(root: Path, split: str, required: bool) -> Path | None:
    found = sorted(root.glob(f"*{split}.json"))
    if len(found) > 1:
        raise UPopError(f"{root} holds several *{split}.json files ({', '.join(p.name for p in found)}); keep one")
    if not found and required:
        raise UPopError(
            f"{root} has no *{split}.json (BLIP's VQA format needs *train.json and *val.json, answer_list.json, and "
            "optionally *test.json)"
        )
    return found[0] if found else None


def folder_split(path: Path, image_root: Path, image_size: int, answers_needed: bool) -> Questions:
    entries = read_vqa(path, answers_needed)
    _check_images(path, [image_root / p for p in entries.images], image_root)
    return Questions(
        image_reader(image_root, entries.images, image_size), entries.questions, entries.answers, ids=entries.ids
    )


def _check_images(annotation: Path, paths: list[Path], root: Path) -> None:
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        where = f" under {root}: {missing.relative_to(root)}" if missing.is_relative_to(root) else f": {missing}"
        raise UPopError(f"an image named in {annotation} does not exist{where}")


def training_files(
    paths: list[Path], image_root: Path, vg_root: Path, image_size: int, augment: str = "none"
) -> Questions:
    """One training split of several BLIP-format VQA files (BLIP's: vqa_train, vqa_val and vg_qa): an entry whose
    ``dataset`` is "vg" reads its image under ``vg_root`` and weighs its answer ``VG_WEIGHT``. Question ids must be
    unique per file, not across files (Visual Genome's and VQAv2's overlap)."""
    questions, answers, images, weights, ids = [], [], [], [], []
    for path in paths:
        entries = read_vqa(path, True)
        roots = [vg_root if source == "vg" else image_root for source in entries.sources]
        _check_images(path, [r / p for r, p in zip(roots, entries.images)], image_root)
        questions += entries.questions
        answers += entries.answers or []
        images += [str(r / p) for r, p in zip(roots, entries.images)]
        weights += [VG_WEIGHT if source == "vg" else 1.0 for source in entries.sources]
        ids += [(path.name, q) for q in entries.ids]
    reader = image_reader(Path("."), images, image_size, augment)  # each path joined to its own root already
    return Questions(reader, questions, answers, ids=ids, weights=weights)
