"""Shared test set-up: two threads, and tests/helpers.py importable."""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
sys.path.insert(0, os.path.dirname(__file__))
