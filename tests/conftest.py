"""Shared test set-up: two threads, tests/helpers.py importable, and one cache of measured widths for the session
(subprocesses inherit it), kept out of the user's home."""

from __future__ import annotations

import os
import sys
import tempfile

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("UPOP_CACHE_DIR", tempfile.mkdtemp(prefix="upop-test-cache-"))
