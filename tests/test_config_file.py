"""``--config FILE``: the file's values become the flags' defaults, the command line overrides them, unknown keys are
refused naming the closest one, another command's keys are not applied, and the resolved settings reach config.json."""

from __future__ import annotations

import json

import pytest
from helpers import compress_argv

from upop.cli import build_parser, main
from upop.cli.config_file import apply_config, given_on_command_line


def _parse(argv: list[str]):
    parser = build_parser()
    applied = apply_config(parser, argv)
    return parser.parse_args(argv), applied


def _write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_file_values_become_defaults_and_the_command_line_wins(tmp_path):
    path = _write(
        tmp_path,
        "about: {script: x.sh}\nlr-search: 3e-6\nepochs_search: 15\ninterval: 50\namp: true\n"
        "exclude: [head, 're:blocks\\.0\\.']\ncost: paper\nattn-cost: 9234/769\noutput-dir: out\n",
    )
    args, applied = _parse(["compress", "--config", path, "--interval", "7"])
    assert args.lr_search == 3e-6 and isinstance(args.lr_search, float)  # YAML reads 3e-6 as a string
    assert args.epochs_search == 15 and args.interval == 7  # the command line overrides the file
    assert args.amp is True and args.exclude == ["head", "re:blocks\\.0\\."]
    assert args.attn_cost == pytest.approx(9234 / 769)
    assert args.output_dir == "out"  # a required flag may come from the file
    assert "about" not in applied and applied["interval"] == 50
    # a switch set by the file is turned off on the command line
    args, _ = _parse(["compress", "--config", path, "--no-amp"])
    assert args.amp is False


def test_keys_of_another_command_are_not_applied_and_evaluate_takes_the_shared_ones(tmp_path):
    path = _write(tmp_path, "task: nlvr\nmodel: blip-micro\nlr-search: 1e-5\ninterval: 50\nimage-size: 32\n")
    args, applied = _parse(["evaluate", "--config", path, "--compressed", "d"])
    assert args.task == "nlvr" and args.model == "blip-micro" and args.image_size == 32
    assert "lr_search" not in vars(args) and set(applied) == {"task", "model", "image-size"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr_serch: 1e-5\n", "unknown key 'lr_serch'; did you mean 'lr-search'?"),
        ("granularity: rows\n", "granularity: 'rows' is not one of dim, head, mixed"),
        ("epochs: two\n", "epochs: 'two' is not a valid int"),
        ("amp: 1\n", "amp: expected true or false, got 1"),
        ("attn-cost: -3\n", "attn-cost: expected a positive number or fraction like 9234/769, got '-3'"),
        ("lr: [1, 2]\n", "lr: expected one value"),
        ("- a\n- b\n", "holds a list, not a mapping"),
        ("epochs: [\n", "is not valid YAML at line 2"),
    ],
)
def test_bad_files_are_one_line_naming_the_file_and_key(tmp_path, capsys, text, expected):
    path = _write(tmp_path, text)
    out = tmp_path / "out"
    assert main(["compress", "--config", path, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"upop: error: --config {path}")
    assert expected in err
    assert not out.exists()


def test_the_command_line_overrides_what_the_file_decided(tmp_path, monkeypatch):
    from upop.cli import app

    path = _write(tmp_path, "cost: paper\nattn-cost: 36\nscore: gradient\nfloor: 0\nexclude: [a, b]\n")
    seen = {}
    monkeypatch.setitem(app.COMMANDS, "compress", lambda args: seen.update(prune=app._prune_config(args), args=args))
    assert main(["compress", "--config", path, "--cost", "params", "--exclude", "c", "--output-dir", "o"]) == 0
    assert seen["prune"].cost == "params" and seen["prune"].attn_cost is None  # the file's constant left out
    assert seen["prune"].exclude == ("c",)  # a repeatable flag on the command line replaces the file's list
    assert main(["compress", "--config", path, "--paper-ranking", "--output-dir", "o"]) == 0
    assert (seen["prune"].score, seen["prune"].floor, seen["prune"].exclude) == ("gradient", 0.0, ("a", "b"))
    assert main(["compress", "--conf", path, "--output-dir", "o"]) == 0  # argparse's prefix reads the file too
    assert seen["prune"].cost == "paper"


def test_a_switch_is_true_or_false_not_its_no_form(tmp_path, capsys):
    path = _write(tmp_path, "no-amp: true\n")
    assert main(["compress", "--config", path, "--output-dir", str(tmp_path / "o")]) == 2
    assert "unknown key 'no-amp'; did you mean 'amp'?" in capsys.readouterr().err


def test_evaluate_keeps_the_evaluated_run_s_batch_not_a_file_s_global_training_batch(tmp_path, monkeypatch):
    from upop.cli.app import _per_rank_batch

    path = _write(tmp_path, "global-batch-size: 4096\n")
    argv = ["evaluate", "--config", path, "--compressed", "d"]
    parser = build_parser()
    apply_config(parser, argv)
    args = parser.parse_args(argv)
    _per_rank_batch(args, given_on_command_line(parser, argv))
    assert "batch_size" not in vars(args)  # the value saved beside the compressed directory applies


def test_a_missing_file_is_refused(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_global_batch_size_divides_over_the_world_and_the_command_line_per_rank_size_wins(tmp_path, monkeypatch):
    from upop.cli.app import _per_rank_batch

    path = _write(tmp_path, "global-batch-size: 256\n")
    monkeypatch.setenv("WORLD_SIZE", "8")
    for argv, expected in (
        (["compress", "--config", path, "--output-dir", "o"], 32),
        (["compress", "--config", path, "--batch-size", "4", "--output-dir", "o"], 4),
        (["compress", "--global-batch-size", "64", "--output-dir", "o"], 8),
    ):
        parser = build_parser()
        apply_config(parser, argv)
        args = parser.parse_args(argv)
        _per_rank_batch(args, given_on_command_line(parser, argv))
        assert args.batch_size == expected, argv
    monkeypatch.setenv("WORLD_SIZE", "3")
    from upop.errors import UPopError

    args = build_parser().parse_args(["compress", "--global-batch-size", "64", "--output-dir", "o"])
    with pytest.raises(UPopError, match="does not divide over 3"):
        _per_rank_batch(args, {"global_batch_size"})


def test_given_on_command_line_sees_prefixes_and_equals_forms():
    parser = build_parser()
    argv = ["compress", "--batch-s", "4", "--lr=0.1", "--output-dir", "o"]
    assert given_on_command_line(parser, argv) == {"batch_size", "lr", "output_dir"}


@pytest.mark.e2e
def test_a_config_run_records_the_resolved_settings_in_config_json(tmp_path, capsys):
    path = _write(tmp_path, "p: 0.25\nlr: 1e-3\noptimizer: sgd\nlr-schedule: poly\nmin-lr: 1e-5\nweight-decay: 0\n")
    out = tmp_path / "run"
    argv = compress_argv(None, out, "--config", path, "--lr", "2e-3")
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["prune"]["p"] == 0.25
    recipe = saved["recipe"]
    assert (recipe["lr"], recipe["optimizer"], recipe["schedule"], recipe["min_lr"]) == (2e-3, "sgd", "poly", 1e-5)
    assert recipe["weight_decay"] == 0.0
    assert saved["run"]["config_file"] == path
    header = (out / "report.md").read_text()
    assert "(poly), sgd with weight decay 0.0" in header
