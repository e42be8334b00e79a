"""Deployable outputs: a compressed directory loads without the dense weights (built on the meta device, filled from
its safetensors), exports to ONNX with onnxruntime agreeing with PyTorch at another batch size, and the compressed
model runs under torch.compile."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CLI_DATA, build, compress_argv, images, timm_vit

import upop
from upop.cli import main
from upop.models import build_model


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "c"
    assert main(compress_argv(None, out, "--epochs", "0")) == 0
    return out


def test_a_compress_directory_loads_alone_like_with_a_dense_model(compressed):
    alone = upop.load_compressed(compressed)
    assert not any(p.is_meta for p in alone.parameters())
    with_dense = upop.load_compressed(build_model("vit-micro", 30, 16), compressed)
    x = images(4)
    assert torch.equal(alone.eval()(x), with_dense.eval()(x))
    assert (
        sum(p.numel() for p in alone.parameters())
        == json.loads((compressed / "report.json").read_text())["compressed"]["params"]
    )


def test_an_hf_model_loads_without_its_dense_weight_files(tmp_path):
    from helpers import hf_vit

    torch.manual_seed(0)
    hf_vit(heads=2, head_dim=8, depth=2, mlp_hidden=32, image=16).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    data = CLI_DATA[2:]
    argv = ["compress", "--model", f"hf:{tmp_path / 'hf'}", *data, "--epochs-search", "1", "--epochs", "0"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    x = images(3)
    expected = upop.load_compressed(out).eval()(x).logits
    for f in (tmp_path / "hf").glob("*.safetensors"):
        f.unlink()  # the 2x model is all that is left
    torch.testing.assert_close(upop.load_compressed(out).eval()(x).logits, expected, rtol=0, atol=0)


def test_a_build_function_for_a_model_of_ones_own(tmp_path):
    model = build(timm_vit, (3, 7, 2, 19))
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=1, align_attn=1, align_mlp=1))
    pruner.set_choice([torch.arange(s.size) % 2 == 1 for s in pruner.structures], 0.0)
    small = pruner.compress(force=True)
    upop.save_compressed(small, tmp_path)
    built = []

    def dense():
        m = timm_vit(heads=3, head_dim=7, depth=2, mlp_hidden=19)
        built.append(all(p.is_meta for p in m.parameters()))
        return m

    loaded = upop.load_compressed(dense, tmp_path)
    assert built == [True]  # the dense architecture never held weights
    x = images(2)
    torch.testing.assert_close(loaded.eval()(x), small.eval()(x), rtol=0, atol=0)
    with pytest.raises(upop.UPopError, match="has no config.json, so it was not written by `upop compress`"):
        upop.load_compressed(tmp_path)


@pytest.mark.e2e
@pytest.mark.slow
def test_onnx_export_agrees_with_pytorch_at_any_batch(compressed, tmp_path, capsys):
    import onnxruntime

    path = tmp_path / "m.onnx"
    assert main(["export", str(compressed), "--onnx", str(path)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = upop.load_compressed(compressed).eval()
    for batch in (1, 5):  # exported at batch 2
        x = images(batch)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        expected = model(x).detach().numpy()
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5


@pytest.mark.e2e
@pytest.mark.slow
def test_a_two_tower_model_exports(tmp_path, capsys):
    out = tmp_path / "clip"
    argv = ["compress", "--task", "retrieval", "--model", "clip-micro", "--train-size", "64", "--val-size", "16"]
    assert main([*argv, "--batch-size", "16", "--epochs-search", "1", "--epochs", "0", "--output-dir", str(out)]) == 0
    assert main(["export", str(out), "--onnx", str(tmp_path / "clip.onnx")]) == 0
    assert "over 8 output(s)" in capsys.readouterr().out  # logits both ways, embeddings, tower outputs


@pytest.mark.slow
def test_the_compressed_model_runs_under_torch_compile(compressed):
    model = upop.load_compressed(compressed).eval()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_segmenter_loads_alone_and_exports(tmp_path, capsys):
    """Segmenter: the compressed directory loads without the dense weights and its ONNX export (any input batch)
    agrees with PyTorch."""
    out = tmp_path / "seg"
    argv = ["compress", "--task", "segmentation", "--model", "segmenter-micro", "--train-size", "32"]
    argv += ["--val-size", "4", "--batch-size", "16", "--epochs-search", "1", "--epochs", "0"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    model = upop.load_compressed(out).eval()
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in build_model("segmenter-micro", 6, kind="segmenter").parameters()
    )
    assert main(["export", str(out), "--onnx", str(tmp_path / "seg.onnx")]) == 0
    assert "over 1 output(s)" in capsys.readouterr().out
