"""benchmarks/gpu_check.py runs end to end at tiny size on the CPU, so the one GPU script cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _benchmark(name: str):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_at_tiny_size_on_cpu(tmp_path):
    gpu_check = _benchmark("gpu_check")
    argv = "--models vit-micro --device cpu --batch 4 --search-steps 3 --rounds 1 --steps 1 --iters 2".split()
    result = gpu_check.main([*argv, "--out", str(tmp_path / "r.json")])
    (row,) = result["models"]
    assert row["gflops_per_image"]["device"] == row["gflops_per_image"]["cpu"] > 0
    variants = {"default_auto", "elementwise", "aligned_8_32", "whole_heads", "latency_cost"}
    for name in variants:
        search = row["search"][name]
        assert search["importance_finite"] and search["nonfinite_steps"] == 0
        assert abs(search["pruned_cost_fraction"] - 0.5) <= 0.05 and search["params"] < row["dense_params"]
    assert set(row["speedup"]["fp32"]) == variants
    assert row["search_step_ratio"] > 0
    assert row["search"]["default_auto"]["alignment"]["device"] == "cpu"
    assert (tmp_path / "r.json").is_file()


def test_gpu_widths_runs_at_tiny_size_on_cpu(tmp_path):
    gpu_widths = _benchmark("gpu_widths")
    argv = "--device cpu --batch 2 --tokens 5 --width 16 --heads 2 --head-dims 8,7 --hidden 32,31 --iters 1".split()
    result = gpu_widths.main(argv)
    assert [r["head_dim"] for r in result["attention"]] == [8, 7, 8, 7]  # bf16, then fp32
    assert [r["hidden"] for r in result["mlp"]] == [32, 31, 32, 31] and result["mlp"][0]["time_share"] == 1.0
