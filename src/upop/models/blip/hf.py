"""BLIP models from local HF transformers BLIP directories (config.json, weights, tokenizer files), as bundles:
the model with its tokenizer and the released checkpoints' key conversion."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upop.errors import UPopError
from upop.models.blip.checkpoints import converter, tie_lm_head
from upop.models.blip.modeling import BlipNlvr, BlipRetrieval, BlipVqa
from upop.models.bundle import ModelBundle
from upop.models.checkpoints import fit_positions, read_state_dict

HF_TO_TWIN: tuple[tuple[str, str], ...] = (  # an HF BLIP text encoder's single cross-attention, into each branch
    (r"\.crossattention\.self\.", r".crossattention.branches.{i}.self."),
    (r"\.crossattention\.output\.dense\.", r".crossattention.branches.{i}.dense."),
    (r"\.crossattention\.output\.LayerNorm\.", r".crossattention.LayerNorm."),
)


class HFTokens:
    """An HF tokenizer as the tasks call it: ``tokens(texts)`` -> {"input_ids", "attention_mask"} padded to the
    longest text and cut at ``length`` tokens; ``decode(ids)`` -> text without special tokens."""

    def __init__(self, tokenizer: Any, positions: int) -> None:
        self.tokenizer = tokenizer
        self.length = min(int(getattr(tokenizer, "model_max_length", 35) or 35), positions)

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``max_length``: a task's cap (BLIP's: 35 tokens for retrieval captions and VQA questions, 40 for
        captions), within the model's positions."""
        length = min(self.length, max_length or self.length)
        out = self.tokenizer(texts, padding="longest", truncation=True, max_length=length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    vocabularies = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model")
    if not any(any(path.glob(pattern)) for pattern in vocabularies):  # transformers would build an empty one
        raise UPopError(f"{path} has no usable tokenizer files (none of {', '.join(vocabularies)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UPopError(f"{path} has no usable tokenizer files ({str(e).splitlines()[0][:120]})") from None


def _hf_blip(
    path: Path, weights: bool, image_size: int | None = None, encoder: bool = True
) -> tuple[Any, Any, int, dict[str, torch.Tensor], list[str]]:
    """(config, tokenizer function, encoder token id (with ``encoder``: the models whose text encoder reads it),
    state dict or {} without ``weights``, notes) of a local HF BLIP directory, its vision config set to
    ``image_size`` when given; one clear line when it is not one or has no tokenizer."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UPopError(f"{path} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "blip":
        raise UPopError(f"{path} holds a {config.model_type!r} model, not an HF BLIP model")
    if image_size:
        config.vision_config.image_size = image_size
    tokenizer = hf_tokenizer(path)
    enc, notes = encoder_token(tokenizer, config.text_config.vocab_size, path) if encoder else (-1, [])
    state: dict[str, torch.Tensor] = {}
    if weights:
        for f in sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")):
            state.update(read_state_dict(f))
    return config, HFTokens(tokenizer, config.text_config.max_position_embeddings), enc, state, notes


def encoder_token(tokenizer: Any, vocab_size: int, path: Path) -> tuple[int, list[str]]:
    """The id of BLIP's encoder token ``[ENC]``, which NLVR, retrieval's ITM and VQA put first in the text they
    encode; added as BLIP's ``init_tokenizer`` adds it (``[DEC]`` as the beginning-of-sentence token, then ``[ENC]``:
    30522 and 30523 after BERT's vocabulary) when the tokenizer lacks it, and said so."""
    if "[ENC]" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids("[ENC]"), []
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    enc = tokenizer.convert_tokens_to_ids("[ENC]")
    if enc >= vocab_size:
        raise UPopError(
            f"{path}: its tokenizer has no [ENC] token and the model's vocabulary ({vocab_size}) has no room for one "
            f"(id {enc}); BLIP's models are built with [DEC] and [ENC] after BERT's 30522 words"
        )
    return enc, [f"{path}: the tokenizer had no [ENC] token; added as BLIP adds it (id {enc})"]


def layer_norm_as_released(model: nn.Module, state: dict[str, Any]) -> None:
    """A checkpoint released by BLIP's own code (keys ``visual_encoder.*``) was trained with its ViT's layer norms
    at eps 1e-6, not the 1e-5 of HF's BLIP configs: the vision tower takes the released eps."""
    if any(k.startswith("visual_encoder.") for k in state):
        vision = getattr(model, "vision_model", None)
        for module in vision.modules() if vision is not None else ():
            if isinstance(module, nn.LayerNorm):
                module.eps = 1e-6


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], fresh: Callable[[str], bool], what: str) -> None:
    """Fill ``model`` from ``state`` (patch position embeddings of another input size interpolated); every key but
    the ``fresh`` ones must be there."""
    own = model.state_dict()
    state = fit_positions(state, own)
    missing = [k for k in own if k not in state and not fresh(k)]
    if missing:
        raise UPopError(f"{what}: missing {', '.join(missing[:3])}")
    wrong = [
        f"{k} ({tuple(state[k].shape)} vs {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise UPopError(f"{what}: wrong shape {', '.join(wrong[:3])}")
    model.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}})


def _bundle(model: nn.Module, path: Path, kind: str, tokenize: HFTokens, notes: list[str]) -> ModelBundle:
    return ModelBundle(
        model,
        f"hf:{path}",
        kind,
        tokenizer=tokenize,
        convert_state=converter(kind),
        on_load=layer_norm_as_released,
        notes=notes,
    )


def load_hf_nlvr(path: Path, weights: bool = True, image_size: int | None = None) -> ModelBundle:
    """``BlipNlvr`` from a local HF BLIP directory (e.g. an image-text-matching model): its vision and text configs,
    its tokenizer, and (``weights``) its vision encoder and text encoder, the one cross-attention copied into both
    branches, as BLIP initialises NLVR from a pre-trained model. The merge layers and the head start fresh."""
    config, tokenize, enc, state, notes = _hf_blip(path, weights, image_size)
    model = BlipNlvr(config.vision_config, config.text_config, enc)
    if state:
        mapped = {}
        for key, value in state.items():
            if key.startswith(("vision_model.", "text_encoder.")):
                for i in (0, 1):
                    new = key
                    for pattern, replacement in HF_TO_TWIN:
                        new = re.sub(pattern, replacement.format(i=i), new)
                    mapped[new] = value
        fresh = lambda k: "merge_layer" in k or k.startswith("cls_head.")  # noqa: E731
        _load_into(model, mapped, fresh, f"{path} does not hold BLIP's vision and text encoders")
    return _bundle(model, path, "nlvr", tokenize, notes)


def load_hf_retrieval(path: Path, weights: bool = True, image_size: int | None = None) -> ModelBundle:
    """``BlipRetrieval`` from a local HF BLIP directory (``BlipForImageTextRetrieval``: the same key names), with its
    tokenizer; ``temp`` (not in HF's class) starts at 0.07."""
    config, tokenize, enc, state, notes = _hf_blip(path, weights, image_size)
    model = BlipRetrieval(config.vision_config, config.text_config, config.image_text_hidden_size, enc)
    if state:
        _load_into(model, state, lambda k: k == "temp", f"{path} is not a BLIP image-text retrieval model")
    return _bundle(model, path, "dual_encoder", tokenize, notes)


def load_hf_captioner(path: Path, weights: bool = True, image_size: int | None = None) -> ModelBundle:
    """HF ``BlipForConditionalGeneration`` from a local directory (e.g. blip-image-captioning-base), with its
    tokenizer."""
    from transformers import BlipForConditionalGeneration

    config, tokenize, _, state, notes = _hf_blip(path, weights, image_size, encoder=False)
    model = BlipForConditionalGeneration(config)
    if state:
        state = tie_lm_head(state, "text_decoder.")
        _load_into(model, state, lambda k: False, f"{path} is not a BLIP captioning model")
    return _bundle(model, path, "captioner", tokenize, notes)


def load_hf_vqa(path: Path, weights: bool = True, image_size: int | None = None) -> ModelBundle:
    """``BlipVqa`` from a local HF BLIP directory (``BlipForQuestionAnswering``: the same key names), with its
    tokenizer."""
    config, tokenize, enc, state, notes = _hf_blip(path, weights, image_size)
    model = BlipVqa(config.vision_config, config.text_config, enc)
    if state:
        state = tie_lm_head(state, "text_decoder.")
        _load_into(model, state, lambda k: False, f"{path} is not a BLIP visual question answering model")
    return _bundle(model, path, "vqa", tokenize, notes)


LOADERS: dict[str, Callable[[Path, bool, int | None], ModelBundle]] = {
    "nlvr": load_hf_nlvr,
    "dual_encoder": load_hf_retrieval,
    "captioner": load_hf_captioner,
    "vqa": load_hf_vqa,
}
