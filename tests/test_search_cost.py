"""benchmarks/search_cost.py at tiny size: it runs, and a search step stays cheap in what this machine can count."""

from __future__ import annotations

from helpers import load_benchmark


def test_a_search_step_adds_a_bounded_number_of_ops_per_masked_projection_and_little_memory(tmp_path):
    search_cost = load_benchmark("search_cost")
    argv = "--models vit-micro,clip-micro --batch 4 --rounds 1 --steps 1 --memory-steps 1".split()
    result = search_cost.main([*argv, "--out", str(tmp_path / "r.json")])
    for name, row in result["models"].items():
        ops, memory = row["aten_ops"], row["memory"]
        assert row["step_s"]["plain"] > 0 and row["step_s"]["search"] > 0, name
        assert ops["search"] > ops["plain"] and ops["masked_slots"] == {"vit-micro": 4, "clip-micro": 16}[name]
        assert memory["search"]["total_mib"] > memory["plain"]["total_mib"] > 0, name
        # what the search saves for the backward beyond a plain step: one masked copy of each row projection's weight
        # and bias, no activation-sized tensor (the masks scale weights, not outputs)
        added = memory["search"]["saved_mib"] - memory["plain"]["saved_mib"]
        assert 0 < added <= memory["search"]["masked_weights_mib"] * 1.01, name
    # the ops the masks add per step grow with the masked projections, not with the batch or the layers' width:
    # about 40 per projection today (forward views and multiplies, their backward, the mask gradient's reduction)
    assert result["models"]["clip-micro"]["aten_ops"]["added_per_slot"] <= 50
    assert (tmp_path / "r.json").is_file()
