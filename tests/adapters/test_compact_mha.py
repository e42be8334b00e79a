"""CompactMultiheadAttention: before slicing it computes exactly what nn.MultiheadAttention computes (every mask
form, both layouts, with and without attention weights); after slicing it equals the masked module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from upop.adapters.compact_mha import CompactMultiheadAttention, compact_mha
from upop.core.structure import Slot, Structure, slice_structure


def _inputs(batch_first: bool, b: int = 2, lq: int = 5, e: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, lq, e, generator=g)
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal_float", "bool", "padding"])
def test_compact_equals_multihead_attention_at_full_width(batch_first, need_weights, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    compact = copy.deepcopy(mha)
    compact_mha(compact, 4, 4)
    assert isinstance(compact, CompactMultiheadAttention)
    x = _inputs(batch_first)
    kw: dict = {"need_weights": need_weights}
    if mask == "causal_float":
        kw["attn_mask"] = torch.full((5, 5), float("-inf")).triu(1)
    elif mask == "bool":
        kw["attn_mask"] = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.7
        kw["attn_mask"].fill_diagonal_(False)
    elif mask == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        want, want_w = mha(x, x, x, **kw)
        got, got_w = compact(x, x, x, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    else:
        assert got_w is None


def test_sliced_compact_equals_the_masked_module():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    keep = torch.tensor([0, 2, 3])
    masked = copy.deepcopy(mha)
    rows = torch.zeros(4)
    rows[keep] = 1
    with torch.no_grad():
        masked.in_proj_weight.mul_(rows.repeat(9).unsqueeze(1))
        masked.in_proj_bias.mul_(rows.repeat(9))
    s = Structure(
        "attn",
        "attn",
        4,
        rows=[Slot("attn.in_proj_weight", mha, 9, "in_proj_weight", "in_proj_bias")],
        cols=[Slot("attn.out_proj", mha.out_proj, 3)],
        heads=3,
        module=mha,
        resize=compact_mha,
    )
    slice_structure(s, keep)
    assert mha.in_proj_weight.shape == (27, 12) and mha.out_proj.in_features == 9 and mha.head_dim == 3
    x = _inputs(True)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x, attn_mask=mask)[0], masked(x, x, x, attn_mask=mask)[0])
