"""NLVR (natural-language visual reasoning over two images, NLVR2): is a statement about a pair of images true?
Cross-entropy over (False, True); the metric is accuracy.

Data: the built-in shapes world's statements about scene pairs (``upop.data.statements``: balanced labels, every
statement needs both images), or BLIP's NLVR2 annotation files: ``DIR/*train.json`` (training), ``DIR/*dev.json``
(selection) and ``DIR/*test.json`` (report; test-P), each a JSON list of ``{"images": [left, right], "sentence": str,
"label": "True" | "False"}`` with images under ``--image-root`` (default ``DIR``).

Models take ``(pixel_values (B, 2, 3, S, S), input_ids, attention_mask)`` and return logits (B, 2); statements are
tokenised by the tokenizer of the model's bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from upop.data.augment import task_preset
from upop.data.blip_augment import augmented
from upop.data.config import DataConfig
from upop.data.images import CLIP_MEAN, CLIP_STD, normalise_clip
from upop.data.nlvr2 import SPLITS, Statements, folder_split
from upop.data.splits import ROLES, Splits, builtin_roles
from upop.data.statements import statement_split
from upop.data.text import STATEMENT_WORDS, pre_caption
from upop.errors import UPopError
from upop.tasks.base import Task, evaluating, register_task


@register_task
class Nlvr(Task):
    name = "nlvr"
    main_metric = "accuracy"
    model_kind = "nlvr"

    def datasets(self, data: DataConfig, roles: tuple[str, ...] = ROLES) -> Splits:
        made: dict[str, Any] = {}
        preset = task_preset(data.augment, data.builtin, ("none", "blip"), self.name, auto="none")
        if data.builtin:
            for name, size, seed in builtin_roles(data, roles):
                load, sentences, labels = statement_split(size, seed, data.image_size, data.noise, normalise_clip)
                if name == "train" and preset == "blip":
                    load = augmented(load, data.image_size, CLIP_MEAN, CLIP_STD)
                made[name] = (load, sentences, labels, f"built-in statements on scene pairs (seed {seed})")
        else:
            root = Path(data.root)
            if not root.is_dir():
                raise UPopError(f"dataset folder {root} does not exist")
            image_root = Path(data.image_root) if data.image_root else root
            for name, split, role in SPLITS:
                if name not in roles or name == "select" and data.select_size == 0:
                    continue
                augment = preset if name == "train" else "none"
                made[name] = folder_split(root, image_root, split, role, data.image_size, augment)
        about = {
            name: {"source": source, "size": len(sentences), "true": int(labels.sum())}
            for name, (_, sentences, labels, source) in made.items()
        }
        swap = self.options.nlvr_swap
        if "train" in about:
            about["train"]["augment"] = preset + (", left/right swap" if swap else "")
        sets = {name: Statements(*made[name][:3], swap=swap and name == "train") for name in made}
        return Splits(sets.get("train"), sets.get("select"), sets["report"], about)

    @classmethod
    def num_outputs(cls, data: DataConfig) -> int:
        return 2  # (False, True)

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, sentences, _ = batch
        return model(pixel_values=images, **self.statements(sentences, images.device))

    def loss_from(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), batch[2])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        metric = MulticlassAccuracy(2, average="micro").to(device)
        with evaluating(model):
            for images, sentences, labels in loader:
                images = images.to(device)
                logits = model(pixel_values=images, **self.statements(sentences, device)).float()
                metric.update(logits, labels.to(device))
        return {"accuracy": 100.0 * float(metric.compute())}

    def example_inputs(self, batch: Any, model: nn.Module | None = None) -> Any:
        if model is None:
            raise UPopError("NLVR example inputs need the model (its device)")
        images, sentences = batch[0], list(batch[1])
        device = next(model.parameters()).device
        return {"pixel_values": images.to(device), **self.statements(sentences, device)}

    def statements(self, sentences: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Statements as BLIP's NLVR2 code feeds them (``pre_caption``, 40 words), tokenised."""
        return self.tokenize([pre_caption(s, STATEMENT_WORDS) for s in sentences], device)
