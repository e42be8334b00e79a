"""Segmenter (Strudel et al., ICCV 2021): the model with the released checkpoints' names, and its variant.yml."""
