"""Parity with Hugging Face's ImageGPT in ``transformers`` (a test-only extra, installed by ``make test``; these
tests skip with a reason when it is missing): logits, hidden states and greedy completions equal, round trips
through its ``save_pretrained``, its processor quantizing as our palette, and our exported classifier in its
pipeline on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize

import igpt
from igpt.config import ModelConfig
from igpt.generate.sample import sample
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.weights.hf import load_hf, save_hf


def record(model, palette, objective: str = "ar", **kw) -> CheckpointRecord:
    return CheckpointRecord(model.config, palette.fingerprint(), objective, **kw)


@pytest.fixture
def tiny(nano_model: GPT) -> tuple[GPT, Palette]:
    return nano_model, Palette(np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32))


# ---- parity with transformers' ImageGPTForCausalImageModeling ----

@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="transformers is a test-only extra (pip install -e "
                               "'.[hf]'); it is needed to compare against Hugging Face's ImageGPT")


def hf_model(transformers, model: GPT, palette: Palette, path: Path):
    save_hf(model, palette, path, record(model, palette))
    return transformers.ImageGPTForCausalImageModeling.from_pretrained(path).eval()


def with_sos(ids: torch.Tensor, V: int) -> torch.Tensor:
    return torch.cat([torch.full((ids.shape[0], 1), V), ids[:, :-1]], 1)  # HF's layout of our AR input


@pytest.mark.slow  # builds each shape in both libraries
@pytest.mark.parametrize("shape", [dict(n_layer=1, n_embd=8, n_head=1, n_px=2, n_vocab=4),
                                   dict(n_layer=2, n_embd=32, n_head=4, n_px=4, n_vocab=16),
                                   dict(n_layer=3, n_embd=48, n_head=3, n_px=5, n_vocab=30)])
def test_logits_and_hidden_states_equal_transformers(transformers, shape, tmp_path):
    cfg = ModelConfig(**shape)
    model = randomize(GPT(cfg), seed=shape["n_layer"]).eval()
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (cfg.n_vocab, 3)))
    hf = hf_model(transformers, model, palette, tmp_path / "hf")
    ids = torch.randint(0, cfg.n_vocab, (3, cfg.n_ctx), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(with_sos(ids, cfg.n_vocab), output_hidden_states=True)
        assert (model(ids) - out.logits).abs().max() < 1e-4
        ours = model.hidden_states(ids)
        assert len(ours) == len(out.hidden_states) == cfg.n_layer + 1
        for layer, (a, b) in enumerate(zip(ours, out.hidden_states)):
            assert (a - b).abs().max() < 1e-4, layer
        # no-SOS mode is HF fed the processor's ids directly
        raw = hf(ids, output_hidden_states=True)
        assert (model(ids, sos=False) - raw.logits).abs().max() < 1e-4
        assert (model.hidden_states(ids, sos=False)[1] - raw.hidden_states[1]).abs().max() < 1e-4
        # and the modes differ, so matching each is not vacuous
        assert (model(ids, sos=False) - out.logits).abs().max() > 1e-2


def test_greedy_completions_equal_transformers_generate(transformers, tiny, tmp_path):
    model, palette = tiny
    hf = hf_model(transformers, model, palette, tmp_path / "hf")
    prefix = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(3))
    ours = sample(model, 4, prefix=prefix, temperature=0)
    context = torch.cat([torch.full((4, 1), 16), prefix], 1)  # [SOS] + prefix, as HF's docs generate
    # An explicit all-ones mask: left to infer one, generate would treat the SOS id as padding.
    theirs = hf.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=16 - 5,
                         do_sample=False)
    assert torch.equal(ours, theirs[:, 1:])
    assert len(set(map(tuple, ours[:, 5:].tolist()))) > 1  # completions depend on the prefix


@pytest.mark.slow
def test_igpt_s_shape_with_random_weights_equals_transformers(transformers, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("igpt-s")).eval()  # the released initialisation, then
    with torch.no_grad():  # a non-zero head and gains, as a trained model has
        model.lm_head.weight.normal_(0, 0.02)
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    palette = Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3)))
    hf = hf_model(transformers, model, palette, tmp_path / "hf")
    # The first 64 of the 1024 positions: every weight but wpe rows 64+ takes part (those are copied
    # verbatim, as the tiny shapes check at full length), and two 2-core forward passes at T = 1024 take ~30 s.
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours, theirs = model(ids), hf(with_sos(ids, 512)).logits
    assert ours.shape == theirs.shape == (1, 64, 512)
    assert torch.equal(hf.transformer.wpe.weight, model.wpe.weight)
    assert (ours - theirs).abs().max() < 1e-4 and ours.abs().max() > 0.5


def test_round_trip_through_transformers_save_pretrained(transformers, tiny, tmp_path):
    """igpt -> our HF export -> transformers loads and re-saves it -> igpt: unchanged."""
    model, palette = tiny
    hf = hf_model(transformers, model, palette, tmp_path / "hf")
    hf.save_pretrained(tmp_path / "resaved")
    transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "resaved")
    back, pal, info = load_hf(tmp_path / "resaved")
    assert pal.fingerprint() == palette.fingerprint() and info.objective == "ar"
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_import_of_a_model_built_by_transformers(transformers, tmp_path):
    config = transformers.ImageGPTConfig(vocab_size=11, n_positions=9, n_embd=16, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(5)
    hf = transformers.ImageGPTForCausalImageModeling(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # random weights (gains near 1), zero biases as iGPT's
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(torch.zeros_like(p) if name.endswith(".bias") else torch.randn_like(p) * 0.3 + gain)
    hf.save_pretrained(tmp_path / "hf")
    processor = transformers.ImageGPTImageProcessor(clusters=np.random.default_rng(0).uniform(-1, 1, (10, 3)),
                                                   size={"height": 3, "width": 3})
    processor.save_pretrained(tmp_path / "hf")
    model, palette, _ = igpt.load(tmp_path / "hf")
    assert model.config.n_px == 3 and palette.k == 10
    ids = torch.randint(0, 10, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(ids) - hf(with_sos(ids, 10)).logits).abs().max() < 1e-4
    px = np.random.default_rng(7).integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    from PIL import Image
    got = processor([Image.fromarray(p) for p in px], return_tensors="pt")["input_ids"]
    assert torch.equal(got, palette.encode(px).reshape(4, 9))  # the processor and our palette agree


def test_exported_processor_quantizes_like_our_palette(transformers, tiny, tmp_path):
    from PIL import Image

    model, palette = tiny
    save_hf(model, palette, tmp_path / "hf", record(model, palette))
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")
    px = np.random.default_rng(8).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    ids = processor([Image.fromarray(p) for p in px], return_tensors="pt")["input_ids"]
    assert ids.shape == (6, 16) and torch.equal(ids, palette.encode(px).reshape(6, 16))


# ---- exports that behave like igpt: the processor's ids and the classifier, on real photos ----

@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """scikit-learn's two bundled photographs (427 x 640 JPEGs)."""
    datasets = pytest.importorskip("sklearn.datasets")
    return {name: datasets.load_sample_image(name) for name in ("china.jpg", "flower.jpg")}


@pytest.fixture(scope="module")
def photo_palette(photos) -> Palette:
    """64 colours fitted to 50,000 of the photos' pixels."""
    return Palette.fit(np.concatenate([p.reshape(-1, 3) for p in photos.values()]), k=64, iters=5, seed=0,
                       device="cpu", max_pixels=50_000)


def centred_square(px: np.ndarray) -> np.ndarray:
    side = min(px.shape[:2])
    top, left = (px.shape[0] - side) // 2, (px.shape[1] - side) // 2
    return px[top:top + side, left:left + side]


def test_exported_processor_gives_igpts_ids_on_real_photos(transformers, photos, photo_palette, tmp_path):
    """The export's processor box-filters like igpt; it cannot cut the centred square first (documented in
    the model card), so it matches igpt's --resize squash on any photo and --resize center on the photo cut
    to its centred square. Uncut, the processor sees a different region than center does."""
    from PIL import Image

    palette, n_px = photo_palette, 32
    model = GPT(ModelConfig(n_layer=1, n_embd=8, n_head=1, n_px=n_px, n_vocab=64))
    save_hf(model, palette, tmp_path / "hf", record(model, palette))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    for name, px in photos.items():
        def hf_ids(img: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(processor(Image.fromarray(img), return_tensors="pt")["input_ids"]))
        center = igpt.encode_images(px, palette, n_px)  # (1, T): igpt's default, the training resize
        assert torch.equal(hf_ids(centred_square(px)), center), name
        assert torch.equal(hf_ids(px), igpt.encode_images(px, palette, n_px, resize="squash")), name
        assert (hf_ids(px) == center).float().mean() < 0.5, name  # the difference the card documents


def test_exported_classifier_runs_in_transformers_pipeline_on_a_real_photo(transformers, photos, photo_palette,
                                                                           tmp_path):
    """A fine-tuned checkpoint exports as ImageGPTForImageClassification. The pipeline feeds the processor's
    ids without the SOS shift (the model card says so): its probabilities are igpt's head on that reading,
    and the exported model fed [SOS] + ids[:-1] gives igpt classify's probabilities."""
    from PIL import Image

    from igpt.config import ClassifyConfig
    from igpt.eval.classify import classify
    from igpt.record import Finetuned
    from igpt.weights.checkpoint import save_checkpoint
    from igpt.weights.convert import export_hf

    palette, n_px, classes = photo_palette, 16, ("cat", "dog", "ship")
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_px=n_px, n_vocab=64)
    model = randomize(GPT(cfg), seed=0, scale=0.1).eval()
    head = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    rec = record(model, palette, finetuned=Finetuned(3, classes, 0.9, "base"), step=7)
    save_checkpoint(tmp_path / "ft", model, palette, rec, classifier={"head.weight": head})
    export_hf(tmp_path / "ft", tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "cat, dog, ship" in card and "SOS" in card
    pipe = transformers.pipeline("image-classification", model=str(tmp_path / "hf"))
    hf = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    for i, px in enumerate(photos.values()):
        square = centred_square(px)
        Image.fromarray(square).save(tmp_path / f"photo{i}.png")
        got = pipe(Image.fromarray(square), top_k=3)
        ids = igpt.encode_images(tmp_path / f"photo{i}.png", palette, n_px)  # (1, T)
        ours = classify(tmp_path / "ft", [tmp_path / f"photo{i}.png"], ClassifyConfig(top_k=3, device="cpu"))[0]
        with torch.no_grad():
            no_sos = torch.softmax(model.forward_features(ids, sos=False).mean(1) @ head.T, -1)[0]
            exact = torch.softmax(hf(with_sos(ids, 64)).logits, -1)[0]
        assert [r["label"] for r in got] == [classes[int(j)] for j in no_sos.argsort(descending=True)]
        for r in got:
            assert abs(r["score"] - float(no_sos[classes.index(r["label"])])) < 1e-5
        for p in ours:
            assert abs(p.prob - float(exact[classes.index(p.label)])) < 1e-5
