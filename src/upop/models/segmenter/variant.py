"""A released Segmenter: its ``variant.yml`` (read safely) and ``checkpoint.pth`` (read with ``weights_only=True``),
as a bundle: the model, its crop size, its normalisation and the checkpoint's key conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from upop.errors import UPopError
from upop.models.bundle import ModelBundle
from upop.models.checkpoints import load_weights
from upop.models.segmenter.modeling import build_segmenter

NORMALIZATION = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def drop_imagenet_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released checkpoint's state without the encoder's ImageNet head (not part of the segmentation model)."""
    return {k: v for k, v in state.items() if not k.startswith(("encoder.head.", "encoder.head_dist."))}


class _VariantLoader:
    """A YAML loader that reads plain data and the ``!!python/tuple`` tag the original training script writes (as
    a list); every other Python tag is refused, nothing is executed."""

    @staticmethod
    def make() -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
        return Loader


def read_variant(path: Path) -> dict[str, Any]:
    import yaml

    try:
        variant = yaml.load(path.read_text(), Loader=_VariantLoader.make())  # a SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise UPopError(f"cannot read the Segmenter variant {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise UPopError(f"{path} is not a Segmenter variant.yml (no net_kwargs)")
    return variant


def variant_file(path: Path) -> Path:
    """The variant.yml of the Segmenter at ``path`` (a checkpoint.pth or its folder)."""
    return (path if path.is_dir() else path.parent) / "variant.yml"


def variant_image_size(path: Path) -> int | None:
    """The crop size of the Segmenter at ``path`` (a checkpoint.pth or its folder), from its variant.yml (None when
    there is none: loading the model then says why)."""
    variant = variant_file(path)
    if not variant.is_file():
        return None
    size = read_variant(variant)["net_kwargs"].get("image_size")
    return int(size[0] if isinstance(size, (list, tuple)) else size) if size else None


def load_segmenter(path: Path, n_cls: int | None = None, weights: bool = True) -> ModelBundle:
    """A Segmenter from a released ``checkpoint.pth`` (or its folder) and the ``variant.yml`` beside it; with
    ``weights``, its weights (read with ``weights_only=True``). ``n_cls`` must match the checkpoint's classes."""
    checkpoint = path / "checkpoint.pth" if path.is_dir() else path
    variant_file = checkpoint.parent / "variant.yml"
    if not variant_file.is_file():
        raise UPopError(f"no variant.yml beside {checkpoint} (a Segmenter checkpoint comes with its variant.yml)")
    net = read_variant(variant_file)["net_kwargs"]
    if n_cls is not None and int(net.get("n_cls", n_cls)) != n_cls:
        raise UPopError(f"{variant_file} has {net.get('n_cls')} classes; the data has {n_cls}")
    size = net["image_size"]
    bundle = ModelBundle(
        build_segmenter(net),
        f"segmenter:{path}",
        "segmenter",
        image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
        normalization=NORMALIZATION.get(net.get("normalization", "vit"), NORMALIZATION["vit"]),
        convert_state=drop_imagenet_head,
    )
    if weights:
        load_weights(bundle, checkpoint)
    return bundle
