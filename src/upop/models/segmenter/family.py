"""``segmenter:PATH``: a released Segmenter (``checkpoint.pth`` and the ``variant.yml`` beside it)."""

from __future__ import annotations

from pathlib import Path

from upop.models.bundle import Defaults, ModelBundle
from upop.models.registry import Family, register_family
from upop.models.segmenter.variant import NORMALIZATION, load_segmenter, read_variant, variant_file, variant_image_size


class SegmenterFamily(Family):
    name = "segmenter"
    usage = (("segmenter", "segmenter:PATH", "a released checkpoint.pth with its variant.yml"),)

    def defaults(self, arg: str) -> Defaults:
        """The crop size and normalisation of its variant.yml (none when there is none: loading then says why)."""
        variant = variant_file(Path(arg))
        if not variant.is_file():
            return Defaults()
        name = read_variant(variant)["net_kwargs"].get("normalization", "vit")
        return Defaults(variant_image_size(Path(arg)), NORMALIZATION.get(name, NORMALIZATION["vit"]))

    def carries_weights(self, arg: str) -> bool:
        path = Path(arg)
        return (path / "checkpoint.pth" if path.is_dir() else path).is_file()

    def build(self, arg: str, kind: str, num_outputs: int, image_size: int | None, weights: bool) -> ModelBundle:
        return load_segmenter(Path(arg), num_outputs, weights)


register_family(SegmenterFamily())
