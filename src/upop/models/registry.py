"""Models by spec: a registry of families, each owning the specs it builds (``vit-tiny``, ``timm:ARCH``, ``hf:PATH``,
``open_clip:ARCH:WEIGHTS``, ``segmenter:PATH``). ``build`` returns a ``ModelBundle``; nothing is downloaded.

A family is one file of this package ending in one ``register_family`` call (the pattern of the adapters): it says
which specs are its own, which kinds of model it builds, and how to build one."""

from __future__ import annotations

from torch import nn

from upop.errors import UPopError
from upop.models.bundle import MODEL_KINDS, Defaults, ModelBundle


class Family:
    """A model family. A subclass provides exactly: ``name`` (the spec prefix, ``timm`` in ``timm:ARCH``),
    ``usage`` (how its specs read, per kind of model, for help and errors) and ``build``; ``owns``, ``kinds_of``
    and ``defaults`` have defaults."""

    name: str = ""
    # (kind, how a spec reads, what it names: "" or a few words), e.g. ("classifier", "timm:ARCH", "")
    usage: tuple[tuple[str, str, str], ...] = ()

    def owns(self, spec: str) -> str | None:
        """The argument of ``spec`` when this family builds it (``timm:deit_small`` -> ``deit_small``), else None."""
        family, sep, arg = spec.partition(":")
        return arg if sep and arg and family == self.name else None

    def kinds_of(self, arg: str) -> tuple[str, ...]:
        """The kinds of model this spec can be built as."""
        return tuple(dict.fromkeys(kind for kind, _, _ in self.usage))

    def defaults(self, arg: str) -> Defaults:
        """Input size and normalisation known without building the model (none by default)."""
        return Defaults()

    def carries_weights(self, arg: str) -> bool:
        """Whether the spec names trained weights of its own (an HF directory's, a released checkpoint's), so a
        model can be evaluated without a checkpoint given apart; False by default."""
        return False

    def build(self, arg: str, kind: str, num_outputs: int, image_size: int | None, weights: bool) -> ModelBundle:
        """A dense model of ``kind`` with ``num_outputs`` outputs (a classifier's classes; 0 where there is no head)
        at ``image_size`` (None: the family's), its weights loaded when ``weights`` (else freshly initialised)."""
        raise NotImplementedError  # every registered family implements it


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (names must be unique)."""
    if not family.name or family.name in _FAMILIES:
        raise ValueError(f"model family name {family.name!r} is empty or already registered")
    _FAMILIES[family.name] = family
    return family


def registered_families() -> dict[str, Family]:
    return dict(_FAMILIES)


def model_names(kind: str | None = None) -> str:
    """The specs every family accepts, comma-separated; for ``kind`` only, with what each names, when given."""
    rows = [(spec, what) for f in _FAMILIES.values() for k, spec, what in f.usage if kind is None or k == kind]
    if kind is None:
        return ", ".join(dict.fromkeys(spec for spec, _ in rows))
    return ", ".join(dict.fromkeys(f"{spec} ({what})" if what else spec for spec, what in rows))


def resolve(spec: str) -> tuple[Family, str]:
    """The family that builds ``spec`` and the spec's argument; UPopError listing what is accepted otherwise."""
    for family in _FAMILIES.values():
        arg = family.owns(spec)
        if arg is not None:
            return family, arg
    raise UPopError(f"unknown model {spec!r}; accepted: {model_names()}")


def carries_weights(spec: str) -> bool:
    """Whether ``spec`` names trained weights of its own (``Family.carries_weights``)."""
    family, arg = resolve(spec)
    return family.carries_weights(arg)


def defaults(spec: str) -> Defaults:
    """The input size and normalisation ``spec`` is built for, known without building it."""
    family, arg = resolve(spec)
    return family.defaults(arg)


def build(
    spec: str, kind: str = "classifier", num_outputs: int = 0, image_size: int | None = None, weights: bool = True
) -> ModelBundle:
    """A dense model of the ``kind`` a task needs, with its tokenizer, input size, normalisation and checkpoint
    conversion (nothing is downloaded). ``weights=False`` builds the architecture of an ``hf:``, ``open_clip:`` or
    ``segmenter:`` spec without reading its weight files (for loading compressed weights into it)."""
    family, arg = resolve(spec)
    kinds = family.kinds_of(arg)
    if kind not in kinds:
        if len(kinds) == 1 and family.owns(spec) == spec:  # a built-in name: say what it is
            raise UPopError(f"{spec} is {MODEL_KINDS[kinds[0]]}; this task needs {MODEL_KINDS[kind]}")
        raise UPopError(f"model {spec!r} is not {MODEL_KINDS[kind]}; accepted: {model_names(kind)}")
    bundle = family.build(arg, kind, num_outputs, image_size, weights)
    if bundle.image_size is None:
        bundle.image_size = image_size or image_size_of(bundle.model)
    return bundle


def build_model(
    spec: str, num_classes: int = 0, image_size: int | None = None, kind: str = "classifier", weights: bool = True
) -> nn.Module:
    """Only the module of ``build`` (for image-only models, or when the tokenizer is not needed); ``num_classes``:
    its outputs."""
    return build(spec, kind, num_classes, image_size, weights).model


def image_size_of(model: nn.Module) -> int:
    """The square input size a built model expects, from its own attributes."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None):
        return int(pe.img_size[0])
    visual = getattr(model, "visual", None)  # open_clip
    if visual is not None and getattr(visual, "image_size", None):
        size = visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    config = getattr(model, "config", model)
    config = getattr(config, "vision_config", config)  # CLIP, BLIP: the vision tower's
    if config is not None and getattr(config, "image_size", None):
        size = config.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise UPopError(f"cannot tell the input size of a {type(model).__name__}; pass --image-size")
