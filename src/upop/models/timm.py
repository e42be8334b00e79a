"""``timm:ARCH``: any timm architecture as an image classifier, freshly initialised (weights come from
``--pretrained``; nothing is downloaded)."""

from __future__ import annotations

from upop.errors import UPopError
from upop.models.bundle import ModelBundle
from upop.models.registry import Family, register_family


class Timm(Family):
    name = "timm"
    usage = (("classifier", "timm:ARCH", "any timm architecture, e.g. timm:deit_small_patch16_224"),)

    def build(self, arg: str, kind: str, num_outputs: int, image_size: int | None, weights: bool) -> ModelBundle:
        import timm

        if arg not in timm.list_models():
            raise UPopError(f"timm has no architecture {arg!r}")
        model = None
        if image_size:
            try:
                model = timm.create_model(arg, pretrained=False, num_classes=num_outputs, img_size=image_size)
            except TypeError:
                pass  # a family without a fixed input size (e.g. a CNN): no img_size argument
        if model is None:
            model = timm.create_model(arg, pretrained=False, num_classes=num_outputs)
        return ModelBundle(model, f"timm:{arg}", kind)


register_family(Timm())
