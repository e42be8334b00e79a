"""What building a model gives: the module and the facts a task needs about it, typed (no attributes glued onto the
module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per RGB channel
StateDict = dict[str, Any]

MODEL_KINDS = {
    "classifier": "an image classifier",
    "dual_encoder": "a dual (image-text) encoder",
    "nlvr": "an NLVR model (two images and a statement)",
    "captioner": "a captioning model (an image encoder and a text decoder)",
    "vqa": "a VQA model (image and question encoders and an answer decoder)",
    "segmenter": "a segmentation model (Segmenter)",
}


@dataclass(frozen=True)
class Defaults:
    """What a model spec says about its inputs before it is built: the square input size it is built for and the
    normalisation its weights were trained with (None: the model is asked once built / the task's default)."""

    image_size: int | None = None
    normalization: Normalization | None = None


@dataclass
class ModelBundle:
    """A built model and the facts a task needs about it.

    Attributes:
        model: the module (dense, weights loaded when asked).
        spec: the model spec it was built from (``vit-tiny``, ``timm:ARCH``, ``hf:PATH``...).
        kind: what it is for (a key of ``MODEL_KINDS``).
        image_size: the square input side it was built for.
        tokenizer: for models that read text: ``tokenizer(texts)`` -> {"input_ids", "attention_mask"} (or a tensor of
            ids), and ``tokenizer.decode(ids)`` -> text for generative models; None for image-only models.
        normalization: (mean, std) the weights were trained with, where the family fixes it (a released Segmenter's
            variant.yml); None: the task's default for its data.
        convert_state: maps a released checkpoint's state dict (another code base's key names) to this model's keys;
            None: checkpoints are read as they are.
        on_load: called with the model and a checkpoint's raw state dict before it is loaded, to take on the
            conventions of the code base that wrote it where this model's differ (e.g. BLIP's ViT layer-norm eps).
        notes: what building the model changed or assumed that a user should know (printed by the jobs).
    """

    model: nn.Module
    spec: str
    kind: str
    image_size: int | None = None
    tokenizer: Any = None
    normalization: Normalization | None = None
    convert_state: Callable[[StateDict], StateDict] | None = None
    on_load: Callable[[nn.Module, StateDict], None] | None = None
    notes: list[str] = field(default_factory=list)
