"""``hf:PATH``: a local HF transformers directory (config.json, weights, tokenizer files for text models): an image
classifier (ViT, DeiT: ``AutoModelForImageClassification``), a ``CLIPModel``, or a BLIP for NLVR, retrieval,
captioning or VQA (``upop.models.blip.hf``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from upop.errors import UPopError
from upop.models.bundle import ModelBundle
from upop.models.checkpoints import fit_positions, load_state
from upop.models.registry import Family, register_family


def _load_hf(path: Path, num_classes: int, weights: bool = True, image_size: int | None = None) -> Any:
    from transformers import AutoConfig, AutoModelForImageClassification
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # one line per error on stderr, no loading bars

    if not (path / "config.json").is_file():
        raise UPopError(f"{path} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if getattr(config, "num_labels", None) != num_classes:
        labels = {i: str(i) for i in range(num_classes)}  # a new head for this data set's classes
        kwargs.update(
            num_labels=num_classes,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True,
        )
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not (has_weights and weights):
        config_kwargs = {k: v for k, v in kwargs.items() if k in ("num_labels", "id2label", "label2id")}
        for key, value in config_kwargs.items():
            setattr(config, key, value)
        if image_size:
            config.image_size = image_size
        return AutoModelForImageClassification.from_config(config)
    model = AutoModelForImageClassification.from_pretrained(str(path), **kwargs)
    if image_size and image_size != model.config.image_size:
        model = _at_size(model, lambda c: setattr(c, "image_size", image_size), AutoModelForImageClassification)
    return model


def _at_size(model: Any, set_size: Any, cls: Any) -> Any:
    """``model`` rebuilt for another input size (``set_size`` changes a copy of its config, ``cls.from_config``
    builds it), its weights carried over with the patch position embeddings interpolated."""
    config = copy.deepcopy(model.config)
    set_size(config)
    resized = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    own = resized.state_dict()
    state = {k: v for k, v in fit_positions(model.state_dict(), own).items() if not k.endswith("position_ids")}
    load_state(resized, {**own, **state}, f"the {type(model).__name__} at {config}")
    return resized


def _load_hf_clip(path: Path, weights: bool = True, image_size: int | None = None) -> ModelBundle:
    from transformers import AutoConfig, AutoTokenizer, CLIPModel
    from transformers.utils.logging import disable_progress_bar

    if not (path / "config.json").is_file():
        raise UPopError(f"{path} is not an HF model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "clip":
        raise UPopError(f"{path} holds a {config.model_type!r} model; the retrieval task needs a CLIP or BLIP model")
    try:  # before the weights: a directory without a tokenizer fails fast
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UPopError(f"{path} has no usable tokenizer files ({str(e).splitlines()[0][:120]})") from None
    disable_progress_bar()  # one line per error on stderr, no loading bars
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if has_weights and weights:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        if image_size and image_size != config.vision_config.image_size:
            model = _at_size(model, lambda c: setattr(c.vision_config, "image_size", image_size), CLIPModel)
    else:
        if image_size:
            config.vision_config.image_size = image_size
        model = CLIPModel(config)
    length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), config.text_config.max_position_embeddings)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))

    return ModelBundle(model, f"hf:{path}", "dual_encoder", tokenizer=tokenize)


def _model_type(path: Path) -> str:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UPopError(f"{path} is not an HF model directory (no config.json)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True).model_type


class HF(Family):
    name = "hf"
    usage = (
        ("classifier", "hf:PATH", "an HF ViT or DeiT directory"),
        ("dual_encoder", "hf:PATH", "CLIPModel or BLIP"),
        ("nlvr", "hf:PATH", "an HF BLIP"),
        ("captioner", "hf:PATH", "an HF BLIP"),
        ("vqa", "hf:PATH", "an HF BLIP"),
    )

    def carries_weights(self, arg: str) -> bool:
        return any(Path(arg).glob("*.safetensors")) or any(Path(arg).glob("*.bin"))

    def build(self, arg: str, kind: str, num_outputs: int, image_size: int | None, weights: bool) -> ModelBundle:
        from upop.models.blip.hf import LOADERS

        path = Path(arg)
        if kind == "classifier":
            return ModelBundle(_load_hf(path, num_outputs, weights, image_size), f"hf:{path}", kind)
        if kind == "dual_encoder" and _model_type(path) != "blip":
            return _load_hf_clip(path, weights, image_size)
        return LOADERS[kind](path, weights, image_size)


register_family(HF())
