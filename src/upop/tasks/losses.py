"""Losses the generative tasks share: the decoder's LM cross-entropy with BLIP's label smoothing, and distillation
on the next-token distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upop.tasks.base import kl_distill

LABEL_SMOOTHING = 0.1


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed next-token cross-entropy (label smoothing 0.1, as BLIP's decoder) over labels != -100."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
        label_smoothing=LABEL_SMOOTHING,
    )
    return loss.view(targets.shape).sum(1)


def token_distill(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float):
    """KD on the next-token distributions of the scored positions only."""
    scored = labels[:, 1:] != -100
    return kl_distill(student[:, :-1][scored], teacher[:, :-1][scored], temperature)
