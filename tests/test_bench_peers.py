"""benchmarks/bench_peers.py reads Torch-Pruning's decision off the weights it pruned: that reading must be exact (the
peer itself is a benchmark-only extra, not installed for the tests)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_benchmark


@pytest.mark.parametrize("groups, block", [(1, 1), (6, 1), (2, 5)])
def test_kept_rows_are_read_off_a_row_pruned_weight(groups, block):
    peers = load_benchmark("bench_peers")
    n, width = 12, 7
    weight = torch.randn(groups * n * block, width, generator=torch.Generator().manual_seed(0))
    kept = torch.tensor([0, 3, 4, 9, 11])
    pruned = weight.view(groups, n, block, width)[:, kept].reshape(-1, width)  # the same elements in every group
    found = peers._kept_rows(weight, pruned, groups, block)
    assert len(found) == groups and all(torch.equal(k, kept) for k in found)
    with pytest.raises(RuntimeError, match="changed rows"):
        peers._kept_rows(weight, pruned + 1e-3, groups, block)
