"""VQA in BLIP's format: ``*train.json``, ``*val.json`` and optionally ``*test.json``, each a JSON list of
``{"question_id", "question", "answer": [...], "image"}``, and ``answer_list.json`` (the candidate answers); and the
dataset of (image, question, human answers, index) samples the VQA task trains and evaluates on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from upop.data.annotations import read_annotation
from upop.data.images import image_reader
from upop.errors import UPopError


class Questions(Dataset):
    """(image, question, human answers, index) samples; ``answers`` None for a test split (hidden answers)."""

    def __init__(
        self,
        images: Any,
        questions: list[str],
        answers: list[list[str]] | None,
        types: list[str] | None = None,
        ids: list[Any] | None = None,
    ) -> None:
        self.images, self.questions, self.answers, self.types = images, questions, answers, types
        self.ids = ids if ids is not None else list(range(len(questions)))

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, list[str], int]:
        return self.images(i), self.questions[i], self.answers[i] if self.answers else [], i

    @staticmethod
    def collate(batch: list[tuple]) -> tuple[torch.Tensor, list[str], list[list[str]], torch.Tensor]:
        images, questions, answers, index = zip(*batch)
        return torch.stack(images), list(questions), list(answers), torch.tensor(index)


def read_vqa(path: Path, answers_needed: bool) -> tuple[list[Any], list[str], list[list[str]] | None, list[str]]:
    """(question ids, questions, human answers (None when not ``answers_needed`` and absent), image paths) of a
    BLIP-format VQA file; one line naming the entry when an entry is malformed, has no answers or repeats an id."""
    entries = read_annotation(path, "'question_id', 'question', 'answer', 'image'")
    ids, questions, answers, images, seen = [], [], [], [], {}
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
    return ids, questions, (answers if answers else None), images


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
    ids, questions, answers, paths = read_vqa(path, answers_needed)
    missing = next((p for p in paths if not (image_root / p).is_file()), None)
    if missing is not None:
        raise UPopError(f"an image named in {path} does not exist under {image_root}: {missing}")
    return Questions(image_reader(image_root, paths, image_size), questions, answers, ids=ids)
