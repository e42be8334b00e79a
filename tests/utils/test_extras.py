"""The optional parts (extras): without one, what needs it stops with one line naming the extra to install, and what
does not need it runs on (a compress run without matplotlib writes no pictures and says so)."""

from __future__ import annotations

import json
import sys

import pytest

from upop.cli import main
from upop.errors import UPopError
from upop.utils.extras import require

TINY = "--train-size 32 --val-size 8 --batch-size 8".split()


@pytest.fixture
def without(monkeypatch):
    """Make ``import name`` fail, as on a machine without that package."""

    def hide(name: str) -> None:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, module)
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError on import

    return hide


@pytest.mark.parametrize(
    "module, extra", [("open_clip", "open_clip"), ("onnxruntime", "export"), ("pycocoevalcap", "caption")]
)
def test_a_missing_extra_is_one_line_naming_it(without, module, extra):
    without(module)
    with pytest.raises(UPopError) as caught:
        require(module, "this feature")
    message = str(caught.value)
    assert "\n" not in message and f"pip install 'upop[{extra}]'" in message and module in message


def test_an_open_clip_model_without_the_extra_is_refused_in_one_line(without, tmp_path, capsys):
    without("open_clip")
    argv = ["train", "--task", "retrieval", "--model", "open_clip:ViT-B-16", *TINY, "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upop[open_clip]" in err[0] and not (tmp_path / "o").exists()


def test_captioning_without_its_metrics_is_refused_before_training(without, tmp_path, capsys):
    without("pycocoevalcap")
    argv = ["train", "--task", "caption", "--model", "blip-micro", *TINY, "--output-dir", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upop[caption]" in err[0] and not (tmp_path / "c").exists()


@pytest.mark.e2e
def test_compress_without_matplotlib_writes_everything_but_the_pictures(without, tmp_path, capsys):
    from upop.utils import extras

    without("matplotlib")
    assert not extras.available("matplotlib")
    out = tmp_path / "c"
    argv = ["compress", "--model", "vit-micro", *TINY, "--epochs-search", "1", "--epochs", "0"]
    assert main([*argv, "--output-dir", str(out)]) == 0
    assert "upop[plots]" in capsys.readouterr().err
    assert not (out / "kept.png").exists() and json.loads((out / "report.json").read_text())["kept"]
