"""igpt.weights.hf and ``igpt convert``: OpenAI's TF layout, Hugging Face ImageGPT both ways, bad input, all
without ``transformers`` (parity with it: test_interop_transformers.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import openai_reference, tf_arrays
from conftest import OPENAI_AR as AR
from conftest import OPENAI_BERT as BERT
from safetensors.torch import load_file, save_file

import igpt
from igpt.cli import main
from igpt.weights.hf import hf_to_igpt, igpt_to_hf, is_hf_dir, load_hf, save_hf
from igpt.weights.openai import load_openai, openai_to_igpt
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord


def record(model, palette, objective: str = "ar", **kw) -> CheckpointRecord:
    return CheckpointRecord(model.config, palette.fingerprint(), objective, **kw)

# ---- OpenAI ----

def test_openai_ar_checkpoint_matches_the_release_formulas():
    model, palette, info = load_openai(AR)
    assert info.objective == "ar" and info.step == 131000 and model.causal and palette.k == model.config.n_vocab == 16
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head, model.config.n_px) == (2, 8, 2, 4)
    w = tf_arrays(AR)
    ids = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).double()
    ref = openai_reference(w, ids)
    assert (ours - ref).abs().max() < 1e-5
    # The check has teeth: forgetting one transpose moves the logits far beyond the tolerance.
    with torch.no_grad():
        model.blocks[0].attn.c_proj.weight.copy_(model.blocks[0].attn.c_proj.weight.T.clone())
        assert (model(ids).double() - ref).abs().max() > 1e-3


def test_openai_bert_checkpoint_has_no_sos_and_matches_bidirectionally():
    model, _, info = load_openai(BERT)
    assert info.objective == "bert" and info.step == 262000 and model.config.n_layer == 1 and not model.causal
    assert torch.count_nonzero(model.sos) == 0  # filled with zeros: BERT never reads it
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (2, 16), generator=g)
    keep = torch.rand(2, 16, generator=g) > 0.3
    with torch.no_grad():
        ours = model(ids, causal=False, keep=keep).double()
    assert (ours - openai_reference(tf_arrays(BERT), ids, keep)).abs().max() < 1e-5


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop("model/h1/mlp/c_fc/w"), "tensor model/h1/mlp/c_fc/w is missing"),
    (lambda w: w.__setitem__("model/h0/attn/k_proj", np.zeros((2, 4, 9), np.float32)),
     r"model/h0/attn/k_proj has shape \(2, 4, 9\)"),
    (lambda w: w.__setitem__("model/wtet", np.zeros((15, 8), np.float32)), r"model/wtet has shape \(15, 8\)"),
    (lambda w: w.__setitem__("model/h0/attn/extra", np.zeros(3, np.float32)), "unexpected tensor model/h0/attn/extra"),
    (lambda w: w.pop("model/wte"), "model/wte is missing"),
    (lambda w: w.__setitem__("model/wpe", np.zeros((15, 8), np.float32)), "15 positions, not a square"),
])
def test_openai_bad_tensors_are_named(change, message):
    w = tf_arrays(AR)
    change(w)
    with pytest.raises(ValueError, match=message):
        openai_to_igpt({k: v.shape for k, v in w.items()}, w.__getitem__, "ckpt.index")
    w = tf_arrays(AR)  # and the untouched file, with its slots and global_step, converts
    openai_to_igpt({k: v.shape for k, v in w.items()}, w.__getitem__, "ckpt.index")


def test_openai_objective_override_and_missing_sos():
    w = tf_arrays(BERT)
    shapes = {k: v.shape for k, v in w.items()}
    with pytest.raises(ValueError, match="model/sos is missing"):
        openai_to_igpt(shapes, w.__getitem__, "x", objective="ar")
    ar = tf_arrays(AR)
    _, _, objective = openai_to_igpt({k: v.shape for k, v in ar.items()}, ar.__getitem__, "x", objective="bert")
    assert objective == "bert"


# ---- Hugging Face, without transformers ----

@pytest.fixture
def tiny(nano_model: GPT) -> tuple[GPT, Palette]:
    return nano_model, Palette(np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32))


def test_hf_export_import_is_exact_and_igpt_load_reads_it(tiny, tmp_path):
    model, palette = tiny
    save_hf(model, palette, tmp_path / "hf", record(model, palette))
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == \
        ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "imagegpt" and cfg["vocab_size"] == 17 and cfg["n_positions"] == 16
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.0
    assert cfg["activation_function"] == "quick_gelu" and cfg["tie_word_embeddings"] is False
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(state["transformer.wte.weight"][16], model.sos.detach())  # SOS = the last row
    assert state["lm_head.weight"].shape == (16, 32) and state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if k.endswith(".bias"))
    assert is_hf_dir(tmp_path / "hf")
    back, pal, _ = igpt.load(tmp_path / "hf")
    assert pal.fingerprint() == palette.fingerprint()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_pure_mappings_invert_each_other_and_take_unprefixed_names(nano_model):
    state, hf_config = igpt_to_hf(nano_model)
    for src in (state, {k.removeprefix("transformer."): v for k, v in state.items()}):
        cfg, sd = hf_to_igpt(src, hf_config)
        assert cfg == nano_model.config
        assert all(torch.equal(sd[k], v) for k, v in nano_model.state_dict().items())
    del state["lm_head.weight"]  # an ImageGPTModel (no head) is not a generative model
    with pytest.raises(ValueError, match="tensor lm_head.weight is missing"):
        hf_to_igpt(state, hf_config)


def write_hf(tmp_path: Path, model: GPT, palette: Palette) -> Path:
    out = tmp_path / "hf"
    save_hf(model, palette, out, record(model, palette))
    return out


def test_hf_nonzero_bias_and_bad_shapes_are_named(tiny, tmp_path):
    src = write_hf(tmp_path, *tiny)
    weights = src / "model.safetensors"
    state = load_file(str(weights))
    state["transformer.h.1.mlp.c_fc.bias"][3] = 1e-3
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="bias transformer.h.1.mlp.c_fc.bias is not zero"):
        load_hf(src)
    state["transformer.h.1.mlp.c_fc.bias"].zero_()
    state["transformer.h.0.attn.c_proj.weight"] = torch.zeros(32, 31)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_proj.weight has shape \(32, 31\)"):
        load_hf(src)
    del state["transformer.h.0.attn.c_proj.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_proj.weight is missing"):
        load_hf(src)


def test_hf_palette_and_config_errors(tiny, tmp_path):
    src = write_hf(tmp_path, *tiny)
    proc = src / "preprocessor_config.json"
    p = json.loads(proc.read_text())
    p["clusters"] = p["clusters"][:15]
    proc.write_text(json.dumps(p))
    with pytest.raises(ValueError, match="preprocessor_config.json has 15 clusters"):
        load_hf(src)
    proc.unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_hf(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "activation_function": "gelu"}))
    with pytest.raises(ValueError, match="activation_function"):
        load_hf(src)
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert not is_hf_dir(src)
    with pytest.raises(ValueError, match="not an ImageGPT directory"):
        load_hf(src)


def test_pytorch_model_bin_loads_without_executing_pickles(tiny, tmp_path):
    src = write_hf(tmp_path, *tiny)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    model, _, _ = load_hf(src)
    assert torch.equal(model.lm_head.weight, tiny[0].lm_head.weight)
    torch.save({"x": Path("evil")}, src / "pytorch_model.bin")  # needs a non-tensor global to unpickle
    with pytest.raises(ValueError, match="pytorch_model.bin cannot be read"):
        load_hf(src)


# ---- igpt convert ----

def test_cli_openai_to_igpt_to_hf_and_back(tmp_path, capsys):
    out, hf, back = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "back"
    assert main(["convert", "--from", "openai", "--checkpoint", str(AR), "--out", str(out)]) == 0
    assert main(["convert", "--to", "hf", "--checkpoint", str(out), "--out", str(hf)]) == 0
    assert main(["convert", "--from", "hf", "--checkpoint", str(hf), "--out", str(back)]) == 0
    a, pa, _ = igpt.load(out)
    b, pb, _ = igpt.load(back)
    assert pa.fingerprint() == pb.fingerprint() == Palette.load(AR.parent / "kmeans_centers.npy").fingerprint()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert json.loads((out / "config.json").read_text())["step"] == 131000
    assert main(["convert", "--from", "openai", "--checkpoint", str(BERT), "--out", str(tmp_path / "bert")]) == 0
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["objective"] == "bert"
    capsys.readouterr()
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "bert"), "--out", str(tmp_path / "hf2")]) == 2
    assert "causal" in capsys.readouterr().err and not (tmp_path / "hf2").exists()


def test_export_reads_the_objective_of_the_checkpoint(tiny, tmp_path):
    from igpt.record import Finetuned
    from igpt.weights.checkpoint import save_checkpoint
    from igpt.weights.convert import export_hf

    model, palette = tiny
    tuned = Finetuned(n_classes=3)
    head = {"head.weight": torch.randn(3, 32)}
    save_checkpoint(tmp_path / "ft", model, palette, record(model, palette, finetuned=tuned), classifier=head)
    export_hf(tmp_path / "ft", tmp_path / "hf")  # a fine-tuned AR trunk is still a causal model
    assert is_hf_dir(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["ImageGPTForImageClassification"]
    assert cfg["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    with pytest.raises(ValueError, match="exported classifier"):
        igpt.load(tmp_path / "hf")
    save_checkpoint(tmp_path / "bert", model, palette, record(model, palette, "bert", finetuned=tuned),
                    classifier=head)
    with pytest.raises(ValueError, match="'bert'"):
        export_hf(tmp_path / "bert", tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_bad_input_names_the_file_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["convert", "--from", "hf", "--checkpoint", str(other), "--out", str(out)]) == 2
    assert "config.json" in one_error_line(capsys)
    wrong = tmp_path / "pal8.npy"
    Palette(np.random.default_rng(0).uniform(-1, 1, (8, 3))).save(wrong)
    assert main(["convert", "--from", "openai", "--checkpoint", str(AR), "--palette", str(wrong), "--out", str(out)]) == 2
    assert "pal8.npy has 8 colours" in one_error_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(AR.parent, broken)
    (broken / (AR.name + ".data-00001-of-00002")).unlink()
    assert main(["convert", "--from", "openai", "--checkpoint", str(broken / AR.name), "--out", str(out)]) == 2
    assert "data-00001-of-00002" in one_error_line(capsys)
    assert main(["convert", "--from", "openai", "--checkpoint", str(tmp_path / "none" / "model.ckpt-1"), "--out", str(out)]) == 2
    assert "model.ckpt-1.index" in one_error_line(capsys)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "--from", "openai", "--checkpoint", str(AR), "--out", str(out)]) == 2
    assert "not empty" in one_error_line(capsys) and (out / "keep.txt").read_text() == "mine"
