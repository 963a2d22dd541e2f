from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import igpt
from igpt.weights.checkpoint import load_checkpoint, save_checkpoint
from igpt.palette import Palette


@pytest.fixture
def palette16() -> Palette:
    g = torch.Generator().manual_seed(0)
    return Palette(torch.rand(16, 3, generator=g) * 2 - 1)


def test_save_load_gives_identical_logits(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16, {"step": 7})
    model, palette, config = load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 16, (2, 16))
    assert torch.equal(model(ids), nano_model(ids))
    assert palette.fingerprint() == palette16.fingerprint() and config["step"] == 7
    assert not model.training
    loaded, pal = igpt.load(tmp_path / "ckpt")
    assert torch.equal(loaded(ids), nano_model(ids)) and pal.k == 16


def test_overwriting_a_checkpoint_leaves_no_temporaries(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16)
    with torch.no_grad():
        nano_model.sos.add_(1.0)
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    model, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(model.sos, nano_model.sos)


def test_strict_loading_names_the_tensor(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16)
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(str(weights))
    del state["blocks.1.mlp.c_fc.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="blocks.1.mlp.c_fc.weight"):
        load_checkpoint(tmp_path / "ckpt")
    state["blocks.1.mlp.c_fc.weight"] = torch.zeros(3, 3)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"blocks.1.mlp.c_fc.weight has shape \(3, 3\)"):
        load_checkpoint(tmp_path / "ckpt")


def test_palette_mismatch_and_bad_paths(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["palette_fingerprint"] = "0" * 16
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fingerprint"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither an igpt checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="palette has 8 colours"):
        save_checkpoint(tmp_path / "other", nano_model, Palette(torch.zeros(8, 3).uniform_(-1, 1)))
