"""Image captioning with a BLIP text decoder (HF ``BlipForConditionalGeneration``).

Loss: the decoder's LM cross-entropy (label smoothing 0.1, as BLIP) on "a picture of " + caption, the prompt's tokens
not scored. Decoding as BLIP evaluates COCO: beam search with 3 beams, at most 20 and at least 5 tokens (the prompt
counted), the prompt cut from the text. Metrics: BLEU@4 and CIDEr(-D) of pycocoevalcap against every reference
caption of an image, in percent (CIDEr 100 = 1.0). Captions are tokenised for scoring by pycocoevalcap's PTB
tokenizer when Java is on the PATH (the COCO standard), else by ``simple_tokenize``, a pure-Python stand-in that does
what the PTB tokenizer does to plain captions (lower case, punctuation split off and dropped); every report says
which one scored it.

Data: the built-in shapes world's captions (``upop.data.captions``), or the Karpathy-split files the retrieval task
reads (BLIP's ``coco_karpathy_{train,val,test}.json``): ``*train.json`` trains, ``*val.json`` selects, ``*test.json``
is reported.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from upop.data.captioned import CaptionedImages, captioned_splits
from upop.data.config import DataConfig
from upop.data.splits import ROLES, Splits
from upop.data.text import CAPTION_WORDS, pre_caption
from upop.errors import UPopError
from upop.tasks.base import Task, evaluating, register_task, tokenize
from upop.tasks.losses import lm_loss, token_distill
from upop.utils import dist as D
from upop.utils.dist import unwrap
from upop.utils.extras import require
from upop.utils.stats import mean_error

PROMPT = "a picture of "
NUM_BEAMS, MAX_LENGTH, MIN_LENGTH = 3, 20, 5
TOKENS = 40  # BLIP's captioner: prompt + caption cut at 40 tokens for training
_PUNCTUATION = re.compile(r"[^\w\s]")


class CaptionImages(Dataset):
    """An evaluation split of images: (image, index); ``references[i]`` are image i's captions."""

    def __init__(self, split: CaptionedImages) -> None:
        self.split = split
        self.references: list[list[str]] = [[] for _ in range(split.n_images)]
        for caption, owner in zip(split.captions, split.txt2img.tolist()):
            self.references[owner].append(caption)

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.split.images(i), i


def simple_tokenize(text: str) -> str:
    """Lower case, punctuation dropped, words joined by single spaces (the PTB tokenizer's output on plain text)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null (a child process's stderr included) for the ``with`` block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def scorer_tokenizer() -> str:
    """ "ptb" (pycocoevalcap's Stanford PTB tokenizer, which runs on Java) when Java is on the PATH, else "simple"."""
    return "ptb" if shutil.which("java") else "simple"


def caption_scores(references: dict[int, list[str]], candidates: dict[int, str]) -> dict[str, Any]:
    """BLEU@4 and CIDEr (percent) of one candidate per image against its references, by pycocoevalcap, and the
    standard error of the CIDEr (the per-image scores' standard deviation / sqrt(images): "cider_se")."""
    require("pycocoevalcap", "the captioning metrics (BLEU@4, CIDEr)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if scorer_tokenizer() == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        with _quiet_stderr():  # Java prints a line per call
            refs = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
            cands = ptb.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    else:
        refs = {k: [simple_tokenize(c) for c in v] for k, v in references.items()}
        cands = {k: [simple_tokenize(c)] for k, c in candidates.items()}
    bleu, _ = Bleu(4).compute_score(refs, cands, verbose=0)
    cider, per_image = Cider().compute_score(refs, cands)
    cider_se = 100.0 * mean_error([float(v) for v in per_image])
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider), "cider_se": cider_se}


def decoder_start(model: nn.Module) -> int:
    return int(unwrap(model).config.text_config.bos_token_id)


def prompt_ids(model: nn.Module, tokenizer: Any, device: torch.device) -> torch.Tensor:
    """The prompt's token ids as ``tokenizer`` writes a text (start ... end token), the start token the decoder's."""
    tokens = tokenize(tokenizer, [PROMPT.strip()], device)
    ids = tokens["input_ids"][0, : int(tokens["attention_mask"][0].sum())].clone()
    ids[0] = decoder_start(model)
    return ids


@torch.no_grad()
def generate_captions(model: nn.Module, tokenizer: Any, images: torch.Tensor, **kwargs: Any) -> list[str]:
    """Captions of ``images`` decoded after the prompt (BLIP's beam search unless ``kwargs`` say otherwise), by the
    model's ``tokenizer``."""
    m = unwrap(model)
    prompt = prompt_ids(m, tokenizer, images.device)
    settings = {"num_beams": NUM_BEAMS, "max_length": MAX_LENGTH, "min_length": MIN_LENGTH, **kwargs}
    out = m.generate(pixel_values=images, input_ids=prompt.expand(len(images), -1).clone(), **settings)
    return [tokenizer.decode(row[len(prompt) - 1 :]) for row in out]


@register_task
class Caption(Task):
    name = "caption"
    main_metric = "cider"
    model_kind = "captioner"

    def standard_error(self, metrics: dict[str, Any], size: int) -> float:
        """CIDEr is a mean over images, not a share: its error is the per-image scores' (``caption_scores``)."""
        return float(metrics.get("cider_se", math.inf))

    def datasets(self, data: DataConfig, roles: tuple[str, ...] = ROLES) -> Splits:
        require("pycocoevalcap", "the captioning metrics (BLEU@4, CIDEr)")  # before any training
        splits = captioned_splits(data, roles, self.name)
        scorer = f"pycocoevalcap BLEU@4 and CIDEr, {scorer_tokenizer()} tokenizer"
        for about in splits.about.values():
            about["scorer"] = scorer
        select = CaptionImages(splits.select) if splits.select is not None else None
        return Splits(splits.train, select, CaptionImages(splits.report), splits.about)

    def outputs(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Decoder logits (B, L, V) of prompt + caption, and the labels: the caption's tokens, -100 elsewhere."""
        images, captions, _ = batch
        tokens = self.tokenize([PROMPT + pre_caption(c, CAPTION_WORDS) for c in captions], images.device, TOKENS)
        ids, mask = tokens["input_ids"].clone(), tokens["attention_mask"]
        ids[:, 0] = decoder_start(model)
        labels = ids.masked_fill(mask == 0, -100)
        prompt = prompt_ids(model, self.tokenizer, images.device)
        labels[:, : len(prompt) - 1] = -100  # the prompt is given, not predicted
        logits = model(pixel_values=images, input_ids=ids, attention_mask=mask).logits
        return {"logits": logits, "labels": labels}

    def loss_from(self, outputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return lm_loss(outputs["logits"], outputs["labels"]).sum() / (outputs["labels"][:, 1:] != -100).sum()

    def distill_loss(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], temperature: float):
        return token_distill(student["logits"], teacher["logits"], student["labels"], temperature)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        with evaluating(model):
            made = []
            for images, index in loader:
                made += zip(index.tolist(), generate_captions(model, self.tokenizer, images.to(device)))
        captions = dict(D.gather_objects(made))
        references = loader.dataset.references
        return caption_scores({i: references[i] for i in captions}, captions)

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        """Images with the prompt and a caption filling the decoder's generation length (teacher-forced)."""
        if model is None:
            raise UPopError("captioning example inputs need the model (its decoder's start token)")
        images = batch if isinstance(batch, torch.Tensor) else batch[0]
        device = next(model.parameters()).device
        prompt = prompt_ids(model, self.tokenizer, device)
        ids = torch.cat([prompt, prompt[-1:].expand(MAX_LENGTH - len(prompt))]).expand(len(images), -1)
        return {"pixel_values": images.to(device), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
