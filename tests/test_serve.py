"""``igpt serve``: the engine beneath the page (no browser), and the page itself end to end in headless
Chromium driven by Playwright (Debian's ``chromium``; nothing downloads a browser).

Without ``/usr/bin/chromium`` the browser test is skipped, unless ``IGPT_REQUIRE_BROWSER=1`` (set by
``.ci/run``) makes it fail. The screenshot goes to ``test-artifacts/serve.png`` in the repository, or to the
folder ``IGPT_TEST_ARTIFACTS`` names.
"""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from conftest import randomize
from igpt.cli import main
from igpt.config import ModelConfig, SampleConfig, ServeConfig
from igpt.data.images import to_n_px
from igpt.generate.sample import make_generator, sample, sample_rows
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.serve import Draw, Engine
from igpt.serve.page import _guard
from igpt.train.rundir import append_metrics
from igpt.weights.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_PX, K = 8, 16
CPU = SampleConfig(device="cpu")
UPLOAD_INPUT = "input[type=file][data-testid='Upload an image-upload-button']"  # the upload button's input


def _china() -> np.ndarray:
    return load_sample_image("china.jpg")  # (427, 640, 3) uint8, shipped with scikit-learn


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_china()).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _run(root: Path, objective: str) -> Path:
    """A run directory with one tiny random checkpoint at step 7 and a logged validation loss."""
    torch.manual_seed(0)
    model = randomize(GPT(ModelConfig.from_preset("igpt-nano", n_vocab=K, n_px=N_PX), causal=objective == "ar"))
    palette = Palette.fit(to_n_px(_china(), 32), k=K, iters=5)
    run = root / "run"
    record = CheckpointRecord(model.config, palette.fingerprint(), objective, step=7)
    save_checkpoint(run / "checkpoints" / "step-0000007", model, palette, record)
    append_metrics(run, {"step": 7, "split": "val", "loss": 2.5, "bits": 3.6})
    return run


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("ar"), "ar")


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("bert"), "bert")


def _quantized_china(engine: Engine) -> np.ndarray:
    """igpt's own view of the photo: the data pipeline's resize, then the palette."""
    pixels = to_n_px(Image.open(io.BytesIO(_jpeg_bytes())), N_PX)
    return engine.tokenizer.decode(engine.tokenizer.encode(pixels)).reshape(N_PX, N_PX, 3).numpy()


# ---- without a browser


def test_sample_rows_yields_each_row_keeps_the_prefix_and_ends_as_sample(nano_model):
    n_px, T = nano_model.config.n_px, nano_model.config.n_ctx
    prefix = torch.randint(0, nano_model.config.n_vocab, (3, 2 * n_px + 3))
    steps = []
    for step in sample_rows(nano_model, 3, prefix=prefix, generator=make_generator(5, torch.device("cpu"))):
        assert torch.is_grad_enabled()  # no_grad holds inside each step only, not in the caller between rows
        steps.append(step)
    assert [rows for rows, _ in steps] == list(range(2, n_px + 1))
    for rows, ids in steps:
        assert torch.equal(ids[:, :prefix.shape[1]], prefix)
        assert not ids[:, max(rows * n_px, prefix.shape[1]):].any()  # nothing past the drawn rows yet
    whole = sample(nano_model, 3, prefix=prefix, generator=make_generator(5, torch.device("cpu")))
    assert torch.equal(steps[-1][1], whole) and whole.shape == (3, T)


@pytest.mark.slow  # completes twice with two seeds
def test_complete_keeps_the_quantized_rows_and_depends_on_the_seed(ar_run):
    engine = Engine(ar_run, ServeConfig(), CPU)
    picture = engine.decode_upload(_jpeg_bytes())
    pixels = picture.pixels
    assert np.array_equal(pixels, _quantized_china(engine))
    assert torch.equal(picture.ids, engine.tokenizer.encode(pixels).reshape(-1))
    finals = []
    for seed in (0, 1):
        steps = list(engine.complete(picture, 3, Draw(n=2, seed=seed)))
        assert [rows for rows, _ in steps] == list(range(3, N_PX + 1))
        for _, images in steps:
            assert images.shape == (2, N_PX, N_PX, 3)
            assert np.array_equal(images[:, :3], np.broadcast_to(pixels[:3], (2, 3, N_PX, 3)))
        finals.append(steps[-1][1])
    assert not np.array_equal(finals[0][:, 3:], finals[1][:, 3:])


def test_uploads_that_are_not_images_or_too_big_are_refused_in_one_line(ar_run):
    engine = Engine(ar_run, ServeConfig(max_upload_mb=0.01), CPU)
    with pytest.raises(ValueError, match=r"^The upload is not an image \(PNG, JPEG, .* expected\)\.$"):
        engine.decode_upload(b"just some words\n")
    with pytest.raises(ValueError, match="could not be read as an image"):
        engine.decode_upload(_jpeg_bytes()[:2000])  # a photo cut short
    with pytest.raises(ValueError, match="empty"):
        engine.decode_upload(b"")
    with pytest.raises(ValueError, match=r"up to 0.01 MB"):
        engine.decode_upload(_jpeg_bytes())  # a real photo, over this page's limit
    with pytest.raises(ValueError, match="Choose 1..16"):
        next(engine.sample(Draw(n=17)))


def test_bert_infill_changes_only_the_painted_pixels_and_ar_refills_from_the_first(ar_run, bert_run):
    mask = np.zeros((N_PX, N_PX), dtype=bool)
    mask[2:4, 3:6] = True
    for run, kept in ((bert_run, ~mask), (ar_run, np.arange(N_PX * N_PX).reshape(N_PX, N_PX) < 2 * N_PX + 3)):
        engine = Engine(run, ServeConfig(), CPU)
        picture = engine.decode_upload(_jpeg_bytes())
        pixels = picture.pixels
        images = list(engine.infill_mask(picture, mask, Draw(n=3, seed=2)))[-1][1]
        assert np.array_equal(images[:, kept], np.broadcast_to(pixels[kept], images[:, kept].shape))
        assert not np.array_equal(images[:, mask], np.broadcast_to(pixels[mask], images[:, mask].shape))
    with pytest.raises(ValueError, match="cannot draw images from nothing"):
        next(Engine(bert_run, ServeConfig(), CPU).sample(Draw()))


def test_strokes_mask_a_pixel_when_they_cover_half_of_it(ar_run):
    engine = Engine(ar_run, ServeConfig(), CPU)
    strokes = np.zeros((N_PX * 4, N_PX * 4), dtype=np.uint8)
    strokes[0:4, 0:4] = 255  # all of pixel (0, 0)
    strokes[4:8, 8:10] = 255  # half of pixel (1, 2)
    strokes[8:9, 0:4] = 255  # a quarter of pixel (2, 0)
    mask = engine.mask_from_strokes(strokes)
    assert sorted(zip(*np.nonzero(mask))) == [(0, 0), (1, 2)]


def test_model_card_names_the_checkpoint_and_its_validation_loss(ar_run):
    engine = Engine(ar_run, ServeConfig(), CPU)
    card = engine.card()
    assert card["preset"] == "igpt-nano"
    assert (card["n_layer"], card["n_px"], card["vocab_size"], card["objective"], card["step"]) == (2, 8, K, "ar", 7)
    assert card["params"] == engine.model.config.num_params()
    assert card["val"] == {"step": 7, "loss": 2.5, "bits": 3.6}
    swatch = engine.swatch(ncol=8, scale=3)
    assert swatch.shape == (2 * 4 + 1, 8 * 4 + 1, 3)  # 16 colours in 2 rows of 8, 3 px each, 1 px borders
    colours = {tuple(c) for c in engine.tokenizer.decode(torch.arange(K)).numpy()}
    assert colours <= {tuple(c) for c in swatch.reshape(-1, 3)}


def test_serve_config_refuses_bad_limits():
    for kw, text in (({"port": 0}, "--port"), ({"max_upload_mb": 0.0}, "--max-upload-mb"),
                     ({"concurrency": 0}, "--concurrency"), ({"n_samples": 20}, "--max-samples")):
        with pytest.raises(ValueError, match=text):
            ServeConfig(**kw)


def test_serve_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["serve", "--checkpoint", "no-such-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "igpt serve: error: the page needs Gradio, which is not installed: pip install 'igpt[serve]'"


def test_a_refusal_or_running_out_of_memory_is_a_message_and_the_next_request_is_served():
    calls, notices = [], []

    def handler(fail: BaseException | None):
        calls.append(fail)
        yield "partial", "working"
        if fail is not None:
            raise fail
        yield "whole", "done"

    guarded = _guard(handler, 2, notices.append, lambda: "unchanged")
    oom = list(guarded(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert oom[-1][0] == "unchanged" and oom[-1][1].startswith("**Error:** Out of GPU memory") and len(oom) == 2
    refused = list(guarded(ValueError("Choose a picture first.")))
    assert refused[-1] == ("unchanged", "**Error:** Choose a picture first.")
    assert notices[1] == "Choose a picture first." and notices[0].startswith("Out of GPU memory")
    assert list(guarded(None))[-1] == ("whole", "done") and len(calls) == 3
    with pytest.raises(KeyError):  # anything else is a bug, and Gradio's own error box says so
        list(guarded(KeyError("bug")))


# ---- the page, in a browser


def _browser_or_skip():
    required = os.environ.get("IGPT_REQUIRE_BROWSER") == "1"
    missing = [m for m in ("gradio", "playwright") if importlib.util.find_spec(m) is None]
    why = (f"Python packages {missing} are not installed (pip install -e '.[test]')" if missing else
           None if CHROMIUM.exists() else f"{CHROMIUM} is not installed (apt-get install chromium)")
    if why and required:
        pytest.fail(f"IGPT_REQUIRE_BROWSER=1 but {why}")
    if why:
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc: subprocess.Popen, port: int, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"igpt serve exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("igpt serve did not start listening")


@pytest.fixture
def server(ar_run):
    _browser_or_skip()
    port = _free_port()
    cmd = [sys.executable, "-m", "igpt", "serve", "--checkpoint", str(ar_run), "--port", str(port),
           "--device", "cpu", "--max-upload-mb", "1", "--n-samples", "3"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_server(proc, port)
        yield f"http://127.0.0.1:{port}", Engine(ar_run, ServeConfig(), CPU)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _images(page, selector: str) -> list[np.ndarray]:
    """The pictures the page shows in ``selector``, fetched from their src as the browser does."""
    out = []
    for src in page.eval_on_selector_all(f"{selector} img", "els => els.map(e => e.src)"):
        body = page.request.get(src).body()
        out.append(np.asarray(Image.open(io.BytesIO(body)).convert("RGB")))
    return out


def _complete(page, seed: int) -> list[np.ndarray]:
    page.fill("#seed input", str(seed))
    page.press("#seed input", "Enter")
    page.click("#complete")
    page.wait_for_function(
        f"document.querySelector('#status').innerText.includes('Done') && "
        f"document.querySelector('#status').innerText.includes('seed {seed}')", timeout=60_000)
    images = _images(page, "#completions")
    assert len(images) == 3 and all(img.shape == (N_PX, N_PX, 3) for img in images)
    return images


@pytest.mark.slow  # a server and a browser
def test_the_page_completes_an_uploaded_photo_and_refuses_a_text_file_and_a_big_one(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, engine = server
    photo, notes, big = tmp_path / "china.jpg", tmp_path / "notes.txt", tmp_path / "big.png"
    photo.write_bytes(_jpeg_bytes())
    notes.write_text("not a picture\n")
    expected = _quantized_china(engine)
    artifacts = Path(os.environ.get("IGPT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url, wait_until="domcontentloaded")
            page.set_input_files(UPLOAD_INPUT, str(photo))
            page.wait_for_function("document.querySelector('#status').innerText.includes('picture chosen')",
                                   timeout=30_000)
            assert np.array_equal(_images(page, "#original")[0], expected)
            page.fill("#rows input[type=number]", "3")
            page.press("#rows input[type=number]", "Enter")
            first, second = _complete(page, 0), _complete(page, 1)
            for img in first + second:
                assert np.array_equal(img[:3], expected[:3])  # the kept rows are the quantized photo's
            assert any(not np.array_equal(a[3:], b[3:]) for a, b in zip(first, second))
            kept = _images(page, "#kept")[0]
            assert np.array_equal(kept[:3], expected[:3]) and (kept[3:] == 128).all()
            artifacts.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(artifacts / "serve.png"), full_page=True)

            page.set_input_files(UPLOAD_INPUT, str(notes))
            page.wait_for_function("document.querySelector('#status').innerText.includes('Error')", timeout=30_000)
            assert "The upload is not an image" in page.inner_text("#status")
            assert np.array_equal(_images(page, "#original")[0], expected)  # the chosen picture stays

            big.write_bytes(np.random.default_rng(0).integers(0, 256, 1_200_000, dtype=np.uint8).tobytes())
            page.set_input_files(UPLOAD_INPUT, str(big))  # over this server's --max-upload-mb 1
            page.get_by_text("exceed the maximum allowed size").first.wait_for(timeout=30_000)
            # the page works in a closed network: nothing it loads comes from anywhere but the server
            outside = [u for u in requested if not u.startswith((url, "data:", "blob:"))]
            assert requested and not outside, outside
        finally:
            browser.close()
