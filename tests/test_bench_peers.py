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


def test_verdict_names_wins_ties_and_losses_against_the_best_other_row():
    peers = load_benchmark("bench_peers")
    win = peers.verdict({"upop": [94.0, 94.2, 94.1], "uniform": [93.5, 93.6, 93.4], "tp-taylor": [92.0, 92.1, 92.2]})
    assert win.startswith("`upop` (94.10) wins: 0.60 above the best other row, `uniform` (93.50)")
    tie = peers.verdict({"upop": [94.0, 94.1, 94.2], "uniform": [94.15, 94.15, 94.15]})
    assert "ties with the best other row, `uniform` (94.15)" in tie and "-0.05" in tie  # within the 0.1 floor
    noisy = peers.verdict({"upop": [93.0, 94.0, 95.0], "uniform": [94.5, 94.5, 94.5]})
    assert "ties" in noisy  # 0.5 behind, within the seeds' standard error of its mean (0.58)
    loss = peers.verdict({"upop": [93.0, 93.1, 93.2], "uniform": [94.0, 94.0, 94.0]})
    assert loss.startswith("`upop` (93.10) loses to `uniform` (94.00) by 0.90")


def test_tables_bold_each_budgets_best_and_say_the_verdict():
    peers = load_benchmark("bench_peers")

    def run(seed, score, last):
        return {
            "seed": seed,
            "score": score,
            "last": last,
            "before_retraining": 50.0,
            "removed": 0.5,
            "speedup": 1.4,
            "min_kept": 0.25,
            "overlap": None,
            "seconds": 60.0,
            "selection_se": 1.5,
        }

    entry = {
        "dense": 94.0,
        "base_seconds": 120.0,
        "results": {
            "0.5": {
                "upop": [run(0, 94.0, 94.0), run(1, 94.4, 94.4)],
                "uniform": [run(0, 93.0, 94.8), run(1, 93.2, 94.8)],
            }
        },
    }
    text = "\n".join(peers.table("classification", entry))
    assert "| **94.20 ± 0.28** |" in text and "| **94.80 ± 0.00** |" in text  # best score, best last epoch
    assert "this part took 6 min on this machine" in text and "selection SE" in text
    entry |= {"machine": "cpu, 2 threads", "processor": "AMD EPYC"}  # the processor is said, a merge ignores it
    assert "on this machine (cpu, 2 threads; the last part ran on AMD EPYC)" in "\n".join(
        peers.table("classification", entry)
    )
    assert "(vit-tiny, built-in data: 20000 training / 2000 report scenes;" in text  # the header names the data
    about = {"train_size": 1000, "val_size": 500, "options": {"rerank_k": 16}}  # and a task option off its default
    assert peers._data(about) == ", built-in data: 1000 training / 500 report scenes, rerank-k 16"
    assert peers.TASKS["blip-retrieval"].about()["options"] == {"rerank_k": 16}
    assert peers.TASKS["nlvr"].about()["options"] == {}
    assert "2x (p = 0.5): `upop` (94.20) wins: 1.10 above the best other row, `uniform` (93.10)" in text


def test_a_kept_run_made_under_other_settings_is_stale(tmp_path):
    """A kept UPop run is reused only while its ranking settings are still the row's (a changed default makes it
    again); a Torch-Pruning run only while its budget is."""
    import dataclasses
    import json

    import upop

    peers = load_benchmark("bench_peers")
    prune = json.loads(json.dumps(dataclasses.asdict(upop.PruneConfig(p=0.5))))
    (tmp_path / "report.json").write_text(json.dumps({"prune": prune}))
    assert peers.stale(tmp_path, "upop", 0.5, {}) == []
    assert peers.stale(tmp_path / "absent", "upop", 0.5, {"floor": 0.3}) == []
    assert peers.stale(tmp_path, "upop", 0.5, {"floor": 0.3}) == [f"floor {prune['floor']!r} -> 0.3"]
    assert peers.stale(tmp_path, "upop", 0.5, {"allocation": "uniform"}) == [
        f"allocation {prune['allocation']!r} -> 'uniform'"
    ]
    assert peers.stale(tmp_path, "tp", 0.5, {}) == []
    assert peers.stale(tmp_path, "tp", 0.75, {}) == ["p 0.5 -> 0.75"]


def test_the_summary_sets_the_default_against_its_peers_only_and_names_what_did_not_run():
    """The targets table compares the default with uniform, the paper's ranking and Torch-Pruning (not with its own
    variants), per budget, and says which peers and tasks have no rows."""
    peers = load_benchmark("bench_peers")

    def runs(*scores):
        return [{"score": s} for s in scores]

    results = {
        "0.5": {
            "upop": runs(90.0, 90.2, 90.4),
            "floor0.5": runs(95.0, 95.0, 95.0),  # a variant of the default, better, not a peer
            "uniform": runs(89.0, 89.2, 89.4),
            "tp-taylor": runs(88.0, 88.0, 88.0),
        },
        "0.75": {"upop": runs(80.0, 80.2, 80.4), "uniform": runs(81.0, 81.2, 81.4)},
    }
    text = peers.summary({"nlvr": {"results": results, "dense": 83.6}})
    line = next(row for row in text.splitlines() if row.startswith("| nlvr | `blip-tiny` | 83.60 |"))
    two, four = line.split(" | ")[3:5]
    assert two.startswith("**wins**: 90.20 against `uniform` 89.20 (+1.00") and "no paper's ranking row" in two
    assert four.startswith("**loses**: 80.20 against `uniform` 81.20 (-1.00")
    assert "no paper's ranking or Torch-Pruning row" in four
    assert "Not in the comparison yet: classification, retrieval, blip-retrieval, caption, vqa, segmentation." in text
    partial = peers.summary({"nlvr": {"results": results}}, complete=False)  # another base: names no missing task
    assert "Not in the comparison yet" not in partial and "| nlvr | `blip-tiny` | - |" in partial


def test_a_run_of_some_rows_keeps_the_others_only_on_the_same_base_and_settings():
    peers = load_benchmark("bench_peers")
    task = "classification"

    def entry(dense, rows, machine="cpu, 2 threads"):
        results = {p: {m: [{"seed": 0, "score": score}] for m, score in ms.items()} for p, ms in rows.items()}
        made = {m: peers.made_with(task, m) for ms in rows.values() for m in ms}
        about = {"model": "vit-tiny", "search": 2, "retrain": 3}
        return {"dense": dense, "about": about, "machine": machine, "results": results, "made_with": made} | {
            "scopes": {m: [] for m in made},
            "not_run": {},
        }

    old = entry(90.0, {"0.75": {"uniform": 80.0, "upop": 81.0}, "0.5": {"uniform": 85.0}})
    merged = peers.merge_task(task, old, entry(90.0, {"0.75": {"upop": 82.0}}))
    assert list(merged["results"]) == ["0.5", "0.75"] and list(merged["results"]["0.75"]) == ["upop", "uniform"]
    assert merged["results"]["0.75"]["upop"][0]["score"] == 82.0  # replaced
    assert merged["results"]["0.5"]["uniform"][0]["score"] == 85.0  # kept
    # another base or machine: nothing of the old part is comparable
    for other in (entry(91.0, {"0.75": {"upop": 82.0}}), entry(90.0, {"0.75": {"upop": 82.0}}, machine="cuda")):
        assert peers.merge_task(task, old, other)["results"] == {"0.75": {"upop": [{"seed": 0, "score": 82.0}]}}
    # a row made under what its method no longer makes (an older default floor), or with no record, is dropped
    stale = entry(90.0, {"0.5": {"upop": 84.0, "uniform": 85.0, "upop-paper": 83.0}})
    stale["made_with"]["upop"] = {**peers.made_with(task, "upop"), "floor": 0.5}
    del stale["made_with"]["upop-paper"]
    merged = peers.merge_task(task, stale, entry(90.0, {"0.75": {"uniform": 80.0}}))
    assert list(merged["results"]["0.5"]) == ["uniform"] and set(merged["made_with"]) == {"uniform"}
    assert peers.made_with(task, "upop") != peers.made_with(task, "floor0.5")  # the records tell the two apart
    assert peers.made_with(task, "search-1") == {**peers.made_with(task, "upop"), "search_shift": -1}  # and the split
    assert "floor" not in peers.made_with(task, "uniform")  # no floor binds uniform allocation: not its record
