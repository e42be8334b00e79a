"""The commands the README and the docs show stay true (`make docs-check`; also part of `make test`):

- every `upop` command parses with the real argument parser (a renamed or removed flag fails here);
- every command on the built-in data runs, page by page in order (a train before the compress that reads its
  weights), at tiny size: the sizes and epochs of the command are replaced by small ones, nothing else;
- every command on the user's own files (paths under /data, /models, /ckpt) names, in ``REAL_DATA``, the tests that
  run its parts on tiny files in the same formats (its weights as released or an HF directory, its data through the
  format's reader, its task through the CLI); the named tests must exist. The whole command on such files at once
  (e.g. VQA at 480 px from a 384 px checkpoint) is not run here.

The other commands the docs show: `make demo` and `make test` run in CI from a fresh clone, `make docs` in CI,
`python benchmarks/gpu_check.py` at tiny size in tests/test_gpu_check.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
USERS_FILES = re.compile(r"(^|[:=\s])/(data|models|ckpt)/")
TINY = {  # flag -> the value a documented command runs with here
    "--train-size": "64",
    "--val-size": "16",
    "--batch-size": "16",
    "--epochs": "1",
    "--epochs-search": "1",
}
# a documented command on the user's files -> the tests that run its parts on tiny files of the same formats (the
# weights as released or an HF directory, the data format through its reader, the task through the CLI)
CAPTION, NLVR, RETRIEVAL = "tasks/test_caption.py", "tasks/test_nlvr.py", "tasks/test_retrieval.py"
BLIP_RETRIEVAL, SEGMENTATION, VQA = "tasks/test_blip_retrieval.py", "tasks/test_segmentation.py", "tasks/test_vqa.py"
KARPATHY = (RETRIEVAL, "test_karpathy_reader_on_a_fixture")
LOADER, EVALUATE = "jobs/test_pretrained.py", "jobs/test_evaluate.py"
ORIGINAL_COMPRESSED = (LOADER, "test_an_original_compressed_checkpoint_loads_and_gives_the_original_outputs")
REAL_DATA = {
    "model_base_caption_capfilt_large.pth": (
        (CAPTION, "test_a_released_blip_caption_checkpoint_loads_through_the_key_map"),
        (CAPTION, "test_an_hf_blip_captioning_directory_generates_and_decodes"),
        KARPATHY,
        (CAPTION, "test_cli_compresses_a_captioner_with_its_decoder_in_the_budget"),
    ),
    "model_base_nlvr.pth": (
        (NLVR, "test_a_released_blip_nlvr_checkpoint_loads_through_the_key_map"),
        (NLVR, "test_an_hf_blip_directory_starts_nlvr_with_its_cross_attention_in_both_branches"),
        (NLVR, "test_reader_of_the_nlvr2_format"),
        (NLVR, "test_cli_compresses_vision_text_and_cross_attention_in_one_budget"),
    ),
    "hf:/models/clip-vit-base-patch16": (
        (RETRIEVAL, "test_cli_hf_clip_directory_through_compress_and_evaluate"),
        KARPATHY,
    ),
    "open_clip:ViT-B-16-quickgelu": (
        (RETRIEVAL, "test_cli_open_clip_from_a_config_and_weights_and_a_checkpoint_of_another_architecture"),
        KARPATHY,
    ),
    "model_base_retrieval_coco.pth": (
        (BLIP_RETRIEVAL, "test_a_released_blip_retrieval_checkpoint_loads_without_its_momentum_encoders"),
        (BLIP_RETRIEVAL, "test_an_hf_blip_retrieval_directory_gives_hf_s_itc_and_itm"),
        KARPATHY,
        (BLIP_RETRIEVAL, "test_cli_compresses_blip_retrieval_over_vision_text_and_cross_attention"),
    ),
    "seg_small_mask/checkpoint.pth": ((SEGMENTATION, "test_cli_compresses_a_released_segmenter_on_an_ade20k_folder"),),
    # the paper's compressed checkpoints (docs/released.md): the loader against the original's arithmetic, per family,
    # and evaluate on that task's data format without training data
    "model_base_nlvr_nlvr2_2x_compressed.pth": (ORIGINAL_COMPRESSED, (NLVR, "test_reader_of_the_nlvr2_format")),
    "model_base_caption_capfilt_large_coco_2x_compressed.pth": (ORIGINAL_COMPRESSED, KARPATHY),
    "model_base_vqa_capfilt_large_vqa2_2x_compressed.pth": (
        ORIGINAL_COMPRESSED,
        (
            "models/test_blip_files.py",
            "test_a_directory_of_another_image_size_is_built_at_the_asked_size_with_its_positions_interpolated",
        ),
    ),
    "model_base_retrieval_coco_2x_compressed.pth": (
        ORIGINAL_COMPRESSED,
        (EVALUATE, "test_a_retrieval_folder_with_only_its_test_file_is_evaluated"),
    ),
    "clip_large_retrieval_coco_2x_compressed.pth": (
        ORIGINAL_COMPRESSED,
        (EVALUATE, "test_a_named_open_clip_architecture_is_built_on_the_meta_device"),
    ),
    "deit_small_patch16_224_050x_compressed.pth": (
        (LOADER, "test_evaluate_reads_an_original_compressed_checkpoint_and_says_what_it_inferred"),
        (EVALUATE, "test_a_classification_folder_with_only_val_is_evaluated"),
    ),
    "seg_small_mask_030x_compressed.pth": (
        ORIGINAL_COMPRESSED,
        (EVALUATE, "test_a_released_segmenter_is_evaluated_from_its_directory_alone"),
    ),
    # a paper recipe (configs/): every file against the original's values and run end to end at tiny size
    "--config configs/": (
        ("test_recipes.py", "test_a_config_holds_the_original_s_values"),
        ("test_recipes.py", "test_a_config_runs_end_to_end_at_tiny_size"),
    ),
    "model_base_vqa_capfilt_large.pth": (
        (VQA, "test_a_released_blip_vqa_checkpoint_loads_through_the_key_map"),
        (VQA, "test_an_hf_blip_vqa_directory_answers_as_hf_s_model"),
        (VQA, "test_a_vqa_folder_trains_and_writes_the_test_dev_submission"),
        (VQA, "test_cli_compresses_vqa_over_all_four_towers_in_one_budget"),
    ),
}


def shell_lines(page: Path) -> list[str]:
    """The command lines of the page's fenced code blocks (continuation lines joined, comments dropped)."""
    lines, block, inside = [], [], False
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            if inside:
                text = "\n".join(block).replace("\\\n", " ")
                lines += [" ".join(line.split("  #")[0].split()) for line in text.splitlines()]
            inside, block = not inside, []
        elif inside:
            block.append(line)
    return [line for line in lines if line]


def upop_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every `upop` command the pages show, in page order."""
    found = []
    for page in PAGES:
        for line in shell_lines(page):
            if line.startswith("upop "):
                argv = shlex.split(line)[1:]
                if "..." not in argv:  # an elided command ("... --data /data/coco ...") shows only a part
                    found.append((page.relative_to(ROOT).as_posix(), argv))
    return found


def test_the_docs_show_commands_of_every_kind():
    commands = upop_commands()
    assert {argv[0] for _, argv in commands} >= {"train", "compress", "evaluate", "export", "latency-table"}
    assert any(USERS_FILES.search(" ".join(argv)) for _, argv in commands)


@pytest.mark.parametrize("page, argv", upop_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x[:3]))
def test_every_documented_command_parses(page, argv):
    from upop.cli import build_parser

    build_parser().parse_args(argv)  # argparse exits on an unknown flag or a bad value


def test_every_command_on_the_users_files_names_the_test_that_runs_its_flow():
    for page in PAGES:
        for line in shell_lines(page):
            if line.startswith("upop ") and USERS_FILES.search(line):
                covering = [test for key, test in REAL_DATA.items() if key in line]
                assert covering, f"{page.name}: {line[:100]}"
    for path, name in {test for tests in REAL_DATA.values() for test in tests}:
        assert re.search(rf"^def {name}\(", (ROOT / "tests" / path).read_text(), re.M), f"{path}::{name}"


APPLIES = {  # the tiny settings each command takes
    "train": ("--train-size", "--val-size", "--batch-size", "--epochs"),
    "compress": tuple(TINY),
    "evaluate": ("--train-size", "--val-size", "--batch-size"),
    "latency-table": ("--batch-size",),
    "export": (),
}


def _tiny(argv: list[str], where: Path) -> list[str]:
    """``argv`` at tiny size (``TINY``, where the command takes it), its files under ``where``."""
    command, rest = argv[0], list(argv[1:])
    for flag in APPLIES[command]:
        if flag in rest:
            rest[rest.index(flag) + 1] = TINY[flag]
        else:
            rest += [flag, TINY[flag]]
    moved = [str(where / a) if a.startswith("runs/") or a.endswith((".onnx", ".json")) else a for a in rest]
    return [command, *moved]


@pytest.mark.e2e
@pytest.mark.slow
def test_every_command_on_the_builtin_data_runs(tmp_path):
    from upop.cli import main

    ran = [argv for _, argv in upop_commands() if not USERS_FILES.search(" ".join(argv))]
    for page, argv in upop_commands():
        if not USERS_FILES.search(" ".join(argv)):
            assert main(_tiny(argv, tmp_path / page.replace("/", "_"))) == 0, f"{page}: upop {' '.join(argv)}"
    assert len(ran) >= 10


def test_every_flag_of_every_command_is_in_the_configuration_page():
    from upop.cli import build_parser

    page = (ROOT / "docs" / "configuration.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [
        f"{name} {flag}"
        for name, sub in commands.items()
        for action in sub._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help" and f"`{flag}" not in page
    ]
    assert missing == []


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
