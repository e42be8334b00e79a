"""Annotation files: the JSON lists of the real formats' annotation files, and finding one by its split's suffix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from upop.errors import UPopError


def read_annotation(path: Path, fields: str) -> list[Any]:
    """The non-empty JSON list of an annotation file; one clear line when it cannot be read, is not JSON or is not a
    non-empty list (``fields`` names what its entries hold, for that line)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UPopError(f"cannot read the annotation file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UPopError(f"annotation file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(entries, list) or not entries:
        raise UPopError(f"annotation file {path} must be a non-empty JSON list of {{{fields}}} entries")
    return entries
