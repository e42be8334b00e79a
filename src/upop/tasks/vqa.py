"""Visual question answering with BLIP (``upop.models.blip.modeling.BlipVqa``: image and question encoders, an
answer decoder).

Training: the answer decoder's LM loss (label smoothing 0.1, as BLIP) of every distinct answer a question's humans
gave, each weighted by its share of the human answers (after the metric's normalisation, so "two" and "2" are one
answer), summed per question and averaged over the batch.

Inference (``--vqa-inference``): "rank" (default, as BLIP evaluates VQAv2): the candidates of the answer list whose
first token is likeliest (the top ``RANK_K`` = 128), then the one of those with BLIP's score: minus the decoder's
loss summed over its tokens, label-smoothed (0.1); "generate": beam search (3 beams, at most 10 tokens) by HF's
``generate``.

Metric: the standard VQA accuracy: a prediction scores min(humans who gave it / 3, 1), averaged over the ten subsets
of nine of the ten humans, after the standard normalisation of prediction and answers (``normalise_answer``:
punctuation, articles, number words, contractions); per answer type too where the data says the type.

Data: the built-in shapes world's questions (``upop.data.questions``), or BLIP's VQA format in a folder:
``*train.json`` (training; the selection split is carved from it), ``*val.json`` (the report split; VQAv2's test
answers are hidden), each a JSON list of ``{"question_id", "question", "answer": [...], "image"}`` with images under
``--image-root``, ``answer_list.json`` (the candidate answers) and, optionally, ``*test.json`` (test-dev questions,
answers not needed): a run then writes ``vqa_test_submission.json``, a JSON list of ``{"question_id", "answer"}``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from upop.data.augment import task_preset
from upop.data.blip_augment import augmented
from upop.data.config import DataConfig
from upop.data.images import CLIP_MEAN, CLIP_STD, normalise_clip
from upop.data.questions import answer_list, question_split
from upop.data.splits import ROLES, Carved, Splits, builtin_roles, carve, carved_about, default_select_size
from upop.data.text import pre_question
from upop.data.vqa import Questions, folder_split, read_answer_list, split_file, training_files
from upop.errors import UPopError
from upop.tasks.base import Task, evaluating, register_task
from upop.tasks.losses import lm_loss, token_distill
from upop.utils import dist as D
from upop.utils.dist import unwrap

RANK_K = 128
QUESTION_TOKENS = 35  # BLIP's VQA: questions cut at 35 tokens
NUM_BEAMS, MAX_LENGTH = 3, 10
SUBMISSION = "vqa_test_submission.json"

# --------------------------------------------------------------------------------------- the standard normalisation
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {  # written without the apostrophe -> with it
    w.replace("'", ""): w
    for w in (
        "aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't it's i'm i've let's shouldn't "
        "that's there's they're wasn't weren't what's where's who's won't wouldn't you're"
    ).split()
}
_PUNCT = re.compile(r"""[;/\[\]"{}()=+\\_\-><@`,?!*#%^&$:|~]""")


def normalise_answer(text: str) -> str:
    """An answer as the VQA evaluation compares answers: lower case; a comma between digits dropped ("1,000");
    a period kept only between digits; other punctuation dropped where it touches a space, else read as a space
    ("black/white"); number words as digits; articles dropped; contractions written with their apostrophe."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", "", text)
    text = _PUNCT.sub(" ", re.sub(rf"\s{_PUNCT.pattern}|{_PUNCT.pattern}\s", " ", text))
    words = [_CONTRACTIONS.get(w, _NUMBERS.get(w, w)) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction against its human answers (both normalised here): min(matches among the
    other humans / 3, 1) averaged over leaving out each human in turn (1 with a single answer that matches)."""
    pred = normalise_answer(prediction)
    humans = [normalise_answer(a) for a in answers]
    if len(humans) == 1:
        return float(humans[0] == pred)
    total = 0.0
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1 :]
        total += min(1.0, sum(h == pred for h in others) / 3)
    return total / len(humans)


def answer_weights(answers: list[str], raw: bool = False, scale: float = 1.0) -> tuple[list[str], list[float]]:
    """The distinct answers of one question (after the metric's normalisation, or ``raw`` strings as the original
    groups them) and each one's share of the human answers, times ``scale`` (0.2 for a Visual Genome answer)."""
    counts = Counter(a if raw else normalise_answer(a) for a in answers)
    return list(counts), [scale * c / len(answers) for c in counts.values()]


# ------------------------------------------------------------------------------------------------------------ task
@register_task
class Vqa(Task):
    name = "vqa"
    main_metric = "accuracy"
    model_kind = "vqa"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inference = self.options.vqa_inference
        self.candidates: list[str] = []
        self.test: Questions | None = None

    def datasets(self, data: DataConfig, roles: tuple[str, ...] = ROLES) -> Splits:
        preset = task_preset(data.augment, data.builtin, ("none", "blip"), self.name, auto="none")
        if data.builtin:
            made, about = {}, {}
            for name, size, seed in builtin_roles(data, roles):
                load, questions, answers, types = question_split(
                    size, seed, data.image_size, data.noise, normalise_clip
                )
                if name == "train" and preset == "blip":
                    load = augmented(load, data.image_size, CLIP_MEAN, CLIP_STD)
                made[name] = Questions(load, questions, answers, types)
                about[name] = {"source": f"built-in questions, one per scene (seed {seed})", "size": size}
            self.candidates = answer_list()
            if "train" in about:
                about["train"]["augment"] = preset
            return self._splits(made.get("train"), made.get("select"), made["report"], about)
        root = Path(data.root)
        if not root.is_dir():
            raise UPopError(f"dataset folder {root} does not exist")
        image_root = Path(data.image_root) if data.image_root else root
        self.candidates = read_answer_list(root)
        report_file = split_file(root, "val", True)
        report = folder_split(report_file, image_root, data.image_size, True)
        about: dict[str, Any] = {"report": {"source": str(report_file), "size": len(report)}}
        train, select = self._training(root, image_root, data, about) if "train" in roles else (None, None)
        if train is not None and report_file.name in data.vqa_train_files:
            about["report"]["note"] = (
                "also in the training files, as in the paper's VQA recipe (its result is the test-dev submission): "
                "not a held-out number"
            )
        test_file = split_file(root, "test", False)
        self.test = folder_split(test_file, image_root, data.image_size, False) if test_file else None
        if self.test is not None:
            about["test"] = {"source": str(test_file), "size": len(self.test), "written": SUBMISSION}
        return self._splits(train, select, report, about)

    def _training(
        self, root: Path, image_root: Path, data: DataConfig, about: dict[str, Any]
    ) -> tuple[Dataset, Dataset | None]:
        """The training split of a VQA folder (its *train.json, or ``data.vqa_train_files``) and the selection
        split carved from it (recorded in ``about``)."""
        names = data.vqa_train_files
        files = [root / n for n in names] if names else [split_file(root, "train", True)]
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise UPopError(f"--vqa-train-files: {missing} does not exist (accepted: annotation files in {root})")
        preset = task_preset(data.augment, data.builtin, ("none", "blip"), self.name, auto="none")
        vg_root = Path(data.vg_image_root) if data.vg_image_root else image_root
        train = training_files(files, image_root, vg_root, data.image_size, preset)
        source = " + ".join(str(f) for f in files)
        about["train"] = {"source": source, "size": len(train), "augment": preset}
        if train.weights is not None and any(w != 1.0 for w in train.weights):
            about["train"]["visual_genome"] = sum(w != 1.0 for w in train.weights)
        size = default_select_size(len(train)) if data.select_size is None else data.select_size
        if not size:
            return train, None
        kept, picked = carve(torch.zeros(len(train), dtype=torch.long), size, data.seed)
        about["select"] = carved_about(picked, source, data.seed)
        about["train"]["size"] = len(kept)
        return Carved(train, kept.tolist()), Carved(train, picked.tolist())

    def _splits(self, train: Dataset | None, select: Dataset | None, report: Dataset, about: dict) -> Splits:
        if train is not None:
            about["train"].setdefault("augment", "none")
        about["report"]["inference"] = self.inference
        return Splits(train, select, report, about)

    def outputs(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Decoder logits (A, L, V) of every distinct answer of every question, with labels, weights, owners."""
        images, questions, humans, _, scales = batch
        device = images.device
        owner, answers, weights = [], [], []
        raw = self.options.answer_grouping == "raw"
        for q, (given, scale) in enumerate(zip(humans, scales.tolist())):
            distinct, share = answer_weights(given, raw, scale)
            owner += [q] * len(distinct)
            answers += distinct
            weights += share
        q = self.questions(questions, device)
        a = self.tokenize(answers, device)
        owner_t = torch.tensor(owner, device=device)
        logits = model(images, q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"], owner_t)
        labels = a["input_ids"].masked_fill(a["attention_mask"] == 0, -100)
        labels[:, 0] = -100
        return {
            "logits": logits,
            "labels": labels,
            "weights": torch.tensor(weights, device=device),
            "questions": torch.tensor(len(questions), device=device),
        }

    def loss_from(self, outputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return (outputs["weights"] * lm_loss(outputs["logits"], outputs["labels"])).sum() / outputs["questions"]

    def distill_loss(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float):
        return token_distill(student["logits"], teacher["logits"], student["labels"], temperature)

    def questions(self, questions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Questions as BLIP's VQA code feeds them (``pre_question``), tokenised, at most ``QUESTION_TOKENS``."""
        return self.tokenize([pre_question(q) for q in questions], device, QUESTION_TOKENS)

    @torch.no_grad()
    def answer(
        self, model: nn.Module, images: torch.Tensor, questions: list[str], candidates: dict | None = None
    ) -> list[str]:
        """The model's answers to ``questions`` about ``images`` by the task's inference mode (``candidates``: the
        answer list's tokens, when the caller has them)."""
        m = unwrap(model)
        q = self.questions(questions, images.device)
        if self.inference == "generate":
            out = m.generate(images, q["input_ids"], q["attention_mask"], num_beams=NUM_BEAMS, max_length=MAX_LENGTH)
            return [self.tokenizer.decode(row[1:]) for row in out]
        a = candidates if candidates is not None else self.tokenize(self.candidates, images.device)
        picked = m.rank(images, q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"], RANK_K)
        return [self.candidates[i] for i in picked.tolist()]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        data = loader.dataset
        with evaluating(model):
            scored, candidates = [], self.tokenize(self.candidates, device)
            for images, questions, humans, index, _ in loader:
                answers = self.answer(model, images.to(device), questions, candidates)
                scored += [(int(i), vqa_accuracy(p, h)) for i, p, h in zip(index, answers, humans)]
        scored = D.gather_objects(scored)
        out = {"accuracy": 100.0 * sum(s for _, s in scored) / max(1, len(scored))}
        types = getattr(data, "types", None)
        if types:
            for kind in sorted(set(types)):
                mine = [s for i, s in scored if types[i] == kind]
                out[f"accuracy_{kind.replace('/', '_')}"] = 100.0 * sum(mine) / max(1, len(mine))
        return out

    def extra_files(
        self, model: nn.Module, device: torch.device, batch_size: int, dense: nn.Module | None = None
    ) -> dict[str, bytes]:
        """The test-dev submission (question ids and answers of ``*test.json``), when the data has a test file."""
        if self.test is None:
            return {}
        from torch.utils.data import DataLoader

        rows, candidates = [], self.tokenize(self.candidates, device)
        with evaluating(model):
            for images, questions, _, index, _ in DataLoader(
                self.test, batch_size=batch_size, collate_fn=Questions.collate
            ):
                answers = self.answer(model, images.to(device), questions, candidates)
                rows += [{"question_id": self.test.ids[int(i)], "answer": a} for i, a in zip(index, answers)]
        return {SUBMISSION: json.dumps(rows, indent=1).encode()}

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        """Images, their questions and one answer each (the first human's; "yes" without a batch of questions)."""
        if model is None:
            raise UPopError("VQA example inputs need the model (its device)")
        device = next(model.parameters()).device
        if isinstance(batch, torch.Tensor):
            images, questions, answers = batch, ["is there a red circle?"] * len(batch), ["yes"] * len(batch)
        else:
            images, questions = batch[0], batch[1]
            answers = [h[0] if h else "yes" for h in batch[2]]
        q, a = self.questions(questions, device), self.tokenize(answers, device)
        return {
            "pixel_values": images.to(device),
            "input_ids": q["input_ids"],
            "attention_mask": q["attention_mask"],
            "answer_ids": a["input_ids"],
            "answer_mask": a["attention_mask"],
        }
