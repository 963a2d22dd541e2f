"""The page of ``igpt serve``, built with Gradio: choose an image, then complete it, infill it or sample.

Everything the page computes is ``igpt.serve.engine``'s; this module lays it out and turns its messages into
words on the page. Safety: uploads arrive as bytes (``gr.UploadButton(type="binary")``) and drawings as
arrays, so no path a client sends is ever opened; Gradio's own upload limit (``max_file_size``) refuses big
files before they are stored; one queue computes ``--concurrency`` requests at a time; nothing calls out
(no analytics, no share link, system fonts instead of web fonts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from igpt.serve.engine import UPLOAD_KINDS, Draw, Engine, Picture
from igpt.viz import hide_rows

# Small images are shown enlarged with crisp square pixels, as in the paper's figures.
CSS = """
.pixels img, .pixels canvas { image-rendering: pixelated; }
.pixels img { width: 100% !important; height: 100% !important; object-fit: contain; }
#swatch img { image-rendering: pixelated; width: auto !important; height: auto !important; max-width: 100%; }
#status { min-height: 2.5em; }
"""
OBJECTIVE_WORDS = {"ar": "autoregressive (AR): predicts each {0} from those before it, left to right, top to bottom",
                   "bert": "BERT: predicts masked {0}s from all the others"}
EDITOR_SIDE = 256  # the infill canvas: the image enlarged to about this many screen pixels


def _theme(gr: Any) -> Any:
    # Gradio's default theme loads Google Fonts over the network; a closed network would wait for them.
    return gr.themes.Base(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def _say(kind: str, text: str) -> str:
    return f"**{kind}:** {text}"


def _card_markdown(engine: Engine) -> str:
    c = engine.card()
    val, word = c["val"], engine.id_word
    if engine.is_palette:
        seen = f"**Image size:** {c['n_px']}x{c['n_px']} pixels, **palette:** {c['vocab_size']} colours (below)"
    else:
        seen = (f"**Image size:** {c['side']}x{c['side']} pixels, as a {c['n_px']}x{c['n_px']} grid of codes of a "
                f"VQ-VAE (**codebook:** {c['vocab_size']} codes, below), each code a {engine.factor}x{engine.factor} "
                "patch")
    lines = [
        f"**Checkpoint:** `{c['checkpoint']}`",
        f"**Preset:** {c['preset']} ({c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads)",
        f"**Parameters:** {c['params']:,}",
        seen,
        f"**Objective:** {OBJECTIVE_WORDS[c['objective']].format(word)}",
        f"**Training step:** {c['step'] if c['step'] is not None else 'not recorded'}",
        "**Validation loss:** " + (f"{val['loss']:.4f} nats per {word} at step {val['step']}" if val and "loss" in val
                                   else "not recorded with this checkpoint"),
        f"**Converted from:** {c['source']}" if c["source"] else "",
        f"**Running on:** {c['device']} ({c['dtype']})",
    ]
    return "\n\n".join(line for line in lines if line)


def _guard(fn: Callable[..., Iterator[tuple]], n_out: int, warn: Callable[[str], Any],
           unchanged: Callable[[], Any]) -> Callable[..., Iterator[tuple]]:
    """Run a streaming handler so that a refusal or a CUDA out-of-memory becomes a message in the status box
    (and a notice, ``warn``: ``gr.Warning``) instead of a traceback, and the server goes on serving. The
    handler's last output is the status box; the others are left as they are (``unchanged``: ``gr.update``)."""
    def run(*args: Any) -> Iterator[tuple]:
        try:
            yield from fn(*args)
        except ValueError as e:
            warn(str(e))
            yield (*(unchanged() for _ in range(n_out - 1)), _say("Error", str(e)))
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            msg = "Out of GPU memory for this request; ask for fewer images, or try again when the GPU is free."
            warn(msg)
            yield (*(unchanged() for _ in range(n_out - 1)), _say("Error", msg))
    return run


def _draw(n: float, temperature: float, top_k: float, seed: float | None) -> Draw:
    """The controls' values as one request's ``Draw``. Gradio's API for the page passes any number a caller
    sends (NaN and infinities pass its range checks): one that is not finite is refused naming the control
    as the page labels it; the engine checks the ranges."""
    seed = 0 if seed is None else seed  # an emptied Seed box
    for label, value in (("Images", n), ("Temperature", temperature), ("Top-k", top_k), ("Seed", seed)):
        if not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, not {value}.")
    return Draw(n=int(n), temperature=float(temperature), top_k=int(top_k), seed=int(seed))


def _gallery(pixels: np.ndarray, rows: int, factor: int = 1) -> list[np.ndarray]:
    """Images (n, side, side, 3) with the pixel rows of the ``rows`` of ids not yet drawn greyed out (``factor``
    pixel rows per row of ids)."""
    return list(hide_rows(pixels, rows * factor) if rows * factor < pixels.shape[1] else pixels)


def _progress(rows: int, n_px: int, start: int, what: str, unit: str = "row") -> str:
    if rows >= n_px:
        return _say("Done", what)
    return _say("Working", f"{what}: {unit} {rows} of {n_px} ({rows - start} drawn)")


def _unit(engine: Engine) -> str:
    # one row of ids is one row of pixels with a palette, a row of codes (factor pixel rows) with a VQ-VAE
    return "row" if engine.is_palette else "row of codes"


def _editor_scale(engine: Engine) -> int:
    """Screen pixels per picture pixel on the infill canvas: the picture enlarged to about ``EDITOR_SIDE``."""
    return max(1, EDITOR_SIDE // engine.side)


def _need(picture: Picture | None) -> Picture:
    if picture is None:
        raise ValueError("Choose a picture first (upload, draw, or pick one).")
    return picture


def _guarded(gr: Any, fn: Callable[..., Iterator[tuple]], n_out: int) -> Callable[..., Iterator[tuple]]:
    return _guard(fn, n_out, gr.Warning, gr.update)


def _intro(engine: Engine) -> str:
    """The page's heading: what the model sees of a picture, and what each tab does."""
    n_px, side, factor = engine.n_px, engine.side, engine.factor
    if engine.is_palette:
        seen = f"**{n_px}x{n_px} pixels in {engine.tokenizer.k} colours**"
    else:
        seen = (f"**a {n_px}x{n_px} grid of codes** of a VQ-VAE ({engine.tokenizer.k} codes, each a {factor}x{factor} "
                f"patch of a {side}x{side} picture)")
    return (f"# Image GPT: complete a picture\n"
            f"Choose a picture; the model sees it as {seen} "
            f"(shown as *Quantized original*). **Complete** keeps the top rows and lets the model draw the rest, "
            f"row by row, several times. **Infill** refills a region you paint over. **Sample** draws new "
            f"images from nothing. The *Model* tab describes the checkpoint.")


class _Chooser(NamedTuple):
    """The controls of column 1, where a picture is chosen (``pick``/``use_pick`` only with ``--data``)."""
    upload: Any
    sketch: Any
    use_sketch: Any
    pick: Any | None
    use_pick: Any | None
    shown: Any  # the chosen picture as the model sees it


def _choose_column(gr: Any, engine: Engine) -> _Chooser:
    """Column 1: upload, draw or pick a picture, and see it quantized. Its events are wired by ``_on_choose``,
    once the tabs it updates exist."""
    gr.Markdown("### 1. Choose a picture")
    pick = use_pick = None
    with gr.Tabs():
        with gr.Tab("Upload"):
            upload = gr.UploadButton("Upload an image", type="binary", variant="primary", elem_id="upload")
            gr.Markdown(f"{UPLOAD_KINDS}, up to {engine.cfg.max_upload_mb:g} MB. It is cropped to a "
                        f"centred square and shrunk to {engine.side}x{engine.side} pixels.")
        with gr.Tab("Draw"):
            gr.Markdown("Pick the brush on the left of the canvas, draw, then press **Use the drawing**.")
            sketch = gr.Sketchpad(label="Draw a picture", type="numpy", image_mode="RGBA",
                                  canvas_size=(EDITOR_SIDE, EDITOR_SIDE), elem_id="sketch", buttons=[])
            use_sketch = gr.Button("Use the drawing")
        with gr.Tab("From the dataset"):
            if engine.data is not None:
                pick = gr.Slider(0, len(engine.data) - 1, value=0, step=1, elem_id="pick",
                                 label=f"Image number in {engine.data_name} ({engine.split} split)")
                use_pick = gr.Button("Use this image", elem_id="use-pick")
            else:
                gr.Markdown("No dataset was given: start the page with `--data DATA` to pick images from one.")
    gr.Markdown("**Quantized original**: what the model sees")
    shown = gr.Image(label="Quantized original", show_label=False, type="numpy", format="png", interactive=False,
                     height=EDITOR_SIDE, elem_id="original", elem_classes="pixels", buttons=["download"])
    return _Chooser(upload, sketch, use_sketch, pick, use_pick, shown)


def _on_choose(gr: Any, engine: Engine, chooser: _Chooser, rows: Any, outputs: list) -> None:
    """A chosen picture fills ``outputs``: the page's state, the quantized original, the kept rows of Complete
    (``rows`` of them), the canvas of Infill, and the status box."""
    scale, factor = _editor_scale(engine), engine.factor

    def chosen(picture: Picture, rows_kept: int) -> Iterator[tuple]:
        pixels = picture.pixels
        editor_value = {"background": pixels.repeat(scale, 0).repeat(scale, 1), "layers": [], "composite": None}
        yield (picture, pixels, hide_rows(pixels[None], int(rows_kept) * factor)[0], editor_value,
               _say("Ready", "picture chosen; press Complete, or paint over it in Infill."))

    def from_upload(data: bytes | None, rows_kept: int) -> Iterator[tuple]:
        yield from chosen(engine.decode_upload(data), rows_kept)

    def from_sketch(drawing: dict | None, rows_kept: int) -> Iterator[tuple]:
        if drawing is None or drawing.get("composite") is None:
            raise ValueError("Draw something on the canvas first.")
        yield from chosen(engine.quantize(drawing["composite"]), rows_kept)

    chooser.upload.upload(_guarded(gr, from_upload, 5), [chooser.upload, rows], outputs)
    chooser.use_sketch.click(_guarded(gr, from_sketch, 5), [chooser.sketch, rows], outputs)
    if engine.data is not None:
        def from_data(index: float, rows_kept: int) -> Iterator[tuple]:
            yield from chosen(engine.dataset_image(int(index)), rows_kept)
        chooser.use_pick.click(_guarded(gr, from_data, 5), [chooser.pick, rows], outputs)


def _controls(gr: Any, engine: Engine) -> list:
    """How images are drawn, shared by the tabs: [images, temperature, top-k, seed]."""
    cfg, sampling = engine.cfg, engine.sampling
    choices = "colours" if engine.is_palette else "codes"  # what temperature and top-k choose among
    with gr.Row():
        n = gr.Slider(1, cfg.max_samples, value=cfg.n_samples, step=1, label="Images",
                      info="how many to draw at once", elem_id="n")
        temperature = gr.Slider(0.0, 2.0, value=sampling.temperature, step=0.05, label="Temperature",
                                info=f"lower: safer {choices}; 0: always the likeliest", elem_id="temperature")
        top_k = gr.Slider(0, engine.tokenizer.k, value=sampling.top_k, step=1, label="Top-k",
                          info=f"only the k likeliest {choices}; 0: all", elem_id="top_k")
        seed = gr.Number(value=sampling.seed, precision=0, minimum=0, maximum=2**32 - 1, label="Seed",
                         info="same seed, same images", elem_id="seed")
    return [n, temperature, top_k, seed]


def _complete_tab(gr: Any, engine: Engine, original: Any, controls: list, status: Any) -> tuple[Any, Any]:
    """Complete: keep the top rows of the chosen picture and draw the rest. Returns the rows slider and the
    kept-rows image, which choosing a picture updates."""
    n_px, factor = engine.n_px, engine.factor
    with gr.Tab("Complete", elem_id="tab-complete"):
        rows = gr.Slider(0, n_px, value=n_px // 2, step=1, elem_id="rows",
                         label="Rows to keep from the top" if engine.is_palette else
                         f"Rows of codes to keep from the top (each {factor} rows of pixels)")
        if not engine.can_sample:
            gr.Markdown(f"This BERT model fills the rows below by iterative infilling ({engine.cfg.rounds} "
                        "rounds); its completions appear when the last round is done.")
        complete_btn = gr.Button("Complete", variant="primary", elem_id="complete")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=160):
                gr.Markdown("**Kept rows** (the rest is grey)")
                kept = gr.Image(label="Kept rows", show_label=False, type="numpy", format="png", interactive=False,
                                height=EDITOR_SIDE, elem_id="kept", elem_classes="pixels", buttons=[])
            with gr.Column(scale=2):
                gr.Markdown("**Completions** (they fill in row by row)")
                completions = gr.Gallery(label="Completions", show_label=False, format="png", columns=4,
                                         height=EDITOR_SIDE, object_fit="contain", elem_id="completions",
                                         elem_classes="pixels", interactive=False, buttons=["download"])

    def show_kept(picture: Picture | None, rows_kept: int) -> np.ndarray | None:
        return None if picture is None else hide_rows(picture.pixels[None], int(rows_kept) * factor)[0]

    def run_complete(picture, rows_kept, n_, t, k, s) -> Iterator[tuple]:
        picture, rows_kept, draw = _need(picture), int(rows_kept), _draw(n_, t, k, s)
        rows_word = "rows" if engine.is_palette else "rows of codes"
        what = f"{draw.n} completion(s) of the bottom {n_px - rows_kept} {rows_word}, seed {draw.seed}"
        yield hide_rows(picture.pixels[None], rows_kept * factor)[0], [], _say("Working", f"{what}: starting")
        for done, images in engine.complete(picture, rows_kept, draw):
            yield gr.update(), _gallery(images, done, factor), _progress(done, n_px, rows_kept, what, _unit(engine))

    rows.change(show_kept, [original, rows], kept, queue=False)
    complete_btn.click(_guarded(gr, run_complete, 3), [original, rows, *controls], [kept, completions, status],
                       api_name="complete")
    return rows, kept


def _infill_tab(gr: Any, engine: Engine, original: Any, controls: list, status: Any) -> Any:
    """Infill: refill the region painted over the chosen picture. Returns the canvas, which choosing a picture
    fills."""
    n_px, side, factor, word, scale = engine.n_px, engine.side, engine.factor, engine.id_word, _editor_scale(engine)
    with gr.Tab("Infill", elem_id="tab-infill"):
        gr.Markdown(
            "Pick the brush on the left of the canvas, paint over the part to fill in, then press "
            f"**Infill**. Unpainted {word}s are kept exactly." if not engine.can_sample else
            "Pick the brush on the left of the canvas, paint over the part to fill in, then press "
            f"**Infill**. This model reads {word}s left to right, top to bottom, so it refills "
            f"**everything from the first painted {word} down**; what lies above is kept exactly."
            + ("" if engine.is_palette else f" A code is painted over when half of its {factor}x{factor} patch is."))
        editor = gr.ImageEditor(label="Paint over the region to fill", type="numpy", image_mode="RGBA", sources=(),
                                elem_id="editor", brush=gr.Brush(colors=["#ff00ff"], default_size=max(4, scale)),
                                canvas_size=(side * scale, side * scale), elem_classes="pixels", buttons=[])
        infill_btn = gr.Button("Infill", variant="primary", elem_id="infill")
        gr.Markdown("**Infilled**")
        infilled = gr.Gallery(label="Infilled", show_label=False, format="png", columns=4, height=EDITOR_SIDE,
                              object_fit="contain", elem_id="infilled", elem_classes="pixels", interactive=False,
                              buttons=["download"])

    def run_infill(picture, painted, n_, t, k, s) -> Iterator[tuple]:
        picture, draw = _need(picture), _draw(n_, t, k, s)
        layers = (painted or {}).get("layers") or []
        strokes = sum((np.asarray(layer)[..., 3].astype(np.int32) for layer in layers), np.zeros(1, np.int32))
        if not layers or not np.any(strokes):
            raise ValueError("Paint over the part of the picture to fill in first.")
        mask = engine.mask_from_strokes(np.clip(strokes, 0, 255).astype(np.uint8))
        first = int(np.flatnonzero(mask.reshape(-1))[0]) // n_px if mask.any() else 0
        what = f"{draw.n} infill(s), seed {draw.seed}"
        yield [], _say("Working", f"{what}: starting")
        for done, images in engine.infill_mask(picture, mask, draw):
            yield _gallery(images, done, factor), _progress(done, n_px, first, what, _unit(engine))

    infill_btn.click(_guarded(gr, run_infill, 2), [original, editor, *controls], [infilled, status],
                     api_name="infill")
    return editor


def _sample_tab(gr: Any, engine: Engine, controls: list, status: Any) -> None:
    """Sample: new images from nothing (AR checkpoints only; the button is disabled for BERT)."""
    ar = engine.can_sample
    with gr.Tab("Sample", elem_id="tab-sample"):
        gr.Markdown("New images drawn from nothing, row by row." if ar else
                    "A BERT checkpoint cannot draw images from nothing; use Complete or Infill.")
        sample_btn = gr.Button("Sample", variant="primary", elem_id="sample", interactive=ar)
        samples = gr.Gallery(label="Samples", show_label=False, format="png", columns=4, height=EDITOR_SIDE,
                             object_fit="contain", elem_id="samples", elem_classes="pixels", interactive=False,
                             buttons=["download"])

    def run_sample(n_, t, k, s) -> Iterator[tuple]:
        draw = _draw(n_, t, k, s)
        what = f"{draw.n} sample(s), seed {draw.seed}"
        yield [], _say("Working", f"{what}: starting")
        for done, images in engine.sample(draw):
            yield _gallery(images, done, engine.factor), _progress(done, engine.n_px, 0, what, _unit(engine))

    sample_btn.click(_guarded(gr, run_sample, 2), controls, [samples, status], api_name="sample")


def _model_tab(gr: Any, engine: Engine) -> None:
    """Model: the checkpoint's card and every colour (or code) it can draw."""
    swatch_label = ("Palette (every colour the model can draw)" if engine.is_palette else
                    "Codebook (each code decoded from a grid of that code alone; centre patch)")
    with gr.Tab("Model", elem_id="tab-model"):
        gr.Markdown(_card_markdown(engine), elem_id="card")
        gr.Image(value=engine.swatch(), format="png", interactive=False, label=swatch_label, elem_id="swatch",
                 buttons=[])


def build_page(engine: Engine) -> Any:
    """The page, a ``gradio.Blocks`` not yet launched: column 1 chooses a picture, column 2 holds the shared
    controls and one tab per way of drawing (Complete, Infill, Sample) beside the model's card."""
    # Gradio is the optional ``serve`` extra: imported only when a page is built (``igpt serve`` checks
    # first that it is installed), so the rest of igpt imports without it.
    import gradio as gr

    with gr.Blocks(title="igpt: Image GPT", analytics_enabled=False) as page:
        gr.Markdown(_intro(engine))
        original = gr.State(None)  # the chosen Picture (its ids and their pixels), or None
        with gr.Row():
            with gr.Column(scale=1):
                chooser = _choose_column(gr, engine)
            with gr.Column(scale=2):
                gr.Markdown("### 2. Choose how to draw")
                controls = _controls(gr, engine)
                status = gr.Markdown(_say("Ready", "choose a picture, or press Sample."), elem_id="status")
                with gr.Tabs():
                    rows, kept = _complete_tab(gr, engine, original, controls, status)
                    editor = _infill_tab(gr, engine, original, controls, status)
                    _sample_tab(gr, engine, controls, status)
                    _model_tab(gr, engine)
        _on_choose(gr, engine, chooser, rows, [original, chooser.shown, kept, editor, status])
    return page
