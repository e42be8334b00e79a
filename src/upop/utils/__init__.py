"""Leaf utilities: atomic files, the DDP helpers. They import torch and the standard library only."""
