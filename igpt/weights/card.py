"""The model card (README.md) written beside exported or saved weights: what the model is, which tokenizer its
ids use, what it was trained with and on, and how its Hugging Face processor differs from igpt's resize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from igpt.record import CheckpointRecord
from igpt.tokenizers import AnyTokenizer

# What the exported preprocessor_config.json does, and where that differs from igpt (printed by convert too).
PROCESSOR_NOTE = (
    "The exported preprocessor_config.json resizes the whole image to n_px x n_px with a box filter and then "
    "quantizes each pixel to its nearest palette colour. igpt's default resize (--resize center) first cuts "
    "the centred square of side min(height, width) and then box-filters it down, which Hugging Face's "
    "ImageGPTImageProcessor cannot express: for square images, and for images cut to their centred square "
    "before the processor, the ids agree with igpt's; for other shapes the processor squashes the whole "
    "image, as igpt's --resize squash does. Images smaller than n_px are enlarged bicubically by igpt and "
    "with the box filter by the processor.")
SOS_NOTE = (
    "Hugging Face's processor does not prepend the start-of-sequence id, so transformers' "
    "model(input_ids) and pipeline() read the image without the shift igpt's AR models are trained with "
    "(pixel i sees pixels < i). igpt's exact reading is model(concat([[SOS]], ids[:, :-1])) with "
    "SOS = vocab_size - 1.")


# What the training stages write beside their checkpoints (igpt.train): OUT/run.json for pretraining,
# OUT/finetune.json for fine-tuning, each holding the --resize and the identity of the data. Read by name
# here, as plain JSON, so that the weights layer needs nothing from the stages above it.
_RUN_FILES = ("finetune.json", "run.json")


def run_facts(ckpt_dir: str | Path) -> dict[str, Any]:
    """``{"resize", "data_identity"}`` of the run that wrote ``ckpt_dir`` (``OUT/checkpoints/step-N`` or
    ``OUT/last``), as far as its run file records them; empty for a checkpoint outside a run."""
    ckpt_dir = Path(ckpt_dir)
    for run in (ckpt_dir.parent.parent, ckpt_dir.parent):
        for name in _RUN_FILES:
            path = run / name
            if path.is_file():
                try:
                    spec = json.loads(path.read_text())
                    resize = spec["resize"] if name == "finetune.json" else spec["data"]["resize"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path} does not say how its images were resized ({e})") from None
                return {"resize": str(resize), "data_identity": spec.get("data_identity")}
    return {}


def model_card(record: CheckpointRecord, tokenizer: AnyTokenizer, *, library: str, title: str,
               hf_export: bool = False, facts: dict[str, Any] | None = None) -> str:
    """Markdown with Hub metadata: architecture, tokenizer, objective, training data (and, from ``facts``
    (``run_facts``), its identity and resize) and step."""
    facts = facts or {}
    m, ft = record.model, record.finetuned
    pipeline = "image-classification" if ft is not None else "unconditional-image-generation"
    n_params = m.num_params()
    side = tokenizer.pixel_side(m.n_px)
    grid = f"{m.n_px}x{m.n_px} pixels" if side == m.n_px else f"{m.n_px}x{m.n_px} codes of {side}x{side} images"
    rows = [("architecture", f"iGPT transformer: {m.n_layer} layers, width {m.n_embd}, {m.n_head} heads, "
                             f"{grid} ({m.n_ctx} positions), {n_params:,} parameters"),
            ("palette", f"{tokenizer.k} colours, fingerprint {tokenizer.fingerprint()}"
                        + (f" (vocabulary {tokenizer.k + 1} with the SOS id)" if hf_export else ""))
            if tokenizer.kind == "palette" else
            ("tokenizer", f"VQ-VAE, {tokenizer.k} codes, {side}x{side} images -> {m.n_px}x{m.n_px} codes, "
                          f"fingerprint {tokenizer.fingerprint()} (tokenizer.safetensors)"),
            ("objective", {"ar": "autoregressive next-pixel prediction (ar)",
                           "bert": "masked-pixel prediction (bert)"}[record.objective]),
            ("training data", (record.data or "not recorded in the checkpoint") + _identity(facts)),
            ("step", "not recorded" if record.step is None else f"{record.step:,}")]
    if facts.get("resize"):
        rows.append(("resize in training", f"--resize {facts['resize']}"))
    if record.source:
        rows.append(("converted from", f"{record.source.get('format')} {record.source.get('path', '')}".strip()))
    if ft is not None:
        names = ", ".join(ft.classes) if ft.classes else "unnamed (LABEL_0 ...)"
        acc = "" if ft.val_acc is None else f"; validation accuracy {ft.val_acc:.4f}"
        rows.append(("classifier", f"{ft.n_classes} classes: {names}{acc}; head on the mean over positions "
                                   "of the final norm's output, no bias"))
    lines = ["---", f"library_name: {library}", f"pipeline_tag: {pipeline}", "tags:", "- image-gpt", "- igpt",
             "---", "", f"# {title}", "",
             "Image GPT (Chen et al., \"Generative Pretraining from Pixels\", ICML 2020), written by igpt.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if hf_export:
        lines += ["## Preprocessing", "", PROCESSOR_NOTE, "", "## Reading", "", SOS_NOTE, ""]
    else:
        lines += ["## Loading", "", "```python", "import igpt", "model = igpt.GPT.from_pretrained(\"<this folder "
                  "or Hub id>\")  # model.tokenizer holds the tokenizer", "```", ""]
    return "\n".join(lines)


def _identity(facts: dict[str, Any]) -> str:
    ident = facts.get("data_identity")
    if not isinstance(ident, dict):
        return ""
    return " (" + ", ".join(f"{k} {v}" for k, v in sorted(ident.items())) + ")"
