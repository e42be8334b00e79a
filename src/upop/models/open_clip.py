"""``open_clip:ARCH[:WEIGHTS]``: an open_clip CLIP (``nn.MultiheadAttention`` with a packed ``in_proj_weight``), from
an architecture name or a model-config JSON, with a local state dict in open_clip or OpenAI key format (read without
executing pickled code). Needs the ``open_clip`` extra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from upop.errors import UPopError
from upop.models.bundle import ModelBundle
from upop.models.checkpoints import load_weights
from upop.models.registry import Family, register_family
from upop.utils.extras import require


def _load_open_clip(arg: str, load: bool = True) -> ModelBundle:
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
        model = open_clip.create_model(arch, pretrained=None)
        tokenizer = open_clip.get_tokenizer(arch)
    if weights and load:
        load_weights(model, weights)
    return ModelBundle(model, f"open_clip:{arg}", "dual_encoder", tokenizer=tokenizer)


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

    def build(self, arg: str, kind: str, num_outputs: int, image_size: int | None, weights: bool) -> ModelBundle:
        return _load_open_clip(arg, weights)


register_family(OpenClip())
