"""The registry of model families: every adapter registered here is found by ``find_adapter`` and is put under every
property test. Importing ``upop.adapters`` registers the built-in families."""

from __future__ import annotations

from torch import nn

from upop.core.adapter import Adapter, Composite
from upop.errors import UPopError

_REGISTRY: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Add ``adapter`` to the registry (names must be unique). Registered adapters are the ones every property test
    runs over."""
    if not adapter.name or adapter.name in _REGISTRY:
        raise ValueError(f"adapter name {adapter.name!r} is empty or already registered")
    _REGISTRY[adapter.name] = adapter
    return adapter


def registered_adapters() -> dict[str, Adapter]:
    return dict(_REGISTRY)


def supported() -> str:
    return "; ".join(f"{a.name} ({a.description})" for a in _REGISTRY.values())


def find_adapter(model: nn.Module, name: str | None = None) -> Adapter:
    """The adapter for ``model`` (or the one called ``name``; "a+b" names a composite): every registered family the
    model holds blocks of, one adapter or their composite. Raises UPopError listing what is supported."""
    if name is not None:
        unknown = [n for n in name.split("+") if n not in _REGISTRY]
        if unknown:
            raise UPopError(f"no adapter named {unknown[0]!r}; supported: {supported()}")
        parts = [_REGISTRY[n] for n in name.split("+")]
        return parts[0] if len(parts) == 1 else Composite(parts)
    parts = [adapter for adapter in _REGISTRY.values() if adapter.matches(model)]
    if not parts:
        raise UPopError(f"no UPop adapter for a {type(model).__name__}; supported: {supported()}")
    return parts[0] if len(parts) == 1 else Composite(parts)
