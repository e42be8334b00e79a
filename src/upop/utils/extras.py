"""Optional parts: a clear one-line error naming the extra to install when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from upop.errors import UPopError

EXTRAS = {  # import name -> the extra of ``pip install 'upop[EXTRA]'`` that brings it
    "open_clip": "open_clip",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "export",
    "pycocoevalcap": "caption",
    "matplotlib": "plots",
}


def available(module: str) -> bool:
    """Whether the optional ``module`` can be imported (found without importing it)."""
    import importlib.util
    import sys

    if module in sys.modules:  # imported already, or marked unimportable (None)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def require(module: str, what: str) -> ModuleType:
    """``import module``, or UPopError naming the extra that installs it (``what``: the feature that needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0])
        how = f"pip install 'upop[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise UPopError(f"{what} needs the optional package {module.split('.')[0]} ({e}); install it: {how}") from None
