from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import igpt
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.weights.checkpoint import load_train_state, save_checkpoint
from igpt.weights.convert import load as load_checkpoint


def rec(model, palette, **kw) -> CheckpointRecord:
    return CheckpointRecord(model.config, palette.fingerprint(), **kw)


@pytest.fixture
def palette16() -> Palette:
    g = torch.Generator().manual_seed(0)
    return Palette(torch.rand(16, 3, generator=g) * 2 - 1)


def test_save_load_gives_identical_logits(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16, rec(nano_model, palette16, step=7))
    model, palette, record = load_checkpoint(tmp_path / "ckpt")
    ids = torch.randint(0, 16, (2, 16))
    assert torch.equal(model(ids), nano_model(ids))
    assert palette.fingerprint() == palette16.fingerprint() and record.step == 7
    assert not model.training
    loaded, pal, _ = igpt.load(tmp_path / "ckpt")
    assert torch.equal(loaded(ids), nano_model(ids)) and pal.k == 16


def test_overwriting_a_checkpoint_leaves_no_temporaries(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16, rec(nano_model, palette16))
    with torch.no_grad():
        nano_model.sos.add_(1.0)
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16, rec(nano_model, palette16))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    model, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(model.sos, nano_model.sos)


def test_strict_loading_names_the_tensor(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16, rec(nano_model, palette16))
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
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16, rec(nano_model, palette16))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["tokenizer_fingerprint"] = "0" * 16
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fingerprint"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither an igpt checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="palette has 8 colours"):
        other = Palette(torch.zeros(8, 3).uniform_(-1, 1))
        save_checkpoint(tmp_path / "other", nano_model, other, rec(nano_model, other))


def test_a_loaded_bert_checkpoint_reads_ids_bidirectionally(tmp_path, nano_model, palette16):
    save_checkpoint(tmp_path / "bert", nano_model, palette16, rec(nano_model, palette16, objective="bert",
                                                                  mask_prob=0.2))
    model, _, record = igpt.load(tmp_path / "bert")
    assert record.reading == igpt.Reading("bert", causal=False, can_sample=False, mask_prob=0.2)
    ids = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        bidirectional = nano_model(ids, causal=False)
        assert torch.equal(model(ids), bidirectional)  # the plain call is the way the weights were trained
        assert not torch.allclose(model(ids), nano_model(ids, causal=True))
        assert torch.equal(model.hidden_states(ids)[-1], nano_model.hidden_states(ids, causal=False)[-1])
        feats = model.layer_features(ids)
        assert torch.equal(feats[2], nano_model.layer_features(ids, causal=False)[2])
    with pytest.raises(ValueError, match="BERT .* cannot be sampled left to right"):
        igpt.sample(model, 2)


def test_records_of_the_first_format_still_load(tmp_path, nano_model, palette16):
    """config.json of format_version 1 was a free-form dict; such checkpoints keep loading."""
    save_checkpoint(tmp_path / "old", nano_model, palette16, rec(nano_model, palette16))
    path = tmp_path / "old" / "config.json"
    v1 = {"format": "igpt", "format_version": 1, "model": {**nano_model.config.to_dict(), "grad_checkpoint": False},
          "palette_fingerprint": palette16.fingerprint(), "objective": "finetune", "base_objective": "bert",
          "n_classes": 3, "classes": ["a", "b", "c"], "n_px": 4, "step": 9, "data": "digits"}
    path.write_text(json.dumps(v1))
    model, _, record = igpt.load(tmp_path / "old")
    assert record.objective == "bert" and not model.causal and record.step == 9
    assert record.finetuned.n_classes == 3 and record.finetuned.classes == ("a", "b", "c")
    path.write_text(json.dumps({**v1, "format_version": 7}))
    with pytest.raises(ValueError, match="config.json: format_version 7"):
        igpt.load(tmp_path / "old")


def optimizer_state(model) -> dict:
    """What the pretraining trainer saves: the full, name-keyed AdamW state after one step."""
    opt = torch.optim.AdamW([{"params": [model.sos], "weight_decay": 0.0},
                             {"params": [p for n, p in model.named_parameters() if n != "sos"]}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    model(torch.randint(0, 16, (2, 16))).sum().backward()
    opt.step()
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def same(a, b) -> bool:
    """Equal values of the same types, tensors bit for bit (dtype and shape too)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_train_state_round_trips_exactly_without_pickle(tmp_path, nano_model, palette16):
    state = {"step": 3, "stream": {"epoch": 1, "pos": 48}, "torch_rng": torch.get_rng_state(),
             "optimizer": optimizer_state(nano_model), "extra": [None, True, 0.1, -0.0, float("inf"), float("nan"),
                                                                  (1, "a"), torch.tensor(2.5, dtype=torch.bfloat16)]}
    save_checkpoint(tmp_path / "ckpt", nano_model, palette16, rec(nano_model, palette16), train_state=state)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "model.safetensors", "palette.npz", "train_state.json", "train_state.safetensors"]
    assert b"\x80" not in (tmp_path / "ckpt" / "train_state.json").read_bytes()[:2]  # JSON, not a pickle
    back = load_train_state(tmp_path / "ckpt")
    assert same(back, state)
    assert back["optimizer"]["param_groups"][1]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="train state: stream/pos is a numpy.int64"):
        save_checkpoint(tmp_path / "bad", nano_model, palette16, rec(nano_model, palette16),
                        train_state={"stream": {"pos": np.int64(3)}})
    assert not (tmp_path / "bad").exists()  # nothing half written


def test_a_legacy_train_state_pt_still_reads(tmp_path, nano_model, palette16):
    state = {"step": 3, "stream": {"epoch": 0, "pos": 16}, "torch_rng": torch.get_rng_state(),
             "optimizer": optimizer_state(nano_model)}
    save_checkpoint(tmp_path / "old", nano_model, palette16, rec(nano_model, palette16))
    torch.save(state, tmp_path / "old" / "train_state.pt")  # as earlier versions wrote it
    assert same(load_train_state(tmp_path / "old"), state)
    (tmp_path / "old" / "train_state.pt").unlink()
    with pytest.raises(ValueError, match="has no train_state.json: it cannot be resumed"):
        load_train_state(tmp_path / "old")
