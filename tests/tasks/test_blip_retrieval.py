"""BLIP image-text retrieval: ITM hard negatives, BLIP's rerank evaluation against a brute-force rescoring, the
released checkpoint layout (momentum encoders and queues dropped), an HF BlipForImageTextRetrieval directory giving
the same ITC and ITM outputs, and the CLI end to end with vision, text and cross towers in one budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import _blip_configs, blip_original_layout

from upop.cli import main
from upop.data.config import DataConfig
from upop.models import build, build_model, load_weights
from upop.models.blip.checkpoints import converter
from upop.models.blip.modeling import BlipRetrieval
from upop.tasks import get_task
from upop.tasks.retrieval import blip_rerank, encode_images, encode_texts

DATA = "--task retrieval --model blip-micro --train-size 64 --val-size 16 --batch-size 16".split()


def _tiny(seed=0):
    torch.manual_seed(seed)
    vision, text = _blip_configs(2, 8, 2, 24, 16, vocab=48)
    return BlipRetrieval(vision, text, embed_dim=12, enc_token_id=2).eval()


def test_itm_hard_negatives_are_other_images_and_labels_mark_the_matches():
    model = _tiny()
    images, ids = torch.randn(6, 3, 16, 16), torch.tensor([0, 0, 1, 2, 3, 3])
    tokens = torch.randint(3, 47, (6, 7))
    captured = []
    original = model.itm
    model.itm = lambda i, m, e: captured.append((i, e)) or original(i, m, e)
    out = model(images, tokens, torch.ones_like(tokens), image_ids=ids)
    assert out["itm"].shape == (18, 2) and out["itm_labels"].tolist() == [1] * 6 + [0] * 12
    texts, embeds = captured[0]
    neg_texts, neg_images = texts[6:12], embeds[12:]
    full = model.image_embeds(images)
    for b in range(6):  # the negative text of image b and the negative image of text b belong to another image
        owner = [j for j in range(6) if torch.equal(tokens[j], neg_texts[b])]
        assert all(ids[j] != ids[b] for j in owner)
        source = [j for j in range(6) if torch.allclose(full[j], neg_images[b])]
        assert source and all(ids[j] != ids[b] for j in source)


def test_rerank_rescores_the_top_k_by_itm_and_leaves_the_rest_at_minus_100():
    bundle = build("blip-micro", "dual_encoder")
    task = get_task("retrieval", bundle)
    data = task.datasets(DataConfig(train_size=8, val_size=6, image_size=16, select_size=0)).report
    model = bundle.model.eval()
    with torch.no_grad():
        img = encode_images(model, torch.stack([data[i] for i in range(len(data))]))
        tokens = task.tokenize(data.captions, torch.device("cpu"))
        sims = img @ encode_texts(model, tokens).T
        i2t, t2i = blip_rerank(model, data, tokens, sims, k=4, batch=4)
        embeds = model.image_embeds(torch.stack([data[i] for i in range(len(data))]))
        for i in range(len(data)):
            top = sims[i].topk(4).indices
            expected = model.itm(tokens["input_ids"][top], tokens["attention_mask"][top], embeds[i].expand(4, -1, -1))
            assert torch.allclose(i2t[i, top], expected[:, 1] + sims[i, top], atol=1e-5)
            rest = torch.ones(len(data.captions), dtype=torch.bool)
            rest[top] = False
            assert (i2t[i, rest] == -100).all()
        for j in range(len(data.captions)):
            top = sims[:, j].topk(4).indices
            ids = tokens["input_ids"][j].expand(4, -1)
            expected = model.itm(ids, tokens["attention_mask"][j].expand(4, -1), embeds[top])
            assert torch.allclose(t2i[top, j], expected[:, 1] + sims[top, j], atol=1e-5)
            assert (t2i[:, j] == -100).sum() == len(data) - 4


def test_a_released_blip_retrieval_checkpoint_loads_without_its_momentum_encoders(tmp_path):
    source, target = _tiny(0), _tiny(1)
    original = blip_original_layout(source.state_dict())
    original.update({"visual_encoder_m.cls_token": torch.zeros(1), "text_proj_m.weight": torch.zeros(1)})
    original.update({"image_queue": torch.zeros(12, 8), "idx_queue": torch.zeros(1, 8), "ptr_queue": torch.zeros(1)})
    path = tmp_path / "model_base_retrieval_coco.pth"
    torch.save({"model": original}, path)
    load_weights(target, path, converter("dual_encoder"))
    x, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 47, (2, 7))
    for key, value in source(x, ids).items():
        assert torch.equal(target(x, ids)[key], value), key


def test_an_hf_blip_retrieval_directory_gives_hf_s_itc_and_itm(tmp_path):
    from test_nlvr import _hf_blip_dir

    blip = _hf_blip_dir(tmp_path).eval()
    model = build_model(f"hf:{tmp_path}", 0, kind="dual_encoder").eval()
    x, ids = torch.randn(3, 3, 16, 16), torch.randint(6, 47, (3, 7))
    ids[:, 0] = model.enc_token_id  # HF's ITM reads the ids as given; BLIP's puts the encoder token first
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(x, ids, mask)
        itc = blip(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False).itm_score
        itm = blip(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=True).itm_score
    assert torch.allclose(ours["image_feat"] @ ours["text_feat"].T, itc, atol=1e-5)
    assert torch.allclose(ours["itm"], itm, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_compresses_blip_retrieval_over_vision_text_and_cross_attention(tmp_path):
    out = tmp_path / "c"
    argv = [*DATA, "--epochs-search", "1", "--epochs", "1", "--align-attn", "1", "--align-mlp", "1"]
    assert main(["compress", *argv, "--p", "0.5", "--output-dir", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["adapter"].split("+")) == {"hf-blip", "hf-bert"}
    assert {s["tower"] for s in plan["structures"]} == {"vision", "text", "cross"}
    report = json.loads((out / "report.json").read_text())
    assert {"i2t_r1", "t2i_r1", "r_mean"} <= set(report["compressed"]["metrics"])
    assert main(["evaluate", "--compressed", str(out)]) == 0


@pytest.mark.ddp
@pytest.mark.e2e
def test_the_rerank_shared_out_over_two_ranks_gives_every_rank_the_scores_of_one(tmp_path):
    """Each rank rescores every other query (and an odd count: 7 images, 35 captions); the matrices every rank
    ends with are those one process computes alone."""
    worker = Path(__file__).with_name("rerank_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(worker)]
        result = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    alone = torch.load(tmp_path / "rerank1-0.pt", weights_only=True)
    assert (alone["i2t"] > -100).sum() == 7 * 3 and (alone["t2i"] > -100).sum() == 35 * 3
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"rerank2-{rank}.pt", weights_only=True)
        for key in ("i2t", "t2i"):
            torch.testing.assert_close(shared[key], alone[key], rtol=0, atol=1e-5)
