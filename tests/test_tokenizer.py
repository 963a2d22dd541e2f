"""Tokenizers: the palette read through igpt.tokenizers bit for bit, the VQ-VAE's round trip and file, bad
files and sizes, fingerprints, an exactly resumed fit, old checkpoints and caches, and the whole chain
(fit -> prepare -> pretrain -> sample -> probe) at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import OPENAI_FIXTURES, flat_pictures, rand_images
from igpt.cli import main
from igpt.config import ModelConfig
from igpt.config.tokenizer import TokenizerFitConfig, VQConfig
from igpt.data.cache import META
from igpt.data.images import encode_images
from igpt.data.open import check_upscale, open_split, prepare
from igpt.model import GPT
from igpt.tokenizers import VQVAE, Palette, VQTokenizer, load_tokenizer, to_pixels
from igpt.record import CheckpointRecord
from igpt.stop import GracefulStop, Stopped
from igpt.train import tokenizer as fit_module
from igpt.train.tokenizer import fit_tokenizer, resume_fit, to_unit
from igpt.weights.convert import load, save
from igpt.weights.tensors import save_tensors

TINY = VQConfig(input_side=8, factor=2, vocab_size=8, code_dim=4, hidden=8, res_blocks=1, kmeans_iters=2)
FIT = TokenizerFitConfig(steps=2, batch_size=16, eval_every=2, log_every=1, ckpt_every=1, val_images=8, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A small labelled npz and a VQ-VAE tokenizer fitted on it (two steps)."""
    root = tmp_path_factory.mktemp("tok")
    npz = root / "blobs.npz"
    np.savez(npz, x_train=flat_pictures(48, 0), y_train=np.arange(48) % 2, x_test=flat_pictures(16, 1),
             y_test=np.arange(16) % 2)
    fit_tokenizer(str(npz), root / "fit", TINY, FIT, progress=False)
    return {"root": root, "npz": npz, "tok": root / "fit" / "tokenizer.safetensors"}


def test_palette_through_the_tokenizer_door_gives_the_same_ids_bit_for_bit(tmp_path):
    pixels = rand_images(16, 8, 8, seed=3)
    for path in (OPENAI_FIXTURES / "ar" / "kmeans_centers.npy",):
        direct, door = Palette.load(path), load_tokenizer(path)
        assert isinstance(door, Palette) and door.fingerprint() == direct.fingerprint()
        ids = direct.encode(pixels)  # (16, 8, 8)
        assert torch.equal(door.encode(pixels), ids) and door.pixel_side(8) == 8
        npz = tmp_path / "p.npz"
        direct.save(npz)
        assert torch.equal(load_tokenizer(npz).encode(pixels), ids)
        assert torch.equal(encode_images(list(pixels), door, 8), ids.reshape(16, 64))
        assert torch.equal(door.decode_images(ids.reshape(16, 64)), direct.decode(ids))


def test_vq_decode_of_encode_is_the_models_own_reconstruction(tmp_path):
    model = VQVAE(TINY)
    pixels = rand_images(6, 8, 8, seed=4)
    model.train()(to_unit(pixels, torch.device("cpu")))  # one training pass: k-means initialises the codebook
    tok = VQTokenizer(model)  # eval mode from here
    ids = tok.encode(pixels)
    assert ids.shape == (6, 4, 4) and int(ids.max()) < TINY.vocab_size
    with torch.no_grad():
        own = to_pixels(model(to_unit(pixels, torch.device("cpu"))).recon)  # (6, 8, 8, 3)
    assert torch.equal(tok.decode_images(ids), own)
    assert torch.equal(tok.decode_images(ids.reshape(6, 16)), own)  # flat ids too
    tok.save(tmp_path / "t.safetensors")
    back = load_tokenizer(tmp_path / "t.safetensors")
    assert back.fingerprint() == tok.fingerprint() and torch.equal(back.encode(pixels), ids)
    assert back.pixel_side(4) == 8


def _one_line_error(fn, *needles):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        fn()
    text = str(e.value)
    assert len(text.splitlines()) == 1, text
    for needle in needles:
        assert str(needle) in text, text


def test_bad_tokenizer_files_and_sizes_are_one_line_errors(tiny, tmp_path):
    raw = tiny["tok"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    _one_line_error(lambda: load_tokenizer(cut), cut, "truncated")
    other = tmp_path / "model.safetensors"  # a transformer's weights, not a tokenizer
    save_tensors({k: v.contiguous() for k, v in GPT(ModelConfig(n_layer=1, n_embd=8, n_head=1, n_px=2,
                                                                n_vocab=4)).state_dict().items()}, other)
    _one_line_error(lambda: load_tokenizer(other), other, "not a VQ-VAE tokenizer")
    _one_line_error(lambda: load_tokenizer(tmp_path / "t.pt"), "t.pt", ".safetensors")
    tok = load_tokenizer(tiny["tok"])
    _one_line_error(lambda: tok.encode(rand_images(2, 16, 16)), "8x8", "(2, 16, 16, 3)")
    _one_line_error(lambda: tok.pixel_side(8), "4x4", "n_px is 8")
    _one_line_error(lambda: prepare(tiny["npz"], tmp_path / "c", n_px=16, tokenizer=tok, progress=False),
                    "--n-px 16", "--n-px 8")


def test_smaller_images_are_refused_by_path_unless_upscale(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rand_images(1, 12, 12)[0]).save(folder / "big.png")
    Image.fromarray(rand_images(1, 6, 6)[0]).save(folder / "small.png")
    _one_line_error(lambda: check_upscale(str(folder), 8, False), folder / "small.png", "--upscale")
    check_upscale(str(folder), 8, True)
    check_upscale(str(folder), 6, False)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rand_images(20, 8, 8))
    big = VQTokenizer(VQVAE(VQConfig(input_side=16, factor=4, vocab_size=4, code_dim=2, hidden=4,
                                     res_blocks=0)))
    _one_line_error(lambda: prepare(npz, tmp_path / "c", n_px=16, tokenizer=big, progress=False), npz, "--upscale")
    meta = prepare(npz, tmp_path / "c", n_px=16, tokenizer=big, upscale=True, progress=False)
    assert meta["grid"] == 4 and np.load(tmp_path / "c" / "train_ids.npy").shape[1] == 16


class _SignalledStop(GracefulStop):
    """A stop as SIGTERM leaves it: requested from the first step on."""

    def __enter__(self) -> "_SignalledStop":
        self.request("SIGTERM")
        return self


def test_fit_stopped_then_resumed_ends_with_the_same_tokenizer(tiny, tmp_path, monkeypatch):
    three = TokenizerFitConfig(**{**FIT.to_dict(), "steps": 3})
    full = fit_tokenizer(str(tiny["npz"]), tmp_path / "full", TINY, three, progress=False)
    half = tmp_path / "half"
    with monkeypatch.context() as m:
        m.setattr(fit_module, "GracefulStop", _SignalledStop)
        with pytest.raises(Stopped, match=f"step 1 of 3.*--resume {half}"):
            fit_tokenizer(str(tiny["npz"]), half, TINY, three, progress=False)
    resumed = resume_fit(half, progress=False)
    assert resumed["fingerprint"] == full["fingerprint"]
    steps = [json.loads(line)["step"] for line in (half / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == [1, 2, 3]
    _one_line_error(lambda: resume_fit(half, changes={"lr": 1.0}, progress=False), "lr")


def test_mismatched_tokenizer_is_refused_by_fingerprint(tiny, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare(tiny["npz"], cache, n_px=8, tokenizer=load_tokenizer(tiny["tok"]), progress=False)
    other = tmp_path / "other"
    fit_tokenizer(str(tiny["npz"]), other, TINY, TokenizerFitConfig(**{**FIT.to_dict(), "seed": 1}), progress=False)
    code = main(["pretrain", "--preset", "igpt-nano", "--n-px", "4", "--data", str(cache), "--tokenizer",
                 str(other / "tokenizer.safetensors"), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and load_tokenizer(tiny["tok"]).fingerprint() in err and len(err.strip().splitlines()) == 1
    # a checkpoint whose tokenizer file was swapped is refused by the fingerprint its record holds
    tok = load_tokenizer(tiny["tok"])
    model = GPT(ModelConfig(n_layer=1, n_embd=8, n_head=1, n_px=4, n_vocab=TINY.vocab_size))
    save(model, tok, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.safetensors").write_bytes((other / "tokenizer.safetensors").read_bytes())
    _one_line_error(lambda: load(tmp_path / "ckpt"), "fingerprint", tok.fingerprint())


def test_checkpoints_and_caches_written_before_tokenizers_still_load(tmp_path, npz_file):
    npz, _ = npz_file
    palette = Palette.fit(rand_images(40, 8, 8), k=8, seed=0)
    cfg = ModelConfig(n_layer=1, n_embd=8, n_head=1, n_px=8, n_vocab=8)
    model = GPT(cfg)
    old = tmp_path / "old"  # the layout of earlier versions, written file by file
    old.mkdir()
    save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, old / "model.safetensors")
    (old / "config.json").write_text(json.dumps(CheckpointRecord(cfg, palette.fingerprint(), "ar").to_json()))
    palette.save(old / "palette.npz")
    loaded, pal, record = load(old)
    assert isinstance(pal, Palette) and pal.fingerprint() == palette.fingerprint() and record.objective == "ar"
    cache = tmp_path / "cache"
    prepare(npz, cache, n_px=8, tokenizer=palette, progress=False)
    meta = json.loads((cache / META).read_text())
    meta.pop("grid")  # caches of earlier versions do not record it
    (cache / META).write_text(json.dumps(meta))
    assert open_split(cache, "train", n_px=8).ids.shape[1] == 64


def test_chain_end_to_end_on_vq_codes(tiny, tmp_path, capsys):
    tok, npz = str(tiny["tok"]), str(tiny["npz"])
    report = tmp_path / "report"
    assert main(["tokenizer", "report", "--tokenizer", tok, "--data", npz, "--out", str(report), "--vocab-size",
                 "8"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["tokens_per_image"] == 16 and {"mse", "psnr", "perplexity", "dead_codes"} <= set(metrics["vqvae"])
    assert metrics["palette"]["colours"] == 8 and (report / "reconstructions.png").is_file()
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["prepare", "--data", npz, "--n-px", "8", "--tokenizer", tok, "--out", str(cache)]) == 0
    assert main(["pretrain", "--preset", "igpt-nano", "--n-px", "4", "--data", str(cache), "--tokenizer", tok,
                 "--out", str(run), "--max-steps", "2", "--batch-size", "8", "--eval-every", "2",
                 "--sample-every", "2", "--device", "cpu"]) == 0
    assert (run / "tokenizer.safetensors").is_file() and (run / "samples" / "step-0000002.png").is_file()
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s"), "--n-images", "2",
                 "--scale", "1"]) == 0
    assert np.asarray(Image.open(tmp_path / "s" / "sample-0000.png")).shape == (8, 8, 3)  # decoded: 8x8 pixels
    assert main(["probe", "--checkpoint", str(run), "--data", str(cache), "--out", str(tmp_path / "p"), "--l2",
                 "0.01", "--max-iter", "5"]) == 0
    code = main(["probe", "--checkpoint", str(run), "--data", str(cache), "--out", str(tmp_path / "p2"),
                 "--flip-average"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of the steps above
    assert code == 2 and last.startswith("igpt probe: error: --flip-average")
    assert main(["score", "--checkpoint", str(run), "--data", npz]) == 0
    assert "bits/token (tokens are VQ-VAE codes" in capsys.readouterr().out
    code = main(["convert", "--to", "hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "knows only palettes" in err and len(err.strip().splitlines()) == 1
    model, tokenizer, _ = load(run)
    save(model, tokenizer, tmp_path / "saved")
    assert "VQ-VAE, 8 codes, 8x8 images -> 4x4 codes" in (tmp_path / "saved" / "README.md").read_text()
    assert load(tmp_path / "saved").tokenizer.fingerprint() == tokenizer.fingerprint()


@pytest.mark.slow  # fine-tunes on VQ codes
def test_complete_infill_finetune_and_classify_on_vq_codes(tiny, tmp_path, capsys):
    tok, npz = str(tiny["tok"]), str(tiny["npz"])
    cache = tmp_path / "cache"
    assert main(["prepare", "--data", npz, "--n-px", "8", "--tokenizer", tok, "--out", str(cache)]) == 0
    Image.fromarray(flat_pictures(1, 3)[0]).save(tmp_path / "x.png")
    for objective in ("ar", "bert"):
        run = tmp_path / objective
        assert main(["pretrain", "--preset", "igpt-nano", "--n-px", "4", "--data", str(cache), "--tokenizer", tok,
                     "--objective", objective, "--out", str(run), "--max-steps", "2", "--batch-size", "8",
                     "--eval-every", "2", "--device", "cpu"]) == 0
        out = tmp_path / f"complete-{objective}"
        assert main(["complete", "--checkpoint", str(run), "--data", npz, "--out", str(out), "--n-images", "2",
                     "--n-samples", "2", "--rows", "1", "--scale", "1", "--device", "cpu"]) == 0
        how = json.loads((out / "provenance.json").read_text())["how"]
        assert how.startswith("sampled" if objective == "ar" else "infilled by BERT")
        assert len(list(out.glob("complete-*.png"))) == 2 and (out / "completions.png").is_file()
        # fine-tuning reads pixels (augmented, then encoded) or, without augmentation, the prepared codes
        for data, extra in ((npz, []), (str(cache), ["--augment", "none"])):
            ft = tmp_path / f"ft-{objective}-{Path(data).name}"
            assert main(["finetune", "--checkpoint", str(run), "--data", data, "--out", str(ft), "--max-steps", "2",
                         "--eval-every", "2", "--batch-size", "8", "--device", "cpu", *extra]) == 0
            capsys.readouterr()
            assert main(["classify", str(tmp_path / "x.png"), "--checkpoint", str(ft), "--device", "cpu"]) == 0
            assert capsys.readouterr().out.startswith(f"{tmp_path / 'x.png'}: class ")
    # a cache of codes cannot be shifted by pixels: the default --augment cifar says how to fine-tune on it
    code = main(["finetune", "--checkpoint", str(tmp_path / "ar"), "--data", str(cache), "--out",
                 str(tmp_path / "ft-bad"), "--batch-size", "8", "--device", "cpu"])
    assert code == 2 and "--augment cifar cannot shift" in capsys.readouterr().err
