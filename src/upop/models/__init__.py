"""Models by spec, as bundles (the module, its tokenizer, input size, normalisation and released-checkpoint key
conversion). Importing this package registers every built-in family: the built-in names, ``timm:ARCH``,
``hf:PATH``, ``open_clip:ARCH:WEIGHTS`` and ``segmenter:PATH``."""

from upop.models import builtin, hf, open_clip, timm  # noqa: F401  (registration, in the order help lists them)
from upop.models.bundle import MODEL_KINDS, Defaults, ModelBundle
from upop.models.checkpoints import load_weights, read_state_dict
from upop.models.registry import (
    Family,
    build,
    build_model,
    carries_weights,
    defaults,
    image_size_of,
    model_names,
    register_family,
    registered_families,
)
from upop.models.segmenter import family  # noqa: F401  (registration)

__all__ = [
    "MODEL_KINDS",
    "Defaults",
    "Family",
    "ModelBundle",
    "build",
    "build_model",
    "carries_weights",
    "defaults",
    "image_size_of",
    "load_weights",
    "model_names",
    "read_state_dict",
    "register_family",
    "registered_families",
]
