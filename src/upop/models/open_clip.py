"""``open_clip:ARCH[:WEIGHTS]``: an open_clip CLIP (``nn.MultiheadAttention`` with a packed ``in_proj_weight``), from
an architecture name or a model-config JSON, with a local state dict in open_clip or OpenAI key format (read without
executing pickled code). Needs the ``open_clip`` extra."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from upop.errors import UPopError
from upop.models.bundle import ModelBundle
from upop.models.checkpoints import load_weights
from upop.models.registry import Family, register_family
from upop.utils.extras import require


def _load_open_clip(arg: str, load: bool = True, image_size: int | None = None) -> ModelBundle:
    """``ARCH[:WEIGHTS]``: ARCH an open_clip model name or a model-config JSON file ({"embed_dim", "vision_cfg",
    "text_cfg"}); WEIGHTS a local state dict (open_clip or OpenAI key format), read without executing pickled code."""
    open_clip = require("open_clip", "an open_clip model")
    arch, _, weights = arg.partition(":")
    if arch.endswith(".json"):
        try:
            cfg = json.loads(Path(arch).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UPopError(f"cannot read the open_clip model config {arch}: {e}") from None
        try:
            model = open_clip.model.CLIP(**cfg)
        except TypeError as e:
            raise UPopError(f"{arch} is not an open_clip model config: {e}") from None
        tokenizer = _open_clip_tokenizer(model, arch)
    else:
        if arch not in open_clip.list_models():
            raise UPopError(f"open_clip has no architecture {arch!r} (give a name from open_clip.list_models())")
        # open_clip moves the model to a device when it builds it: the device new parameters are made on (the meta
        # device while a compressed model's architecture is built without weights)
        device = nn.Linear(1, 1).weight.device
        model = open_clip.create_model(arch, pretrained=None, device=device, force_image_size=image_size)
        tokenizer = open_clip.get_tokenizer(arch)
    bundle = ModelBundle(model, f"open_clip:{arg}", "dual_encoder", tokenizer=tokenizer, convert_state=without_momentum)
    if weights and load:
        load_weights(bundle, weights)
    return bundle


MOMENTUM = re.compile(r"(^|\.)[a-z_]+_m(\.|$)|^(image|text|idx|ptr)_queue$")


def without_momentum(state: dict[str, Any]) -> dict[str, Any]:
    """A CLIP state dict as UPop's retrieval code saves it (OpenAI key names, plus the momentum encoders ``visual_m``,
    ``transformer_m``, ``token_embedding_m``... and the feature queues) without the momentum encoders and queues,
    which only its training used; any other state dict unchanged."""
    return {k: v for k, v in state.items() if not MOMENTUM.search(k)}


def _open_clip_tokenizer(model: nn.Module, arch: str) -> Any:
    """The tokenizer of a CLIP built from a config file: open_clip's BPE tokenizer for its vocabulary size, the
    built-in word tokenizer for the shapes-world vocabulary (e.g. a tiny open_clip trained on the built-in data)."""
    from open_clip.tokenizer import SimpleTokenizer

    from upop.data.captions import VOCAB, WordTokenizer

    vocab, context = model.vocab_size, model.context_length
    if vocab == len(VOCAB):
        return WordTokenizer(context_length=context)
    bpe = SimpleTokenizer(context_length=context)
    if vocab < len(bpe.encoder):
        raise UPopError(
            f"{arch}: a text vocabulary of {vocab} fits neither open_clip's tokenizer ({len(bpe.encoder)} tokens) "
            f"nor the built-in captions' ({len(VOCAB)} words)"
        )
    return bpe


class OpenClip(Family):
    name = "open_clip"
    usage = (("dual_encoder", "open_clip:ARCH:WEIGHTS", "ARCH: an open_clip name or a model-config JSON"),)

    def carries_weights(self, arg: str) -> bool:
        return bool(arg.partition(":")[2])  # ARCH:WEIGHTS

    def build(self, arg: str, kind: str, num_outputs: int, image_size: int | None, weights: bool) -> ModelBundle:
        return _load_open_clip(arg, weights, image_size)


register_family(OpenClip())
