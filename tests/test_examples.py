"""Every script under examples/ runs at tiny size: it searches inside its training stack, compresses, saves, and
checks that upop.load_compressed gives back a model computing the same outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


def test_there_is_an_example_per_integration():
    assert [p.stem for p in EXAMPLES] == ["hf_trainer_vit", "lightning_timm", "plain_loop_open_clip"]


@pytest.mark.e2e
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_example_runs_and_its_saved_model_reloads(script, tmp_path):
    out = tmp_path / "compressed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), "--tiny", "--steps", "12", "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the reloaded model computes the same outputs" in result.stdout
    assert (out / "plan.json").is_file() and (out / "model.safetensors").is_file()
