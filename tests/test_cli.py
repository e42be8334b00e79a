"""The CLI end to end on the built-in data (tiny sizes), and every bad input: one line, exit 2, no output left."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLI_DATA, compress_argv
from safetensors.torch import save_file

from upop.cli import main

DATA = CLI_DATA[2:]  # the built-in data slice, without the model


def _fail(capsys, argv, out_dir=None) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("upop: error: ")
    if out_dir is not None:
        assert not out_dir.exists()
        assert not any(p.name.startswith(f".{out_dir.name}") for p in out_dir.parent.iterdir())
    return err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "micro"
    assert main(["train", "--model", "vit-micro", "--epochs", "1", *DATA, "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def compressed(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("comp") / "micro-2x"
    argv = compress_argv(base / "model.safetensors", out, "--p", "0.5")
    assert main(argv) == 0
    return out


def test_compress_writes_plan_weights_reports_and_a_step_log(compressed, capsys):
    for name in ("plan.json", "model.safetensors", "report.json", "report.md", "config.json", "log.jsonl"):
        assert (compressed / name).is_file(), name
    report = json.loads((compressed / "report.json").read_text())
    elementwise = report["alignment"]["attn"] == report["alignment"]["mlp"] == 1  # "auto", measured on this CPU
    assert abs(report["pruned_cost_fraction"] - 0.5) <= (0.01 if elementwise else 0.05)
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert report["compressed"]["flops"] < report["dense"]["flops"]
    records = [json.loads(line) for line in (compressed / "log.jsonl").read_text().splitlines()]
    search = [r for r in records if r["phase"] == "search" and "pi" in r]
    assert search and search[-1]["pi"] == 0.5
    assert {"loss", "task_loss", "sparsity_loss", "kept_attn", "kept_mlp"} <= set(search[-1])
    assert any(r["phase"] == "retrain" for r in records)


def test_evaluate_a_compressed_dir_reproduces_the_reported_metric(compressed, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--compressed", str(compressed)]) == 0
    result = json.loads(capsys.readouterr().out)
    report = json.loads((compressed / "report.json").read_text())
    assert result["metrics"] == pytest.approx(report["compressed"]["metrics"])
    assert result["params"] == report["compressed"]["params"]


def test_existing_output_dir_is_not_overwritten_without_the_flag(base, compressed, capsys):
    before = (compressed / "plan.json").read_text()
    argv = compress_argv(base / "model.safetensors", compressed)
    assert "exists and is not empty" in _fail(capsys, argv)
    assert (compressed / "plan.json").read_text() == before


@pytest.mark.parametrize("p", ["0", "1", "1.5", "-0.1"])
def test_p_outside_0_1(p, tmp_path, capsys):
    out = tmp_path / "out"
    err = _fail(capsys, ["compress", "--model", "vit-micro", "--p", p, *DATA, "--output-dir", str(out)], out)
    assert "p must be a number strictly between 0 and 1" in err


def _compress_with(pretrained, tmp_path, capsys, model="vit-micro"):
    out = tmp_path / "out"
    argv = ["compress", "--model", model, "--pretrained", str(pretrained), *DATA, "--output-dir", str(out)]
    return _fail(capsys, argv, out)


def test_pretrained_missing(tmp_path, capsys):
    assert "does not exist" in _compress_with(tmp_path / "nope.safetensors", tmp_path, capsys)


def test_pretrained_truncated(base, tmp_path, capsys):
    for suffix, write in ((".safetensors", None), (".pth", torch.save)):
        path = tmp_path / f"cut{suffix}"
        if write is None:
            data = (base / "model.safetensors").read_bytes()
        else:
            write({"w": torch.zeros(1000)}, path)
            data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert "is not a readable state dict" in _compress_with(path, tmp_path, capsys)


def test_pretrained_of_another_model_names_the_keys(tmp_path, capsys):
    from upop.models import build_model

    path = tmp_path / "tiny.safetensors"
    save_file(build_model("vit-tiny", 30).state_dict(), str(path))
    err = _compress_with(path, tmp_path, capsys)
    assert "is not a state dict of this VisionTransformer" in err and "wrong shape" in err and "cls_token" in err


def test_release_checkpoint_under_model_key_loads_and_pickled_code_is_refused(base, tmp_path, capsys):
    from safetensors.torch import load_file

    from upop.errors import UPopError
    from upop.models import build_model, load_weights

    state = load_file(str(base / "model.safetensors"))
    path = tmp_path / "release.pth"
    torch.save({"model": state, "epoch": 300}, path)  # the DeiT release layout
    model = build_model("vit-micro", 30)
    load_weights(model, path)
    assert torch.equal(model.state_dict()["cls_token"], state["cls_token"])

    evil = tmp_path / "evil.pth"
    torch.save({"model": state, "payload": Payload()}, evil)
    with pytest.raises(UPopError, match="not a readable state dict"):
        load_weights(build_model("vit-micro", 30), evil)


class Payload:
    """An arbitrary object: loading it would need unpickling code."""


def test_compressed_dir_of_another_model(compressed, capsys):
    err = _fail(capsys, ["evaluate", "--compressed", str(compressed), "--model", "vit-tiny", "--image-size", "16"])
    assert "another architecture" in err and "plan:" in err


def test_dataset_folder_missing_or_empty(tmp_path, capsys):
    out = tmp_path / "out"
    err = _fail(
        capsys, ["train", "--model", "vit-micro", "--data", str(tmp_path / "none"), "--output-dir", str(out)], out
    )
    assert "does not exist" in err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    err = _fail(
        capsys, ["train", "--model", "vit-micro", "--data", str(tmp_path / "empty"), "--output-dir", str(out)], out
    )
    assert "has no usable images" in err


def test_model_without_adapter_lists_the_supported_families(tmp_path, capsys):
    out = tmp_path / "out"
    err = _fail(
        capsys, ["compress", "--model", "timm:resnet18", "--image-size", "32", *DATA, "--output-dir", str(out)], out
    )
    assert "no UPop adapter for a ResNet; supported: " in err and "timm-vit (" in err and "hf-vit (" in err


def test_unknown_model_name(tmp_path, capsys):
    err = _fail(capsys, ["train", "--model", "vit-huge-nope", "--output-dir", str(tmp_path / "o")])
    assert "unknown model 'vit-huge-nope'; accepted: vit-tiny" in err


@pytest.mark.e2e
def test_imagenet_style_folder_trains_and_compresses(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 4)):
        for label, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            folder = tmp_path / "data" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                noise = (torch.rand(20, 20, 3, generator=g) * 60).to(torch.uint8)
                pixels = (torch.tensor(colour, dtype=torch.uint8) * 0.7).to(torch.uint8) + noise
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    common = ["--model", "vit-micro", "--data", str(tmp_path / "data"), "--batch-size", "8"]
    assert main(["train", *common, "--epochs", "1", "--output-dir", str(tmp_path / "base")]) == 0
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["num_outputs"] == 2
    report = json.loads((tmp_path / "base" / "report.json").read_text())
    assert set(report["metrics"]) == {"top1"}  # top-5 is meaningless with two classes
    argv = [
        "compress",
        *common,
        "--pretrained",
        str(tmp_path / "base" / "model.safetensors"),
        "--epochs-search",
        "1",
        "--epochs",
        "1",
        "--interval",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    assert (tmp_path / "out" / "plan.json").is_file()


@pytest.mark.e2e
def test_hf_directory_through_compress_and_evaluate(tmp_path, capsys):
    from helpers import hf_vit

    torch.manual_seed(0)
    hf_vit(heads=2, head_dim=8, depth=2, mlp_hidden=32, image=16).save_pretrained(tmp_path / "hf")
    model = ["--model", f"hf:{tmp_path / 'hf'}"]  # the input size comes from the HF config (16)
    argv = compress_argv(tmp_path / "none", tmp_path / "out", *model, "--cost", "flops")
    argv.remove("--pretrained")
    argv.remove(str(tmp_path / "none"))  # the weights come from the directory itself
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"].startswith("hf:") and report["cost"] == "flops"
    assert report["compressed"]["flops"] < report["dense"]["flops"]
    capsys.readouterr()
    assert main(["evaluate", "--compressed", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(report["compressed"]["metrics"])


@pytest.mark.e2e
def test_whole_head_granularity_end_to_end(base, tmp_path, capsys):
    out = tmp_path / "heads"
    assert main(compress_argv(base / "model.safetensors", out, "--granularity", "head", "--p", "0.5")) == 0
    assert "kept attention heads" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    attn = [s for s in report["per_structure"] if s["kind"] == "attn"]
    assert report["granularity"] == "head" and all(s["unit"] == "heads" and s["size"] == 2 for s in attn)
    assert json.loads((out / "plan.json").read_text())["config"]["granularity"] == "head"
    assert main(["evaluate", "--compressed", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(report["compressed"]["metrics"])


@pytest.mark.e2e
def test_mixed_granularity_end_to_end_and_a_plan_that_is_not_heads_times_dims_is_refused(base, tmp_path, capsys):
    out = tmp_path / "mixed"
    argv = compress_argv(base / "model.safetensors", out, "--granularity", "mixed", "--p", "0.5", "--align-attn", "1")
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "kept attention head x dim pairs" in shown and "kept attention heads x head_dim" in shown
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert report["granularity"] == "mixed" and plan["config"]["granularity"] == "mixed"
    for row, entry in zip(report["per_structure"], plan["structures"]):
        if row["kind"] == "attn":
            heads, dims = entry["grid"]
            assert row["unit"] == "head x dim pairs" and row["size"] == heads * dims
            assert row["kept"] == row["heads"] * row["head_dim"] >= 1
            assert f"{row['heads']}x{row['head_dim']}" in (out / "report.md").read_text()
    assert report["compressed"]["params"] < report["dense"]["params"]
    assert main(["evaluate", "--compressed", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(report["compressed"]["metrics"])
    attn = next(e for e in plan["structures"] if e["kind"] == "attn")
    heads, dims = attn["grid"]
    attn["kept"] = [0, dims + 1]  # dim 0 of head 0 and dim 1 of head 1: not one head_dim shared by the heads
    (tmp_path / "ragged.json").write_text(json.dumps(plan))
    argv = compress_argv(base / "model.safetensors", tmp_path / "x", "--plan", str(tmp_path / "ragged.json"))
    argv[argv.index("--epochs-search") + 1] = "0"
    assert "whole heads x head dims shared by all kept heads" in _fail(capsys, argv, tmp_path / "x")


@pytest.mark.e2e
def test_latency_cost_with_a_table_measured_by_upop_latency_table(base, tmp_path, capsys):
    table = tmp_path / "table.json"
    assert main(["latency-table", *CLI_DATA, "--output", str(table)]) == 0
    assert "2 structure shape(s) measured on cpu" in capsys.readouterr().out
    assert all("|fp32|latency|" in key for key in json.loads(table.read_text()))
    out = tmp_path / "lat"
    argv = compress_argv(base / "model.safetensors", out, "--cost", "latency", "--latency-table", str(table))
    assert main(argv) == 0
    assert "latency of the pruned structures (cost table)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["cost"] == "latency" and report["latency_cost"]["kept_ms"] < report["latency_cost"]["dense_ms"]
    missing = str(tmp_path / "x.json")
    argv = compress_argv(base / "model.safetensors", tmp_path / "o2", "--cost", "latency", "--latency-table", missing)
    assert "cannot read the latency table" in _fail(capsys, argv, tmp_path / "o2")  # before the directory exists


def test_report_carries_the_ranking_stability(compressed):
    report = json.loads((compressed / "report.json").read_text())
    stability = report["stability"]
    assert 0.0 <= stability["overlap"] <= 1.0 and -1.0 <= stability["rank_correlation"] <= 1.0
    smallest = min(s["kept"] / s["size"] for s in report["per_structure"])
    assert stability["min_kept_fraction"] == pytest.approx(smallest)
    assert stability["rerankings"][-1]["pi"] == 0.5 and isinstance(stability["warnings"], list)
    header = (compressed / "report.md").read_text()
    assert "ranking: fisher score standardised per kind, floor 0.75 of the uniform share" in header
    assert f"rank correlation {stability['rank_correlation']:.2f}" in header


@pytest.mark.e2e
def test_a_given_plan_is_retrained_without_a_search_to_the_same_architecture(base, compressed, tmp_path, capsys):
    out = tmp_path / "replayed"
    argv = compress_argv(base / "model.safetensors", out, "--plan", str(compressed / "plan.json"), "--epochs", "1")
    argv.remove("--epochs-search")
    argv.remove("1")  # the first "1" left is --epochs-search's value: --plan implies no search
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    original = json.loads((compressed / "report.json").read_text())
    assert report["given_plan"] and report["stability"] is None
    assert [s["kept"] for s in report["per_structure"]] == [s["kept"] for s in original["per_structure"]]
    assert report["compressed"]["params"] == original["compressed"]["params"]
    kept = {s["name"]: s["kept"] for s in json.loads((out / "plan.json").read_text())["structures"]}
    assert kept == {s["name"]: s["kept"] for s in json.loads((compressed / "plan.json").read_text())["structures"]}
    assert not any(json.loads(line)["phase"] == "search" for line in (out / "log.jsonl").read_text().splitlines())


def test_bad_plans_and_ranking_flags_are_refused(base, compressed, tmp_path, capsys):
    pretrained = base / "model.safetensors"
    out = tmp_path / "x"
    err = _fail(capsys, compress_argv(pretrained, out, "--plan", str(tmp_path / "none.json")), out)
    assert "no such file" in err
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert "not valid JSON" in _fail(capsys, compress_argv(pretrained, out, "--plan", str(garbage)), out)
    argv = compress_argv(pretrained, out, "--plan", str(compressed), "--epochs-search", "2")
    assert "--epochs-search must be 0" in _fail(capsys, argv, out)
    other = json.loads((compressed / "plan.json").read_text())
    other["structures"][0]["size"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "does not fit" in _fail(
        capsys, compress_argv(pretrained, out, "--plan", str(tmp_path / "other.json"), "--epochs-search", "0"), out
    )
    assert "--paper-ranking fixes" in _fail(
        capsys, compress_argv(pretrained, out, "--paper-ranking", "--floor", "0.5"), out
    )
    assert "floor must be" in _fail(capsys, compress_argv(pretrained, out, "--floor", "2"), out)
