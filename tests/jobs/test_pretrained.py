"""Checkpoints compressed by the original UPop code load: their widths read from the tensor shapes, the model sliced
to them, and the outputs those of the original code's compressed model.

A checkpoint "as the original code saves it" is made here from a dense model and a random choice of kept head dims
(the same in every head, and in q, k and v) and MLP neurons: the dense tensors sliced along the original's layouts
(fused or packed qkv rows, q/k/v rows, output-projection and fc2 columns, fc1 rows), not scaled, under the
original's key names (BLIP's, and UPop's CLIP format with its momentum encoders and queues), nested under "model".
What the original's compressed model computes is emulated on the dense model by exact 0/1 masks, with the softmax
scale the original's compressed block has: 1/sqrt(original head_dim) in the ViTs it builds (DeiT, BLIP's ViT,
Segmenter), 1/sqrt(kept head_dim) in BERT and CLIP (emulated by scaling the dense query rows by sqrt(dense/kept))."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import blip_decoder_original_layout as caption_layout
from helpers import blip_original_layout as nlvr_layout

import upop
from upop.data.captions import VOCAB
from upop.errors import UPopError
from upop.jobs.pretrained import load_bundle
from upop.models import build

KEPT_SCALE_FAMILIES = {"hf-bert", "blip-nlvr", "open-clip"}  # the original's compressed block divides by sqrt(kept)
OPEN_CLIP = {
    "embed_dim": 12,
    "vision_cfg": {"layers": 2, "width": 16, "head_width": 8, "mlp_ratio": 2.0, "patch_size": 4, "image_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": len(VOCAB), "width": 18, "heads": 2, "layers": 2},
}


def _choice(pruner, seed: int) -> list[torch.Tensor]:
    """Per structure, a random half of its elements pruned (True), at least one kept."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in pruner.structures:
        c = torch.zeros(s.size, dtype=torch.bool)
        c[torch.randperm(s.size, generator=g)[: s.size // 2]] = True
        out.append(c)
    return out


def _sliced(state: dict, structures: list, chosen: list[torch.Tensor]) -> dict:
    """``state`` sliced as the original's compress() slices it: each structure's kept elements in every group of its
    row projections (rows and biases) and column projections (columns), nothing scaled."""
    out = dict(state)
    for s, c in zip(structures, chosen):
        kept = (~c).nonzero().squeeze(1)
        for slots, axis in ((s.rows, 0), (s.cols, 1)):
            for slot in slots:
                key = slot.path if slot.weight_name != "weight" else f"{slot.path}.weight"
                index = (torch.arange(slot.groups)[:, None] * s.size + kept[None, :]).reshape(-1)
                out[key] = out[key].index_select(axis, index).clone()
                bias = key[: -len(slot.weight_name)] + slot.bias_name
                if axis == 0 and bias in out:
                    out[bias] = out[bias][index].clone()
    return out


def _expected(model, pruner, chosen, call):
    """The original code's compressed model, emulated: exact 0/1 masks on the dense model, the query rows of the
    blocks whose compressed form divides by sqrt(kept) scaled by sqrt(dense / kept)."""
    with torch.no_grad():
        for s, c in zip(pruner.structures, chosen):
            if s.kind == "attn" and s.family in KEPT_SCALE_FAMILIES:
                kept = int((~c).sum())
                query = s.rows[0]
                rows = slice(None) if len(s.rows) == 3 else slice(0, query.groups // 3 * s.size)
                query.weight[rows] *= (s.size / kept) ** 0.5
                if query.bias is not None:
                    query.bias[rows] *= (s.size / kept) ** 0.5
    pruner.set_choice(chosen, 0.0)
    with torch.no_grad():
        return call(model)


def _images(n=2, size=16, pairs=False):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *((2,) if pairs else ()), 3, size, size, generator=g)


def _tokens(bundle, texts):
    return bundle.tokenizer(texts)


def _blip_call(kind):
    def call(bundle):
        texts = ["a red circle left of a blue square", "two objects"]
        t = _tokens(bundle, texts)
        m = bundle.model
        if kind == "nlvr":
            return lambda model: model(_images(pairs=True), t["input_ids"], t["attention_mask"])
        if kind == "dual_encoder":
            return lambda model: torch.cat(
                [v.flatten() for v in model(_images(), t["input_ids"], t["attention_mask"]).values()]
            )
        if kind == "captioner":
            return lambda model: model(pixel_values=_images(), input_ids=t["input_ids"]).logits
        del m
        return lambda model: model(_images(), t["input_ids"], t["attention_mask"], t["input_ids"], t["attention_mask"])

    return call


CASES = {  # name: (spec, task, the state dict in the original's layout from ours, a call of the model)
    "deit": ("vit-micro", "classification", lambda s: s, lambda bundle: lambda m: m(_images())),
    "segmenter": ("segmenter-micro", "segmentation", lambda s: s, lambda bundle: lambda m: m(_images())),
    "blip-nlvr": ("blip-micro", "nlvr", nlvr_layout, _blip_call("nlvr")),
    "blip-retrieval": ("blip-micro", "retrieval", nlvr_layout, _blip_call("dual_encoder")),
    "blip-caption": ("blip-micro", "caption", caption_layout, _blip_call("captioner")),
    "blip-vqa": ("blip-micro", "vqa", caption_layout, _blip_call("vqa")),
}


def _momentum_and_queues(state: dict) -> dict:
    """UPop's CLIP checkpoint: the momentum encoders (copies) and the feature queues beside the weights."""
    out = dict(state)
    for key, value in state.items():
        for tower in ("visual", "transformer", "token_embedding", "ln_final"):
            if key.startswith(tower + "."):
                out[key.replace(tower + ".", tower + "_m.", 1)] = value.clone()
    out["text_projection_m"], out["positional_embedding_m"] = state["text_projection"], state["positional_embedding"]
    out.update(image_queue=torch.randn(12, 20), text_queue=torch.randn(12, 20), idx_queue=torch.zeros(1, 20))
    out["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    return out


def _clip_case(tmp_path):
    (tmp_path / "clip.json").write_text(json.dumps(OPEN_CLIP))
    spec = f"open_clip:{tmp_path / 'clip.json'}"

    def call(bundle):
        ids = bundle.tokenizer(["a red circle", "two objects and a blue square"])["input_ids"]
        return lambda m: torch.cat([m.encode_image(_images()), m.encode_text(ids)], dim=1)

    return spec, "retrieval", _momentum_and_queues, call


def _original_compressed(tmp_path: Path, case: str, seed: int = 0):
    """(spec, task, the checkpoint file, the expected outputs, the call) of a case."""
    spec, task, layout, make_call = _clip_case(tmp_path) if case == "clip" else CASES[case]
    torch.manual_seed(seed)
    dense = load_bundle(spec, task).bundle
    model = dense.model.eval()
    call = make_call(dense)
    pruner = upop.Pruner(model, upop.PruneConfig(p=0.5, total_steps=10, align_attn=1, align_mlp=1))
    chosen = _choice(pruner, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"{case}_compressed.pth"
    torch.save({"model": layout(_sliced(state, pruner.structures, chosen))}, path)
    expected = _expected(model, pruner, chosen, call)
    pruner.detach()
    return spec, task, path, expected, call


@pytest.mark.parametrize("case", [*CASES, "clip"])
def test_an_original_compressed_checkpoint_loads_and_gives_the_original_outputs(tmp_path, case):
    spec, task, path, expected, call = _original_compressed(tmp_path, case)
    loaded = load_bundle(spec, task, pretrained=str(path))
    assert loaded.compressed and all(w["kept"] == w["size"] - w["size"] // 2 for w in loaded.widths)
    with torch.no_grad():
        got = call(loaded.bundle.model.eval())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    smaller = sum(p.numel() for p in loaded.bundle.model.parameters())
    assert smaller < sum(
        p.numel()
        for p in build(
            spec, loaded.bundle.kind, 0 if task != "classification" else 30, weights=False
        ).model.parameters()
    )


def test_the_public_loader_returns_the_module_and_it_saves_as_a_compressed_directory(tmp_path):
    spec, task, path, expected, call = _original_compressed(tmp_path, "deit")
    model = upop.load_model(spec, task=task, pretrained=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_images()), expected, rtol=1e-4, atol=1e-5)
    upop.save_compressed(model, tmp_path / "out")
    again = upop.load_compressed(lambda: build(spec, "classifier", 30).model, tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(again(_images()), model(_images()))


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    torch.save({"model": build("vit-tiny", "classifier", 30).model.state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(UPopError, match="is not a state dict of this VisionTransformer: .*wrong shape"):
        upop.load_model("vit-micro", task="classification", pretrained=str(tmp_path / "wide.pth"))


@pytest.mark.e2e
def test_evaluate_reads_an_original_compressed_checkpoint_and_says_what_it_inferred(tmp_path, capsys):
    from upop.cli import main

    _, _, path, _, _ = _original_compressed(tmp_path, "deit")
    argv = ["evaluate", "--model", "vit-micro", "--pretrained", str(path), "--train-size", "32", "--val-size", "8"]
    assert main([*argv, "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pretrained"]["compressed"]
    widths = {s["name"]: (s["kept"], s["size"]) for s in result["pretrained"]["structures"]}
    assert widths["blocks.0.attn"] == (8, 16) and widths["blocks.1.mlp"] == (32, 64)


def test_compress_refuses_a_compressed_checkpoint_in_one_line(tmp_path, capsys):
    from upop.cli import main

    _, _, path, _, _ = _original_compressed(tmp_path, "deit")
    argv = ["compress", "--model", "vit-micro", "--pretrained", str(path), "--train-size", "32", "--val-size", "8"]
    assert main([*argv, "--batch-size", "8", "--output-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compressed checkpoint" in err[0] and not (tmp_path / "c").exists()


def test_a_dense_clip_as_upop_saves_it_loads_without_its_momentum_encoders_and_queues(tmp_path):
    spec, task, _, call = _clip_case(tmp_path)
    torch.manual_seed(3)
    dense = load_bundle(spec, task).bundle
    torch.save({"model": _momentum_and_queues(dense.model.state_dict())}, tmp_path / "clip_large_retrieval_coco.pth")
    loaded = load_bundle(spec, task, pretrained=str(tmp_path / "clip_large_retrieval_coco.pth"))
    assert not loaded.compressed
    with torch.no_grad():
        assert torch.equal(call(dense)(loaded.bundle.model.eval()), call(dense)(dense.model.eval()))


@pytest.mark.e2e
def test_a_loaded_compressed_checkpoint_s_plan_is_retrained_by_compress_plan(tmp_path, capsys):
    from upop.cli import main

    spec, task, path, _, _ = _original_compressed(tmp_path, "deit")
    model = upop.load_model(spec, task=task, pretrained=str(path))
    upop.save_compressed(model, tmp_path / "plan")
    dense = tmp_path / "dense.safetensors"
    from safetensors.torch import save_file

    save_file(build(spec, "classifier", 30).model.state_dict(), str(dense))
    argv = ["compress", "--model", spec, "--pretrained", str(dense), "--plan", str(tmp_path / "plan")]
    argv += [
        "--train-size",
        "32",
        "--val-size",
        "8",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--output-dir",
        str(tmp_path / "c"),
    ]
    assert main(argv) == 0
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    assert {s["name"]: len(s["kept"]) for s in plan["structures"]}["blocks.0.attn"] == 8
