"""benchmarks/gpu_check.py runs end to end at tiny size on the CPU, so the one GPU script cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_gpu_check_runs_at_tiny_size_on_cpu(tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    argv = "--models vit-micro --device cpu --batch 4 --search-steps 3 --rounds 1 --steps 1 --iters 2".split()
    result = gpu_check.main([*argv, "--out", str(tmp_path / "r.json")])
    (row,) = result["models"]
    assert row["gflops_per_image"]["device"] == row["gflops_per_image"]["cpu"] > 0
    for name in ("elementwise", "aligned_8_32"):
        search = row["search"][name]
        assert search["importance_finite"] and search["nonfinite_steps"] == 0
        assert abs(search["pruned_cost_fraction"] - 0.5) <= 0.05 and search["params"] < row["dense_params"]
    assert set(row["speedup"]["fp32"]) == {"elementwise", "aligned_8_32"} and row["search_step_ratio"] > 0
    assert (tmp_path / "r.json").is_file()
