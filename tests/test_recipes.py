"""configs/: one file per compress script of the original UPop code. Every file parses, its settings (resolved as the
CLI resolves them, on the script's GPU count) equal the original's values in the table below (read from the
scripts, their configs/*.yaml and the argparse defaults of compress_*.py at github.com/sdc17/UPop), every file runs
end to end at tiny size on the built-in data, and the docs' table of them is the one rendered from the files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from upop.cli import build_parser, main
from upop.cli.app import _per_rank_batch, _prune_config, _recipe, _run_config
from upop.cli.config_file import apply_config, given_on_command_line

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# ------------------------------------------------------------------------------------ the original's values
PAPER_RANKING = {"score": "gradient", "standardise": "kind", "floor": 0.0, "align_attn": 1, "align_mlp": 1}
BLIP = {
    **PAPER_RANKING,
    "gpus": 8,
    "per_gpu_batch": 32,  # batch_size_train
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "search_schedule": "constant",  # no cosine_lr_schedule call in the search loop
    "schedule": "epoch-cosine",  # cosine_lr_schedule(optimizer, epoch, max_epoch, init_lr, min_lr) per epoch
    "min_lr": 0.0,
    "cost": "paper",
    "attn_cost": 36.0,  # compression_weight[attn] = 36 = 12 heads x (q, k, v)
    "augment": "blip",  # create_dataset's train transform
    "text_dropout": 0.1,  # med_config.json: hidden_dropout_prob, attention_probs_dropout_prob
}
NLVR = {**BLIP, "task": "nlvr", "image_size": 384, "lr": 3e-6, "interval": 50, "w_attn": 4.8e-3 / 8, "w_mlp": 2e-4 / 8}
NLVR.update(drop_path=0.1, nlvr_swap=True)  # blip_nlvr.py drop_path_rate; nlvr_dataset.py's swap
CAPTION = {**BLIP, "task": "caption", "image_size": 384, "lr": 1e-5, "interval": 100}
CAPTION.update(w_attn=3.2e-2 / 8, w_mlp=1e-3 / 8)
VQA = {**BLIP, "task": "vqa", "image_size": 480, "lr": 2e-5, "interval": 1000, "w_attn": 1.44e-2 / 8, "w_mlp": 5e-4 / 8}
VQA.update(drop_path=0.1, answer_grouping="raw", select_size=0, vqa_inference="rank")
VQA["vqa_train_files"] = ("vqa_train.json", "vqa_val.json", "vg_qa.json")  # train_files: vqa_train, vqa_val, vg_qa
RETRIEVAL = {**BLIP, "task": "retrieval", "lr": 1e-5, "momentum_distill": True, "queue_size": 57600}
RETRIEVAL.update(clamp_temperature=True)  # temp.clamp_(0.001, 0.5); CLIP: logit_scale.clamp_(0, 4.6052)
BLIP_RETRIEVAL = {**RETRIEVAL, "image_size": 384, "w_attn": 6.4e-3 / 8, "w_mlp": 2e-4 / 8, "negatives_all_ranks": True}
CLIP = {**RETRIEVAL, "image_size": 336, "weight_decay": 0.2, "w_attn": 22 / 15 * 8e-3 / 8, "w_mlp": 2e-4 / 8}
CLIP.pop("text_dropout")  # CLIP has no dropout
DEIT = {
    **PAPER_RANKING,
    "task": "classification",
    "gpus": 8,
    "per_gpu_batch": 512,
    "image_size": 224,
    "epochs_search": 60,
    "epochs": 300,
    "lr": 1e-4 * 512 * 8 / 512,  # --lr 1e-4, linearly scaled by the global batch over 512
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "search_schedule": "constant",
    "schedule": "epoch-cosine",  # timm's cosine scheduler stepped per epoch, warm-up 0
    "min_lr": 1e-5,
    "cost": "paper",
    "attn_cost": 9234 / 769,
    "w_attn": 4.8e-3,  # not divided by the world size in the DeiT and Segmenter scripts
    "w_mlp": 2e-4,
    "augment": "deit",
    "drop_path": 0.1,
    "select_on": "report",  # best_checkpoint.pth by ImageNet val acc1, the accuracy reported
}
SEGMENTER = {
    **PAPER_RANKING,
    "task": "segmentation",
    "gpus": 4,
    "per_gpu_batch": 16,  # --batch-size 64 is the world batch
    "image_size": 512,
    "epochs_search": 16,
    "epochs": 64,
    "lr": 4e-3,
    "optimizer": "sgd",  # SGD, momentum 0.9, nesterov
    "weight_decay": 0.0,
    "search_schedule": "constant",
    "schedule": "poly",  # PolynomialLR power 0.9, per iteration
    "min_lr": 1e-5,
    "cost": "paper",
    "attn_cost": 9234 / 769,
    "w_attn": 4.8e-3,
    "w_mlp": 2e-4,
    "augment": "segmenter",
    "drop_path": 0.1,
    "window_stride": 480,  # miou.py: window_size - 32
    "multiscale_mode": "reference",
    "select_on": "report",  # checkpoint_best.pth by val mIoU, the split reported
}
ORIGINAL = {
    **{f"nlvr_nlvr2_{x}x": {**NLVR, "p": p, "epochs": e} for x, p, e in ((2, 0.5, 15), (3, 0.667, 20))},
    **{f"nlvr_nlvr2_{x}x": {**NLVR, "p": p, "epochs": e} for x, p, e in ((4, 0.75, 23), (5, 0.8, 24), (10, 0.9, 27))},
    **{f"caption_coco_{x}x": {**CAPTION, "p": p, "epochs": e} for x, p, e in ((2, 0.5, 5), (4, 0.75, 8))},
    **{f"vqa_vqa2_{x}x": {**VQA, "p": p, "epochs": e} for x, p, e in ((2, 0.5, 10), (4, 0.75, 15))},
    **{
        f"retrieval_coco_{x}x": {**BLIP_RETRIEVAL, "p": p, "epochs": e, "interval": 200, "rerank_k": 256}
        for x, p, e in ((2, 0.5, 6), (4, 0.75, 9))
    },
    **{
        f"retrieval_flickr_{x}x": {**BLIP_RETRIEVAL, "p": p, "epochs": e, "interval": 50, "rerank_k": 128}
        for x, p, e in ((2, 0.5, 12), (4, 0.75, 18))
    },
    **{
        f"retrieval_coco_clip_{x}x": {**CLIP, "p": p, "epochs": e, "interval": 200}
        for x, p, e in ((2, 0.5, 6), (4, 0.75, 9))
    },
    **{
        f"retrieval_flickr_clip_{x}x": {**CLIP, "p": p, "epochs": e, "interval": 50}
        for x, p, e in ((2, 0.5, 12), (4, 0.75, 18))
    },
    **{
        f"classification_imagenet_{pct:03d}x": {**DEIT, "p": pct / 100, "interval": interval}
        for pct, interval in ((10, 1600), (20, 1000), (30, 800), (40, 800), (50, 800))
    },
    **{
        f"segmentation_ade20k_{pct:03d}x": {**SEGMENTER, "p": pct / 100, "interval": interval}
        for pct, interval in ((10, 500), (15, 400), (20, 300), (30, 200))
    },
}
for values in ORIGINAL.values():  # the BLIP and CLIP scripts' --epoch runs the search and the retraining
    values.setdefault("epochs_search", values["epochs"])
    values.setdefault("lr_search", values["lr"])


def _resolve(path: Path, gpus: int, monkeypatch) -> dict:
    """Every setting of ``upop compress --config path`` as the CLI resolves it on ``gpus`` processes."""
    monkeypatch.setenv("WORLD_SIZE", str(gpus))
    argv = ["compress", "--config", str(path), "--output-dir", "unused"]
    parser = build_parser()
    apply_config(parser, argv)
    args = parser.parse_args(argv)
    _per_rank_batch(args, given_on_command_line(parser, argv))
    run, prune, recipe = _run_config(args), _prune_config(args), _recipe(args, None)
    out = {**vars(recipe), **prune.to_dict(), **vars(run.options), **run.data.to_dict()}
    out.update(task=run.task, per_gpu_batch=run.batch_size, drop_path=run.drop_path, text_dropout=run.text_dropout)
    out["vqa_train_files"] = run.data.vqa_train_files
    out["search_schedule"] = recipe.search_schedule
    return out


def test_there_is_one_config_per_compress_script_of_the_original():
    assert sorted(p.stem for p in CONFIGS) == sorted(ORIGINAL)
    assert len(CONFIGS) == 26


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_config_holds_the_original_s_values(path, monkeypatch):
    expected = dict(ORIGINAL[path.stem])
    got = _resolve(path, expected.pop("gpus"), monkeypatch)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value, (key, got[key])
    for key in set(BLIP) | set(NLVR) | set(VQA) | set(BLIP_RETRIEVAL) | set(DEIT) | set(SEGMENTER):
        if key not in expected and key in ("drop_path", "text_dropout", "window_stride"):
            assert got[key] is None, key  # what the original leaves at the model's own is not set
    about = __import__("yaml").safe_load(path.read_text())["about"]
    assert f"compress_{path.stem}.sh" in about["follows"] and about["reproduces"]


# the overrides that make a config tiny: a micro model, a few built-in samples, one epoch each, a small batch
TINY = "--train-size 32 --val-size 8 --batch-size 8 --epochs-search 1 --epochs 1 --interval 1".split()
MODELS = {"nlvr": "blip-micro", "caption": "blip-micro", "vqa": "blip-micro", "classification": "vit-micro"}
MODELS.update(segmentation="segmenter-micro")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_config_runs_end_to_end_at_tiny_size(path, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    task = ORIGINAL[path.stem]["task"]
    model = "clip-micro" if "clip" in path.stem else MODELS.get(task, "blip-micro")
    out = tmp_path / "out"
    argv = ["compress", "--config", str(path), "--model", model, "--image-size", "16", *TINY, "--output-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["pruned_cost_fraction"] == pytest.approx(ORIGINAL[path.stem]["p"], abs=0.06)
    header = (out / "report.md").read_text()
    paper_protocol = "paper protocol: selected on the reported split" in header
    assert paper_protocol == (ORIGINAL[path.stem].get("select_on") == "report")
    saved = json.loads((out / "config.json").read_text())
    assert saved["run"]["config_file"] == str(path)
    capsys.readouterr()
    # the same file evaluates it (with the same overrides: the file's image size is the real one)
    assert (
        main(["evaluate", "--config", str(path), "--model", model, "--image-size", "16", "--compressed", str(out)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    evaluation = json.loads("\n".join(lines[lines.index("{") :]))
    assert evaluation["metrics"] == pytest.approx(report["compressed"]["metrics"])


def test_the_docs_table_is_the_one_rendered_from_the_files():
    spec = importlib.util.spec_from_file_location("recipes_table", ROOT / "configs" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "configs" / "recipes.md").read_text() == module.render()
