"""Weights that would load wrong, and configs that claim more than their files hold: each is one line naming
the file and the tensor or the field, before any work, and before a network of the claimed size is built.

- NaN or infinite weights, in every format igpt reads (an igpt checkpoint, a run, a sharded checkpoint, a
  Hugging Face folder's safetensors, ``pytorch_model.bin`` or sharded index, a VQ-VAE tokenizer, OpenAI's
  TensorFlow variables), are refused where they are read; a resume sets such a checkpoint aside.
- A Hugging Face index that lists a file outside its folder is refused.
- A config (``config.json``, a Hugging Face ``config.json``, a VQ-VAE tokenizer's header) whose sizes are not
  those of the stored tensors is refused before a model is built; so are fields of the wrong type, and a
  header whose JSON is not an object, or not JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OPENAI_AR, randomize, tf_arrays
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_hub import cache_repo
from test_inputs import tree

import igpt
from igpt.cli import main
from igpt import model as core_model
from igpt.tokenizers import vqvae
from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.config.tokenizer import VQConfig
from igpt.distributed import World
from igpt.model import GPT
from igpt.tokenizers import Palette, VQTokenizer, load_tokenizer
from igpt.record import CheckpointRecord
from igpt.train.pretrain import pretrain, resume
from igpt.weights import checkpoint as ckpt_io
from igpt.weights.hf import save_hf
from igpt.weights.openai import openai_to_igpt
from igpt.weights.sharded import save_sharded

CFG = ModelConfig.from_preset("igpt-nano", n_vocab=16, n_px=4)
VQ = VQConfig(input_side=8, factor=2, vocab_size=8, code_dim=4, hidden=8, res_blocks=1, kmeans_iters=0)


def nano() -> tuple[GPT, Palette]:
    torch.manual_seed(0)
    palette = Palette(torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return randomize(GPT(CFG)).eval(), palette


def poison(path: Path, name: str, value: float = float("nan")) -> None:
    """One value of tensor ``name`` in the safetensors or .bin file ``path`` set to ``value``."""
    if path.suffix == ".bin":
        state = torch.load(path, weights_only=True)
        state[name].view(-1)[0] = value
        torch.save(state, path)
        return
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path), metadata=header)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_model(ckpt: Path, **changes) -> None:
    """config.json's model section of an igpt checkpoint, edited."""
    record = json.loads((ckpt / "config.json").read_text())
    record["model"].update(changes)
    (ckpt / "config.json").write_text(json.dumps(record))


def vq_header(path: Path, **changes: str) -> None:
    """The header (metadata) of a VQ-VAE tokenizer file, edited; its tensors kept."""
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**header, **changes})


def vq_config(path: Path, **changes) -> None:
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    vq_header(path, config=json.dumps({**config, **changes}))


# ---- the weights each format gives: tmp_path / "src", and the file and tensor to poison ----

def igpt_checkpoint(root: Path) -> tuple[Path, Path, str]:
    model, palette = nano()
    src = ckpt_io.save_checkpoint(root / "src", model, palette, CheckpointRecord(CFG, palette.fingerprint()))
    return src, src / "model.safetensors", "blocks.1.mlp.c_fc.weight"


def run_directory(root: Path) -> tuple[Path, Path, str]:
    model, palette = nano()
    step = root / "src" / "checkpoints" / "step-0000003"
    ckpt_io.save_checkpoint(step, model, palette, CheckpointRecord(CFG, palette.fingerprint(), step=3))
    return root / "src", step / "model.safetensors", "wte.weight"


def hf_folder(root: Path) -> tuple[Path, Path, str]:
    model, palette = nano()
    save_hf(model, palette, root / "src", CheckpointRecord(CFG, palette.fingerprint()))
    return root / "src", root / "src" / "model.safetensors", "transformer.h.0.attn.c_attn.weight"


def hf_bin(root: Path) -> tuple[Path, Path, str]:
    src, weights, name = hf_folder(root)
    torch.save(load_file(str(weights)), src / "pytorch_model.bin")
    weights.unlink()
    return src, src / "pytorch_model.bin", "lm_head.weight"


def hf_index(root: Path) -> tuple[Path, Path, str]:
    """A Hugging Face folder whose weights are split over two files named by model.safetensors.index.json."""
    names = ("part-1.safetensors", "part-2.safetensors")
    src, weights, _ = hf_folder(root)
    state = load_file(str(weights))
    weights.unlink()
    keys = sorted(state)
    halves = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(src / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src, src / names[1], halves[names[1]][0]


def sharded_checkpoint(root: Path, value: float = 0.0) -> tuple[Path, Path, str]:
    """A checkpoint written as --sharded-checkpoint writes one (one process), with ``value`` in its weights
    (DCP's shards are pickles, so the value goes in before they are written)."""
    model, palette = nano()
    with torch.no_grad():
        model.wpe.weight[0, 0] = value
    record = CheckpointRecord(CFG, palette.fingerprint(), sharded=True)
    opt = torch.optim.AdamW(model.parameters())
    save_sharded(root / "src", model, opt, World(),
                 lambda tmp: ckpt_io.write_small_files(tmp, record, palette, None))
    return root / "src", root / "src" / "sharded" / "__0_0.distcp", "model.wpe.weight"


def vq_checkpoint(root: Path) -> tuple[Path, Path, str]:
    """An igpt checkpoint whose ids come from a VQ-VAE tokenizer (tokenizer.safetensors)."""
    torch.manual_seed(0)
    tok = VQTokenizer(vqvae.VQVAE(VQ))
    cfg = ModelConfig.from_preset("igpt-nano", n_vocab=VQ.vocab_size, n_px=VQ.grid)
    src = ckpt_io.save_checkpoint(root / "src", GPT(cfg), tok, CheckpointRecord(cfg, tok.fingerprint()))
    return src, src / "tokenizer.safetensors", "vq._codebook.embed"


FORMATS = {"igpt checkpoint": igpt_checkpoint, "run directory": run_directory, "hf safetensors": hf_folder,
           "hf pytorch_model.bin": hf_bin, "hf sharded index": hf_index, "sharded checkpoint": sharded_checkpoint,
           "VQ-VAE tokenizer": vq_checkpoint}


def sample_error(src: Path, untouched: Path, capsys) -> str:
    """``igpt sample --checkpoint src`` in-process: exit status 2, one line, nothing under ``untouched``
    written; that line."""
    before = tree(untouched)
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(src), "--n-images", "1", "--out", "samples", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("igpt sample: error: "), err
    assert tree(untouched) == before
    return err


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", FORMATS)
def test_nan_or_infinite_weights_are_refused_naming_the_file_and_tensor(kind, value, tmp_path):
    if kind == "sharded checkpoint":
        src, weights, tensor = sharded_checkpoint(tmp_path, value)
    else:
        src, weights, tensor = FORMATS[kind](tmp_path)
        poison(weights, tensor, value)
    with pytest.raises(ValueError) as e:
        igpt.load(src)
    bad = "NaN" if value != value else "infinite"
    assert f"{weights}: tensor {tensor} holds {bad} values" in str(e.value) and "\n" not in str(e.value)


def test_sample_refuses_nan_weights_in_one_line_and_writes_nothing(tmp_path, workdir, capsys):
    src, weights, tensor = igpt_checkpoint(tmp_path)
    poison(weights, tensor)
    assert f"{weights}: tensor {tensor} holds NaN values" in sample_error(src, tmp_path, capsys)


def test_nan_in_openai_tensorflow_variables_is_refused_naming_the_tensor():
    arrays = tf_arrays(OPENAI_AR)
    arrays["model/h0/mlp/c_fc/w"] = arrays["model/h0/mlp/c_fc/w"].copy()
    arrays["model/h0/mlp/c_fc/w"].flat[3] = np.nan
    with pytest.raises(ValueError) as e:
        openai_to_igpt({k: v.shape for k, v in arrays.items()}, arrays.__getitem__, "model.ckpt-131000.index")
    assert str(e.value).startswith("model.ckpt-131000.index: tensor model/h0/mlp/c_fc/w holds NaN")


@pytest.mark.parametrize("file", ["model.safetensors", "train_state.safetensors"])
def test_a_resume_sets_aside_a_checkpoint_with_nan_and_continues_from_the_one_before(file, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = TrainConfig(batch_size=16, max_steps=4, warmup_steps=1, eval_every=0, log_every=1, ckpt_every=2,
                      keep_last=5, device="cpu", workers=0)
    pretrain(ModelConfig.from_preset("igpt-nano"), cfg, DataConfig(data="digits", vocab_size=16), run, progress=False)
    newest = run / "checkpoints" / "step-0000004"
    name = "wte.weight" if file == "model.safetensors" else next(
        k for k in load_file(str(newest / file)) if k.endswith("exp_avg"))
    poison(newest / file, name)
    with caplog.at_level(logging.WARNING):
        resume(run, changes={"max_steps": 6}, progress=False)
    assert f"{newest / file}: tensor {name} holds NaN" in caplog.text
    assert (run / "checkpoints" / ".step-0000004.unreadable").is_dir()
    model = igpt.load(run).model
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- a Hugging Face index names only files in its folder ----

@pytest.mark.parametrize("entry", ["../outside.safetensors", "absolute", "link.safetensors"])
def test_an_hf_index_naming_a_file_outside_its_folder_is_refused(entry, tmp_path):
    src, _, _ = hf_index(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(src / "part-2.safetensors", outside)
    name = str(outside) if entry == "absolute" else entry
    if entry == "link.safetensors":
        (src / entry).symlink_to(outside)
    index = src / "model.safetensors.index.json"
    text = index.read_text().replace('"part-2.safetensors"', json.dumps(name))
    index.write_text(text)
    with pytest.raises(ValueError) as e:
        igpt.load(src)
    assert str(e.value) == f"{index}: lists {name!r}, which lies outside {src}; refused"


def test_an_hf_index_in_the_hub_cache_still_reads_its_linked_blobs(tmp_path):
    src, _, _ = hf_index(tmp_path / "made")
    snapshot = cache_repo(tmp_path / "cache", "someone/tiny", src)  # every file a link into ../../blobs
    assert (snapshot / "part-2.safetensors").is_symlink()
    assert igpt.load(snapshot).record.model == CFG


# ---- a config's sizes are those of its tensors, checked before a model is built ----

@pytest.fixture
def no_big_builds(monkeypatch) -> None:
    """Fail the test as soon as more blocks or residual layers are built than any file here holds: what the
    check must stop is building (even on the meta device) a network of the size a config claims."""
    built = {"blocks": 0}

    def counting(cls):
        init = cls.__init__

        def wrapped(self, *args, **kw):
            built["blocks"] += 1
            assert built["blocks"] <= 50, f"a network of the claimed size is being built ({cls.__name__})"
            init(self, *args, **kw)
        monkeypatch.setattr(cls, "__init__", wrapped)

    counting(core_model.Block)
    counting(vqvae._Residual)


@pytest.mark.parametrize("field,value", [("n_layer", 5000), ("n_embd", 3000), ("n_px", 400)])
def test_an_igpt_config_claiming_other_sizes_is_refused_before_a_model_is_built(field, value, tmp_path,
                                                                                 no_big_builds):
    src, weights, _ = igpt_checkpoint(tmp_path)
    edit_model(src, **{field: value})
    with pytest.raises(ValueError) as e:
        igpt.load(src)
    assert str(e.value).startswith(f"{src / 'config.json'}: {field} is {value}, but the tensors in {weights}")


def test_a_run_record_claiming_other_sizes_is_refused_before_a_resume_builds_it(tmp_path, no_big_builds):
    run = tmp_path / "run"
    cfg = TrainConfig(batch_size=16, max_steps=2, warmup_steps=1, eval_every=0, log_every=1, ckpt_every=2,
                      device="cpu", workers=0)
    pretrain(ModelConfig.from_preset("igpt-nano"), cfg, DataConfig(data="digits", vocab_size=16), run, progress=False)
    record = json.loads((run / "run.json").read_text())
    record["model"]["n_layer"] = 200000
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError) as e:
        resume(run, changes={"max_steps": 4}, progress=False)
    weights = run / "checkpoints" / "step-0000002" / "model.safetensors"
    assert str(e.value).startswith(f"{run / 'run.json'}: n_layer is 200000, but the tensors in {weights}")


@pytest.mark.parametrize("field,value", [("n_layer", 5000), ("num_hidden_layers", 5000), ("n_embd", 3000)])
def test_an_hf_config_claiming_other_sizes_is_refused_before_anything_is_built(field, value, tmp_path,
                                                                                no_big_builds):
    src, weights, _ = hf_folder(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.pop("n_layer" if field == "num_hidden_layers" else "", None)
    (src / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError) as e:
        igpt.load(src)
    assert str(e.value).startswith(f"{src / 'config.json'}: {field} is {value}, but the tensors in {weights}")


@pytest.mark.parametrize("field,value", [("hidden", 300), ("res_blocks", 20000), ("code_dim", 4096),
                                         ("vocab_size", 1 << 20), ("factor", 64)])
def test_a_vq_tokenizer_header_claiming_other_sizes_is_refused_before_a_network_is_built(field, value, tmp_path,
                                                                                         no_big_builds):
    _, path, _ = vq_checkpoint(tmp_path)
    vq_config(path, **{field: value, "input_side": 64 * 8})
    with pytest.raises(ValueError) as e:
        load_tokenizer(path)
    assert str(e.value).startswith(f"tokenizer file {path}: config: {field} is {value}, but the tensors in the file")


def test_a_sharded_index_recording_more_bytes_than_its_files_hold_is_refused(tmp_path, no_big_builds):
    src, _, _ = sharded_checkpoint(tmp_path)
    os.truncate(src / "sharded" / "__0_0.distcp", 100)  # the index now records more than the files hold
    with pytest.raises(ValueError) as e:
        igpt.load(src)
    assert str(e.value).startswith(f"{src / 'sharded' / '.metadata'} records ")


# ---- fields of the wrong type, and header JSON that is not an object or not JSON ----

def test_a_checkpoint_config_with_a_float_for_an_int_is_one_line_naming_file_and_field(tmp_path, workdir,
                                                                                      capsys):
    src, _, _ = igpt_checkpoint(tmp_path)
    edit_model(src, n_layer=2.5)
    err = sample_error(src, tmp_path, capsys)
    assert err.endswith(f"{src / 'config.json'}: --n-layer must be an integer, got 2.5"), err


@pytest.mark.parametrize("edit,needle", [({"step": "10"}, "step must be an integer"),
                                         ({"sharded": "no"}, "sharded must be true or false"),
                                         ({"model": [2, 32]}, "expected a JSON object of ModelConfig's fields")])
def test_a_checkpoint_record_of_the_wrong_types_names_the_field(edit, needle, tmp_path):
    src, _, _ = igpt_checkpoint(tmp_path)
    edit_json(src / "config.json", **edit)
    with pytest.raises(ValueError) as e:
        igpt.load(src)
    assert str(e.value).startswith(f"{src / 'config.json'}: ") and needle in str(e.value)


def test_an_hf_config_with_a_float_for_an_int_names_the_field(tmp_path):
    src, _, _ = hf_folder(tmp_path)
    edit_json(src / "config.json", n_layer=2.5)
    with pytest.raises(ValueError, match=r"config\.json: n_layer must be a positive integer, got 2\.5$"):
        igpt.load(src)


@pytest.mark.parametrize("key,text,needle", [("config", "[8, 2, 8]", "config is a JSON list, not an object"),
                                             ("meta", "{not json", "meta is not JSON"),
                                             ("meta", '["a"]', "meta is a JSON list, not an object")])
def test_a_vq_tokenizer_header_that_is_not_a_json_object_names_the_file_and_key(key, text, needle, tmp_path):
    src, path, _ = vq_checkpoint(tmp_path)
    vq_header(path, **{key: text})
    with pytest.raises(ValueError) as e:
        igpt.load(src)
    assert str(e.value).startswith(f"tokenizer file {path}: {needle}")


def test_a_vq_tokenizer_config_of_the_wrong_type_names_the_field(tmp_path):
    _, path, _ = vq_checkpoint(tmp_path)
    vq_config(path, hidden=8.5)
    with pytest.raises(ValueError, match=r": config: --hidden must be an integer, got 8\.5$"):
        load_tokenizer(path)


def test_a_palette_meta_that_is_not_a_json_object_names_the_file(tmp_path):
    for meta, needle in (("{not json", "its meta is not JSON"), ("[1, 2]", "its meta is a JSON list")):
        path = tmp_path / "palette.npz"
        np.savez(path, centers=np.zeros((4, 3), np.float32), meta=np.array(meta))
        with pytest.raises(ValueError) as e:
            Palette.load(path)
        assert str(e.value).startswith(f"palette file {path} could not be read: {needle}")

