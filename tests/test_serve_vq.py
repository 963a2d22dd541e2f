"""``igpt serve`` on a model of VQ-VAE codes: the engine keeps, draws and masks rows of codes, shows pictures at
the tokenizer's input side decoded through it, and the page says codes, not colours."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import flat_pictures, randomize
from igpt.config import EvalDataConfig, ModelConfig, SampleConfig, ServeConfig
from igpt.config.tokenizer import TokenizerFitConfig, VQConfig
from igpt.model import GPT
from igpt.record import CheckpointRecord
from igpt.serve import Draw, Engine
from igpt.tokenizers import load_tokenizer
from igpt.train.tokenizer import fit_tokenizer
from igpt.weights.checkpoint import save_checkpoint

SIDE, FACTOR, K = 8, 2, 8
GRID = SIDE // FACTOR
TINY = VQConfig(input_side=SIDE, factor=FACTOR, vocab_size=K, code_dim=4, hidden=8, res_blocks=1, kmeans_iters=2)
FIT = TokenizerFitConfig(steps=2, batch_size=16, eval_every=2, log_every=1, ckpt_every=1, val_images=8, device="cpu")
CPU = SampleConfig(device="cpu")


@pytest.fixture(scope="module")
def vq(tmp_path_factory) -> dict[str, Path]:
    """A data file, a VQ-VAE tokenizer fitted on it (two steps), and an AR and a BERT run of random models of
    its codes."""
    root = tmp_path_factory.mktemp("vqserve")
    npz = root / "pictures.npz"
    np.savez(npz, x_train=flat_pictures(48, 0), y_train=np.arange(48) % 2, x_test=flat_pictures(16, 1),
             y_test=np.arange(16) % 2)
    fit_tokenizer(str(npz), root / "fit", TINY, FIT, progress=False)
    tokenizer = load_tokenizer(root / "fit" / "tokenizer.safetensors")
    runs = {}
    for objective in ("ar", "bert"):
        torch.manual_seed(0)
        model = randomize(GPT(ModelConfig.from_preset("igpt-nano", n_vocab=K, n_px=GRID), causal=objective == "ar"))
        runs[objective] = root / objective
        record = CheckpointRecord(model.config, tokenizer.fingerprint(), objective, step=3)
        save_checkpoint(runs[objective] / "checkpoints" / "step-0000003", model, tokenizer, record)
    return {"npz": npz, **runs}


def _recording(engine: Engine) -> list[torch.Tensor]:
    """Every id grid the engine decodes for the page, recorded (the pictures are decodings of them)."""
    seen, decode = [], engine.decode

    def record(ids: torch.Tensor) -> np.ndarray:
        seen.append(ids.clone())
        return decode(ids)
    engine.decode = record
    return seen


def test_complete_keeps_rows_of_codes_and_shows_pictures_at_the_input_side(vq):
    engine = Engine(vq["ar"], ServeConfig(), CPU, EvalDataConfig(data=str(vq["npz"]), split="test"))
    assert (engine.n_px, engine.side, engine.factor, engine.id_word) == (GRID, SIDE, FACTOR, "code")
    picture = engine.dataset_image(3)
    tokenizer = engine.tokenizer
    codes = tokenizer.encode(flat_pictures(16, 1)[3:4]).reshape(-1)  # (T,): the test split's image 3, encoded
    assert torch.equal(picture.ids, codes) and picture.pixels.shape == (SIDE, SIDE, 3)
    assert np.array_equal(picture.pixels, tokenizer.decode_images(codes[None]).numpy()[0])  # what the model sees
    seen = _recording(engine)
    steps = list(engine.complete(picture, 1, Draw(n=3, seed=4)))
    assert [rows for rows, _ in steps] == list(range(1, GRID + 1))  # one step per row of codes
    assert all(images.shape == (3, SIDE, SIDE, 3) for _, images in steps)
    final = seen[-1]  # (3, T)
    assert torch.equal(final[:, :GRID], codes[:GRID].expand(3, -1))  # the kept row of codes, code for code
    assert np.array_equal(steps[-1][1], tokenizer.decode_images(final).numpy())
    with pytest.raises(ValueError, match=f"Keep 0..{GRID} rows"):
        next(engine.complete(picture, GRID + 1, Draw()))


def test_bert_infills_exactly_the_painted_codes(vq):
    engine = Engine(vq["bert"], ServeConfig(), CPU)
    picture = engine.quantize(flat_pictures(1, 5)[0])
    codes = picture.ids
    assert torch.equal(codes, engine.tokenizer.encode(flat_pictures(1, 5)).reshape(-1))
    strokes = np.zeros((SIDE * 8, SIDE * 8), np.uint8)  # painted over the enlarged picture on the canvas
    strokes[16:32, 16:48] = 255  # pixel rows 2..3, columns 2..5: the codes (1, 1) and (1, 2)
    mask = engine.mask_from_strokes(strokes)
    assert sorted(zip(*np.nonzero(mask))) == [(1, 1), (1, 2)]
    seen = _recording(engine)
    (rows, images), = list(engine.infill_mask(picture, mask, Draw(n=4, seed=1)))
    assert rows == GRID and images.shape == (4, SIDE, SIDE, 3)
    keep = torch.from_numpy(~mask.reshape(-1))
    assert torch.equal(seen[-1][:, keep], codes[keep].expand(4, -1))
    assert not torch.equal(seen[-1][:, ~keep], codes[~keep].expand(4, -1))  # 4 draws over 8 codes: some differ


def test_card_swatch_and_page_speak_of_codes(vq):
    gr = pytest.importorskip("gradio")
    from igpt.serve.page import _card_markdown, build_page

    engine = Engine(vq["ar"], ServeConfig(), CPU)
    card = engine.card()
    assert (card["tokenizer"], card["side"], card["n_px"], card["vocab_size"]) == ("vqvae", SIDE, GRID, K)
    assert "4x4 grid of codes" in _card_markdown(engine) and "colours" not in _card_markdown(engine)
    swatch = engine.swatch(ncol=4, scale=4)  # 8 codes in 2 rows of 4, each a 2x2 patch drawn 2x: 4 px + 1
    assert swatch.shape == (2 * 5 + 1, 4 * 5 + 1, 3)
    alone = engine.tokenizer.decode_images(torch.full((1, GRID * GRID), 5)).numpy()[0]  # code 5 everywhere
    centre = alone[GRID // 2 * FACTOR:GRID // 2 * FACTOR + FACTOR, GRID // 2 * FACTOR:GRID // 2 * FACTOR + FACTOR]
    assert np.array_equal(swatch[1 + 5:1 + 5 + 4:2, 1 + 5:1 + 5 + 4:2], centre)  # code 5: row 1, column 1
    page = build_page(engine)
    words = " ".join(str(b.value) for b in page.blocks.values() if isinstance(b, gr.Markdown))
    assert "grid of codes" in words and "colours" not in words
    sliders = {b.elem_id: b for b in page.blocks.values() if isinstance(b, gr.Slider)}
    assert sliders["rows"].maximum == GRID and "Rows of codes" in sliders["rows"].label


@pytest.mark.slow  # a server and a browser
def test_the_page_completes_a_dataset_picture_with_rows_of_codes(vq):
    from test_serve import CHROMIUM, CHROMIUM_ARGS, ROOT, _browser_or_skip, _free_port, _images, _wait_for_server

    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    port = _free_port()
    cmd = [sys.executable, "-m", "igpt", "serve", "--checkpoint", str(vq["ar"]), "--port", str(port), "--device",
           "cpu", "--n-samples", "2", "--data", str(vq["npz"]), "--split", "test"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    expected = Engine(vq["ar"], ServeConfig(), CPU, EvalDataConfig(data=str(vq["npz"]), split="test")).dataset_image(5)
    try:
        _wait_for_server(proc, port)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}", wait_until="domcontentloaded")
                page.get_by_role("tab", name="From the dataset").click()
                page.fill("#pick input[type=number]", "5")
                page.press("#pick input[type=number]", "Enter")
                page.click("#use-pick")
                page.wait_for_function("document.querySelector('#status').innerText.includes('picture chosen')",
                                       timeout=30_000)
                assert np.array_equal(_images(page, "#original")[0], expected.pixels)  # decoded codes, 8x8
                page.fill("#rows input[type=number]", "1")
                page.press("#rows input[type=number]", "Enter")
                page.click("#complete")
                page.wait_for_function("document.querySelector('#status').innerText.includes('Done')",
                                       timeout=60_000)
                assert "bottom 3 rows of codes" in page.inner_text("#status")
                images = _images(page, "#completions")
                assert len(images) == 2 and all(img.shape == (SIDE, SIDE, 3) for img in images)
                kept = _images(page, "#kept")[0]  # one row of codes: two rows of pixels
                assert np.array_equal(kept[:FACTOR], expected.pixels[:FACTOR]) and (kept[FACTOR:] == 128).all()
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
