"""The README's Python API snippet, extracted from README.md and run verbatim by a fresh interpreter, on a
real photo, with a tiny checkpoint where the snippet expects ``make demo``'s run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import randomize
from PIL import Image

from igpt.config import ModelConfig
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # runs the snippet in a fresh interpreter
def test_readme_python_snippet_runs_as_written(tmp_path):
    code = readme_snippet()
    assert 'igpt.load("igpt-demo/run")' in code  # where the tiny run goes
    cfg = ModelConfig(n_layer=2, n_embd=16, n_head=2, n_px=8, n_vocab=16)  # the demo's palette size and n_px
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32))
    save_checkpoint(tmp_path / "igpt-demo" / "run" / "checkpoints" / "step-5", randomize(GPT(cfg)).eval(),
                    palette, CheckpointRecord(cfg, palette.fingerprint(), step=5))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "sample.png") as img:
        assert img.size == (64, 64)
    assert (tmp_path / "my-igpt" / "palette.npz").is_file() and (tmp_path / "china.jpg").is_file()
    assert palette.fingerprint() in run.stdout
