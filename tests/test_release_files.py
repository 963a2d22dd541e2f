"""Files written by release 0.1, before a tokenizer was called a tokenizer (tests/fixtures/release_0_1: their
README says how each was made), read as that release read them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import igpt
from igpt.cli import main
from igpt.config import DataConfig
from igpt.config.tokenizer import VQConfig
from igpt.data.open import open_labelled
from igpt.record import CheckpointRecord
from igpt.tokenizers import load_tokenizer
from igpt.train.rundir import read_run

OLD = Path(__file__).parent / "fixtures" / "release_0_1"
EXPECTED = json.loads((OLD / "expected.json").read_text())


@pytest.fixture
def old(tmp_path, monkeypatch) -> Path:
    """A copy of the old files (relative paths inside them, as written, resolve from it)."""
    shutil.copytree(OLD, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    return tmp_path / "old"


def test_an_old_checkpoint_loads_with_its_tokenizer_and_the_same_logits():
    config = json.loads((OLD / "run/checkpoints/step-0000002/config.json").read_text())
    assert config["format_version"] == 2 and "palette_fingerprint" in config  # the old field name
    model, tokenizer, record = igpt.load(OLD / "run/checkpoints/step-0000002")
    assert record.tokenizer_fingerprint == tokenizer.fingerprint() == EXPECTED["palette_fingerprint"]
    assert record.step == EXPECTED["checkpoint_step"]
    with torch.no_grad():
        logits = model(torch.arange(16).remainder(4).view(1, 16))
    assert np.allclose(logits[0, 0].numpy(), EXPECTED["logits_first_row"], atol=1e-5)
    assert model.tokenizer is model.palette is tokenizer  # the old attribute name still answers


def test_an_old_record_reads_as_a_new_one_and_is_written_under_the_new_name():
    d = json.loads((OLD / "run/checkpoints/step-0000002/config.json").read_text())
    record = CheckpointRecord.from_json(d, "config.json")
    written = record.to_json()
    assert written["tokenizer_fingerprint"] == EXPECTED["palette_fingerprint"] and "palette_fingerprint" not in written
    assert CheckpointRecord.from_json(written, "config.json") == record


def test_an_old_vq_tokenizer_keeps_its_fingerprint_and_encodes_the_same():
    tok = load_tokenizer(OLD / "vq/tokenizer.safetensors")  # its header config says codebook_size
    assert tok.fingerprint() == EXPECTED["vq_fingerprint"] and tok.k == 8
    x = np.load(OLD / "digits64.npz")["x_train"][:2]
    ids = tok.encode(np.repeat(x[..., None], 3, -1)).reshape(2, -1)
    assert ids.tolist() == EXPECTED["vq_ids_first_two_images"]


def test_old_caches_keep_their_tokenizer_check():
    palette = load_tokenizer(OLD / "palette.npz")
    assert palette.fingerprint() == EXPECTED["palette_fingerprint"]
    images = open_labelled(OLD / "cache", "train", n_px=4, tokenizer=palette)
    assert images.tokenizer_fingerprint == EXPECTED["palette_fingerprint"]
    vq = load_tokenizer(OLD / "vq/tokenizer.safetensors")
    assert len(open_labelled(OLD / "vqcache", "train", n_px=8, tokenizer=vq).ids) == EXPECTED["vqcache_train_n"]
    # the fingerprint recorded by the old cache is still compared: another tokenizer is refused
    with pytest.raises(ValueError, match="ids were made with"):
        open_labelled(OLD / "vqcache", "train", n_px=8, tokenizer=load_tokenizer(OLD / "palette.npz"))


def test_old_run_and_fit_records_read_their_renamed_fields():
    run = json.loads((OLD / "run/run.json").read_text())
    assert {"palette", "palette_k"} <= set(run["data"])
    _, _, data = read_run(OLD / "run")
    assert data == DataConfig(data="cache", tokenizer="palette.npz", vocab_size=512)
    fit = json.loads((OLD / "vq/fit.json").read_text())
    assert VQConfig.from_dict(fit["vq"]).vocab_size == fit["vq"]["codebook_size"] == 8


def test_an_old_run_resumes(old):
    assert main(["-q", "pretrain", "--resume", "run", "--max-steps", "4"]) == 0
    record = json.loads((old / "run/checkpoints/step-0000004/config.json").read_text())
    assert record["tokenizer_fingerprint"] == EXPECTED["palette_fingerprint"] and record["step"] == 4


def test_an_old_vq_fit_resumes(old):
    assert main(["-q", "tokenizer", "fit", "--resume", "vq", "--steps", "3"]) == 0
    assert load_tokenizer(old / "vq/tokenizer.safetensors").fingerprint() != EXPECTED["vq_fingerprint"]


def test_the_python_api_keeps_the_old_name_of_the_tokenizer(tmp_path):
    loaded = igpt.load(OLD / "run")
    assert loaded.palette is loaded.tokenizer is loaded.model.tokenizer
    model = igpt.GPT(loaded.model.config)  # built, not loaded: it knows no tokenizer
    model.load_state_dict(loaded.model.state_dict())
    model.save_pretrained(tmp_path / "saved", palette=loaded.tokenizer)  # the old keyword
    assert igpt.load(tmp_path / "saved").tokenizer.fingerprint() == EXPECTED["palette_fingerprint"]
    with pytest.raises(ValueError, match="not both"):
        model.save_pretrained(tmp_path / "again", tokenizer=loaded.tokenizer, palette=loaded.tokenizer)


def test_an_old_run_resumes_with_a_flag_under_its_old_name(old):
    # the run's own value, given under the old name, is no change: the resume goes on
    assert main(["-q", "pretrain", "--resume", "run", "--max-steps", "4", "--palette-k", "512"]) == 0
    assert (old / "run/checkpoints/step-0000004").is_dir()
