"""Weights by name (igpt.weights.hub), the Hub-shaped API (igpt.GPT.from_pretrained / save_pretrained,
igpt.save), model cards and ``igpt classify``. Every Hub id is read from a local cache folder laid out as
huggingface_hub lays it out, with HF_HUB_OFFLINE=1: nothing here reaches the network. ``push_to_hub`` is not
exercised (it needs the Hub)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image

import igpt
from igpt.cli import main
from igpt.config import ModelConfig
from igpt.model import GPT as CoreGPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord, Finetuned
from igpt.weights.checkpoint import save_checkpoint
from igpt.weights.hf import save_hf
from igpt.weights.hub import download_command

CFG = ModelConfig(n_layer=2, n_embd=16, n_head=2, n_px=4, n_vocab=8)


def tiny(seed: int) -> tuple[CoreGPT, Palette]:
    torch.manual_seed(seed)
    palette = Palette(np.random.default_rng(seed).uniform(-1, 1, (8, 3)).astype(np.float32))
    return randomize(CoreGPT(CFG), seed=seed).eval(), palette


def cache_repo(cache: Path, repo_id: str, files: Path, revision: str = "0" * 40) -> Path:
    """``files`` as huggingface_hub's cache holds a downloaded snapshot: blobs named by their hash,
    snapshots/<revision>/ linking to them, refs/main naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test here may reach the network


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An offline Hugging Face home in tmp_path, set after igpt was imported (read at each call)."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-home" / "hub"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_hub_id_loads_from_the_local_cache_on_every_front_door(hub, tmp_path, capsys):
    model, palette = tiny(0)
    save_hf(model, palette, tmp_path / "export", CheckpointRecord(CFG, palette.fingerprint()))
    snap = cache_repo(hub, "openai/imagegpt-small", tmp_path / "export")
    loaded, pal, record = igpt.load("openai/imagegpt-small")
    assert same_weights(loaded, model) and pal.fingerprint() == palette.fingerprint()
    assert record.source == {"format": "hf", "path": str(snap)}
    hubbed = igpt.GPT.from_pretrained("openai/imagegpt-small")
    assert isinstance(hubbed, igpt.GPT) and same_weights(hubbed, model)
    assert hubbed.tokenizer.fingerprint() == palette.fingerprint() and not hubbed.training
    # a command's --checkpoint takes the id too
    assert main(["convert", "--from", "hf", "--checkpoint", "openai/imagegpt-small", "--out",
                 str(tmp_path / "conv")]) == 0
    assert same_weights(igpt.load(tmp_path / "conv").model, model)
    capsys.readouterr()


def test_a_local_path_wins_over_a_hub_id(hub, tmp_path, monkeypatch):
    cached, palette = tiny(0)
    save_hf(cached, palette, tmp_path / "export", CheckpointRecord(CFG, palette.fingerprint()))
    cache_repo(hub, "openai/imagegpt-small", tmp_path / "export")
    local, _ = tiny(1)
    monkeypatch.chdir(tmp_path)
    save_checkpoint(Path("openai/imagegpt-small"), local, palette, CheckpointRecord(CFG, palette.fingerprint()))
    assert same_weights(igpt.load("openai/imagegpt-small").model, local)
    assert not same_weights(local, cached)


def test_absent_weights_say_how_to_download_in_one_line(hub, tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as e:
        igpt.load("someone/absent-model")
    msg = str(e.value)
    assert "\n" not in msg and f"`{download_command('someone/absent-model')}`" in msg and str(hub) in msg
    assert download_command("a/b") in ("hf download a/b", "huggingface-cli download a/b")
    # the cache folder is read at the call: another HF_HUB_CACHE is named, not the import-time one
    os.environ["HF_HUB_CACHE"] = str(tmp_path / "elsewhere")
    try:
        with pytest.raises(FileNotFoundError, match="elsewhere"):
            igpt.GPT.from_pretrained("someone/absent-model")
    finally:
        del os.environ["HF_HUB_CACHE"]
    assert main(["classify", str(tmp_path / "x.png"), "--checkpoint", "someone/absent-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "x.png" in err  # the image is checked before the weights
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    assert main(["sample", "--checkpoint", "someone/absent-model", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "download someone/absent-model" in err
    # a snapshot in the cache without weights (an interrupted download) is absent too
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    cache_repo(hub, "someone/partial", tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="download someone/partial"):
        igpt.load("someone/partial")


def test_save_mirrors_load_and_save_pretrained_writes_the_palette(tmp_path):
    model, palette = tiny(2)
    out = igpt.save(model, palette, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "palette.npz"]
    back, pal, record = igpt.load(out)
    assert same_weights(back, model) and pal.fingerprint() == palette.fingerprint() and record.objective == "ar"
    with pytest.raises(ValueError, match="already exists"):
        igpt.save(model, palette, out)
    igpt.save(back, pal, out, overwrite=True)
    # the Hub's shape: from_pretrained returns the model with its tokenizer, save_pretrained writes both
    hubbed = igpt.GPT.from_pretrained(out)
    hubbed.save_pretrained(tmp_path / "again")
    again = igpt.GPT.from_pretrained(tmp_path / "again")
    assert same_weights(again, model) and again.tokenizer.fingerprint() == palette.fingerprint()
    assert again.record.model == CFG
    card = (tmp_path / "again" / "README.md").read_text()
    assert "library_name: igpt" in card and palette.fingerprint() in card
    with pytest.raises(ValueError, match="pass tokenizer="):
        igpt.GPT(CFG).save_pretrained(tmp_path / "fresh")
    igpt.GPT(CFG).save_pretrained(tmp_path / "fresh", tokenizer=palette)
    assert igpt.load(tmp_path / "fresh").model.config == CFG


def test_hf_export_writes_a_model_card_from_the_record(tmp_path, capsys):
    model, palette = tiny(3)
    record = CheckpointRecord(CFG, palette.fingerprint(), "ar", step=1234, data="cifar10.npz")
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step-1234", model, palette, record)
    (tmp_path / "run" / "run.json").write_text(json.dumps(  # the parts of pretraining's run.json the card reads
        {"data": {"resize": "center"}, "data_identity": {"kind": "npz", "digest": "abc123", "files": 1}}))
    assert main(["convert", "--to", "hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "ImageGPTForCausalImageModeling" in printed and "centred square" in printed
    card = (tmp_path / "hf" / "README.md").read_text()
    for fact in ("2 layers, width 16, 2 heads, 4x4 pixels (16 positions)", f"{CFG.num_params():,} parameters",
                 f"8 colours, fingerprint {palette.fingerprint()}", "autoregressive", "cifar10.npz", "1,234",
                 "pipeline_tag: unconditional-image-generation", "box filter", "digest abc123",
                 "--resize center"):
        assert fact in card, fact


def finetuned_checkpoint(path: Path, classes=("cat", "dog", "ship"), seed: int = 4) -> tuple[CoreGPT, torch.Tensor]:
    """What igpt finetune writes for its best checkpoint: the trunk, classifier.safetensors, the record."""
    model, palette = tiny(seed)
    head = torch.randn(len(classes), CFG.n_embd, generator=torch.Generator().manual_seed(seed))
    record = CheckpointRecord(CFG, palette.fingerprint(), "ar", step=10,
                              finetuned=Finetuned(len(classes), tuple(classes), 0.5, "base"))
    save_checkpoint(path, model, palette, record, classifier={"head.weight": head})
    return model, head


def test_classify_prints_the_top_classes_with_the_training_resize(tmp_path, capsys):
    model, head = finetuned_checkpoint(tmp_path / "ft" / "checkpoints" / "step-10")
    (tmp_path / "ft" / "finetune.json").write_text(json.dumps({"resize": "squash"}))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 6, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    assert main(["classify", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--checkpoint",
                 str(tmp_path / "ft"), "--top-k", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{tmp_path / 'a.png'}: ")
    palette = igpt.load(tmp_path / "ft").tokenizer
    ids = igpt.encode_images([tmp_path / "a.png", tmp_path / "b.png"], palette, 4, resize="squash")
    with torch.no_grad():
        probs = torch.softmax(model.forward_features(ids).mean(1) @ head.T, -1)
    names = ("cat", "dog", "ship")
    for line, p in zip(lines, probs):
        top = p.topk(2)
        want = ", ".join(f"{names[int(i)]} {float(v):.4f}" for v, i in zip(top.values, top.indices))
        assert line.endswith(want), (line, want)
    # an unreadable image is one line naming it
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["classify", str(tmp_path / "bad.png"), "--checkpoint", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.png" in err
    # a checkpoint without a head says so
    model2, palette2 = tiny(5)
    save_checkpoint(tmp_path / "plain", model2, palette2, CheckpointRecord(CFG, palette2.fingerprint()))
    assert main(["classify", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "plain")]) == 2
    assert "not a fine-tuned classifier" in capsys.readouterr().err


def test_classify_reads_a_bert_trunk_masked_at_its_recorded_rate(tmp_path):
    from igpt.config import ClassifyConfig
    from igpt.eval.classify import classify
    from igpt.objectives import EVAL_MASK_KEY, sample_keep_mask
    from igpt.runtime import derived_generator

    torch.manual_seed(7)
    model, palette = randomize(CoreGPT(CFG, causal=False), seed=7).eval(), tiny(7)[1]
    head = torch.randn(3, CFG.n_embd, generator=torch.Generator().manual_seed(7))
    record = CheckpointRecord(CFG, palette.fingerprint(), "bert", step=10, mask_prob=0.4,
                              finetuned=Finetuned(3, ("cat", "dog", "ship"), 0.5, "base"))
    save_checkpoint(tmp_path / "ft", model, palette, record, classifier={"head.weight": head})
    images = [np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8) for i in range(6)]
    ids = igpt.encode_images(images, palette, 4)
    with torch.no_grad():
        def probs(keep):
            return torch.softmax(model.layer_features(ids, [2], keep=keep)[2] @ head.T, -1)
        masks = [sample_keep_mask(tuple(ids.shape), 0.4, derived_generator(3, EVAL_MASK_KEY, k), torch.device("cpu"))
                 for k in range(4)]
        want = sum(probs(keep) for keep in masks) / 4  # four masks at the recorded rate, probabilities averaged
        unmasked = probs(None)
    got = classify(tmp_path / "ft", images, ClassifyConfig(top_k=3, n_masks=4, seed=3, device="cpu"))
    names = ("cat", "dog", "ship")
    for preds, p in zip(got, want):
        assert [pr.label for pr in preds] == [names[int(i)] for i in p.argsort(descending=True)]
        assert [pr.prob for pr in preds] == pytest.approx(sorted(p.tolist(), reverse=True), abs=1e-5)
    got_probs = torch.tensor([[dict(preds)[n] for n in names] for preds in got])
    assert not torch.allclose(got_probs, unmasked, atol=1e-3)  # the masks change what the trunk reads


def test_images_in_and_out_and_per_layer_features(tmp_path):
    model, palette = tiny(6)
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.png")
    from igpt.data.images import to_n_px
    ids = igpt.encode_images([tmp_path / "p.png", Image.fromarray(photo), photo], palette, 4)
    want = palette.encode(to_n_px(photo, 4, "center")).reshape(16)
    assert ids.shape == (3, 16) and all(torch.equal(row, want) for row in ids)
    assert torch.equal(igpt.encode_images(tmp_path / "p.png", palette, 4), ids[:1])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        igpt.encode_images([tmp_path / "missing.png"], palette, 4)
    images = palette.decode_images(ids)
    assert images.shape == (3, 4, 4, 3) and images.dtype == torch.uint8
    assert torch.equal(images[0].reshape(16, 3), palette.decode(ids[0]))
    with pytest.raises(ValueError, match="square"):
        palette.decode_images(ids[:, :15])
    with torch.no_grad():
        final, per_layer = model.forward_intermediates(ids)
        assert len(per_layer) == CFG.n_layer + 1 and torch.equal(final, model.forward_features(ids))
        pooled = model.layer_features(ids)
        for layer, f in enumerate(per_layer):
            assert torch.allclose(f.mean(1), pooled[layer], atol=1e-6)
        raw = model.forward_intermediates(ids, [0, 1], norm=False, intermediates_only=True)
        states = model.hidden_states(ids)
        assert torch.equal(raw[0], states[0]) and torch.equal(raw[1], states[1])
        assert not torch.allclose(raw[1], per_layer[1])  # the norm is applied by default
        assert len(model.forward_intermediates(ids, 1, intermediates_only=True)) == 1


def test_push_to_hub_uploads_the_saved_folder_to_a_mocked_hub(tmp_path, monkeypatch):
    """Only the folder push_to_hub hands to huggingface_hub's HfApi is checked: the Hub itself is replaced
    by a stand-in that records the upload (nothing is sent)."""
    import huggingface_hub.hub_mixin as hub_mixin

    uploads: list[dict] = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kw):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            back = igpt.load(folder_path)
            uploads.append({"repo_id": repo_id, "files": files, "palette": back.tokenizer.fingerprint()})
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    model, palette = tiny(7)
    saved = igpt.save(model, palette, tmp_path / "m")
    url = igpt.GPT.from_pretrained(saved).push_to_hub("me/tiny-igpt")
    assert url.endswith("/commit/0") and uploads == [
        {"repo_id": "me/tiny-igpt", "files": ["README.md", "config.json", "model.safetensors", "palette.npz"],
         "palette": palette.fingerprint()}]
