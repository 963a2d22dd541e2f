"""From a checkpoint to image files: unconditional samples (``igpt sample``) and the paper's half-image
completions (``igpt complete``). Both return plain dicts describing what they wrote.

A checkpoint is read as its record says (``igpt.record``): an AR model completes by sampling the missing
rows left to right; a BERT model, which cannot sample left to right, fills them by iterative infilling
(``igpt.generate.infill``), and refuses ``sample_images`` with a clear message.

Every output directory also holds ``provenance.json``: the checkpoint read (as given and the directory it
resolved to), its step and objective, and the draw settings (temperature, top-k, top-p, seed, batch size,
device, dtype) that reproduce the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from igpt.atomic import check_output, replacing_dir, write_json
from igpt.config import EvalDataConfig, SampleConfig
from igpt.data.images import load_image
from igpt.data.open import open_eval
from igpt.data.streams import to_ids
from igpt.generate.infill import infill
from igpt.generate.sample import check_can_sample, make_generator, sample
from igpt.record import CheckpointRecord
from igpt.runtime import compile_enabled, resolve_device, resolve_dtype
from igpt.viz import check_picture, completion_figure, enlarge, grid, hide_rows, save_png, table_size
from igpt.weights.convert import load_located


# What each command writes into its --out, provenance.json first (every output holds it): --overwrite replaces
# a directory holding these names only, so it never deletes a run, a lock or a user's files (check_output).
SAMPLE_FILES = ("provenance.json", "sample-*.png", "grid.png")
COMPLETE_FILES = ("provenance.json", "complete-*.png", "completions.png")


def _check_out(out: str | Path, overwrite: bool, writes: tuple[str, ...], by: str) -> Path:
    """``--out``, before any work and again just before the new directory replaces it: never one another
    process holds the lock of (it is named), and with ``overwrite`` only an earlier output of ``by``."""
    return check_output(out, "--out", overwrite=overwrite, writes=writes, by=by)


def _require_at_least(values: dict[str, int], low: int) -> None:
    """The command's own counts (``{"--scale": 4}``), checked before the checkpoint is read."""
    for name, value in values.items():
        if not value >= low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def _sample_kw(cfg: SampleConfig, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``sample`` from the flags."""
    return {"generator": make_generator(cfg.seed, device), "dtype": resolve_dtype(cfg.dtype, device),
            "batch_size": cfg.batch_size, "window": cfg.window, "compile": compile_enabled(cfg.compile, device),
            "cuda_graph": cfg.cuda_graph and device.type == "cuda", **cfg.filters()}


def provenance(checkpoint: str | Path, located: Path, record: CheckpointRecord, cfg: SampleConfig,
               device: torch.device, **extra: Any) -> dict[str, Any]:
    """What ``provenance.json`` holds: enough to know where the files came from and to draw them again."""
    return {"checkpoint": str(checkpoint), "checkpoint_dir": str(located), "step": record.step,
            "objective": record.objective, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
            "seed": cfg.seed, "batch_size": cfg.batch_size, "device": str(device),
            "dtype": str(resolve_dtype(cfg.dtype, device)).removeprefix("torch."), **extra}


def _settings(cfg: SampleConfig, step: int | None) -> str:
    """The figure title's summary of the draw: step, temperature and the filters in use."""
    parts = [f"step {step}"] if step is not None else []
    parts.append(f"temperature {cfg.temperature:g}")
    parts += [f"top-k {cfg.top_k}"] * bool(cfg.top_k) + [f"top-p {cfg.top_p:g}"] * (cfg.top_p < 1.0)
    return " · ".join(parts + [f"seed {cfg.seed}"])


def sample_images(checkpoint: str | Path, out: str | Path, *, n_images: int = 64, cfg: SampleConfig = SampleConfig(),
                  ncol: int = 8, scale: int = 4, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """``n_images`` unconditional samples as ``sample-NNNN.png`` (each enlarged ``scale`` times, nearest
    neighbour), ``grid.png`` (``ncol`` to a row, titled with the draw settings) and ``provenance.json`` in the
    new directory ``out`` (with ``overwrite``, it replaces an earlier ``sample`` output whole, and nothing else)."""
    _require_at_least({"--n-images": n_images, "--ncol": ncol, "--scale": scale}, 1)
    _check_out(out, overwrite, SAMPLE_FILES, "igpt sample")
    device = resolve_device(cfg.device)
    located, (model, tokenizer, record) = load_located(checkpoint, device)
    check_can_sample(model)  # before any work: a BERT checkpoint is refused with a message
    n_px = model.config.n_px
    side = tokenizer.pixel_side(n_px)
    title = f"{n_images} samples · {_settings(cfg, record.step)}"
    _check_sample_size(n_images, ncol, scale, side, title)  # before sampling, not after
    ids = sample(model, n_images, progress=progress, **_sample_kw(cfg, device))
    pixels = tokenizer.decode_images(ids.cpu()).numpy()  # (n, side, side, 3) uint8, side = the tokenizer's image side
    out = Path(out)
    with replacing_dir(out) as tmp:
        for i, img in enumerate(enlarge(pixels, scale)):
            save_png(Image.fromarray(img), tmp / f"sample-{i:04d}.png")
        save_png(grid(pixels, ncol=ncol, scale=scale, title=title), tmp / "grid.png")
        write_json(tmp / "provenance.json", provenance(checkpoint, located, record, cfg, device, n_images=n_images,
                                                       scale=scale))
        _check_out(out, overwrite, SAMPLE_FILES, "igpt sample")  # nothing else came into it meanwhile
    return {"checkpoint": str(checkpoint), "step": record.step, "n_images": n_images, "n_px": n_px,
            "image_side": pixels.shape[1],
            "out": str(out), "files": [f"sample-{i:04d}.png" for i in range(n_images)] + ["grid.png",
                                                                                         "provenance.json"]}


def _check_sample_size(n_images: int, ncol: int, scale: int, side: int, title: str) -> None:
    """Each sample-NNNN.png and grid.png fit ``igpt.viz.check_picture``'s limits; the grid's limit also bounds
    the memory of the images it tiles."""
    check_picture((side * scale, side * scale), "each sample-NNNN.png", f"--scale {scale}")
    cols = min(ncol, n_images)
    size = table_size(-(-n_images // cols), cols, (side, side), scale=scale, pad=1, title=title)  # as grid() lays it
    check_picture(size, "grid.png", f"--n-images {n_images} --ncol {ncol} --scale {scale}")


def kept_rows(n_px: int, keep: float = 0.5, rows: int | None = None) -> int:
    """Rows kept from the top: ``rows``, or ``keep`` of them rounded to whole rows."""
    if rows is not None:
        if not 0 <= rows <= n_px:
            raise ValueError(f"--rows must be in 0..{n_px} (the model's n_px), got {rows}")
        return rows
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"--keep must be a fraction in [0, 1], got {keep}")
    return min(n_px, max(0, round(keep * n_px)))


def _inputs(images: list[str] | None, data: EvalDataConfig, n_images: int, offset: int, tokenizer, n_px: int
            ) -> tuple[list[str], torch.Tensor, str]:
    """(names, ids (M, T) int64 on the CPU, where from) of the images to complete."""
    side = tokenizer.pixel_side(n_px)  # the image side the tokenizer reads
    if images:
        pixels = np.stack([load_image(p, side, data.resize) for p in images])  # (M, side, side, 3)
        names = [f"{i:03d}-{Path(p).stem}" for i, p in enumerate(images)]
        return names, tokenizer.encode(pixels).reshape(len(pixels), -1), f"{len(pixels)} image file(s)"
    found, split = open_eval(data.data, data.split, n_px=side, tokenizer=tokenizer, val_fraction=data.val_fraction,
                             seed=data.split_seed, resize=data.resize, any_palette=data.any_palette)
    if n_images < 1 or not 0 <= offset < len(found):
        raise ValueError(f"--offset {offset} / --n-images {n_images}: the {split} split of {data.data} has "
                         f"{len(found)} images")
    index = np.arange(offset, min(len(found), offset + n_images))
    names = [f"{split}-{i:05d}" for i in index]
    return names, to_ids(found, index, tokenizer, torch.device("cpu")), f"{data.data} ({split} split)"


def _check_figure_size(M: int, N: int, side: int, scale: int, title: str, inputs: str) -> None:
    """completions.png (the largest figure: ``M`` rows of original, kept rows and ``N`` completions) fits
    ``igpt.viz.check_picture``'s limits."""
    size = table_size(M, N + 2, (side, side), scale=scale, gaps=1, widest_header=f"completion {N}", title=title)
    check_picture(size, "completions.png", f"{inputs} --n-samples {N} --scale {scale}")


def complete(checkpoint: str | Path, out: str | Path, *, images: list[str] | None = None,
             data: EvalDataConfig = EvalDataConfig(), n_images: int = 8, offset: int = 0, keep: float = 0.5,
             rows: int | None = None, n_samples: int = 4, rounds: int = 8, schedule: str = "cosine",
             cfg: SampleConfig = SampleConfig(), scale: int = 4, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Keep the top rows of each input (image files, or ``n_images`` of a split of ``data.data``), complete
    the rest ``n_samples`` times, and write the paper's figure (quantized original, kept rows, completions)
    as ``completions.png`` plus one ``complete-NAME.png`` per input, in the new directory ``out`` (with
    ``overwrite``, it replaces an earlier ``complete`` output whole, and nothing else)."""
    if bool(images) == bool(data.data):
        raise ValueError("complete needs exactly one of --images FILE... and --data DATA")
    _check_out(out, overwrite, COMPLETE_FILES, "igpt complete")
    _require_at_least({"--n-samples": n_samples, "--rounds": rounds, "--scale": scale}, 1)
    _require_at_least({"--offset": offset}, 0)
    if data.data:
        _require_at_least({"--n-images": n_images}, 1)
    device = resolve_device(cfg.device)
    located, (model, tokenizer, record) = load_located(checkpoint, device)
    n_px, T = model.config.n_px, model.config.n_ctx
    kept = kept_rows(n_px, keep, rows)
    names, ids, where = _inputs(images, data, n_images, offset, tokenizer, n_px)
    M, N = len(ids), n_samples
    title = f"kept {kept} of {n_px} rows · {_settings(cfg, record.step)}"
    inputs = f"--n-images {M}" if data.data else f"{M} --images"
    _check_figure_size(M, N, tokenizer.pixel_side(n_px), scale, title, inputs)  # before completing, not after
    known = ids.repeat_interleave(N, dim=0)  # (M * N, T): N copies of each input, adjacent
    reading = record.reading
    if reading.can_sample:
        result = sample(model, M * N, prefix=known[:, :kept * n_px], progress=progress, **_sample_kw(cfg, device))
        how = "sampled"
    else:
        keep_mask = torch.zeros(M * N, T, dtype=torch.bool)
        keep_mask[:, :kept * n_px] = True
        result = infill(model, known, keep_mask, rounds=rounds, schedule=schedule,
                        generator=make_generator(cfg.seed, device), dtype=resolve_dtype(cfg.dtype, device),
                        batch_size=cfg.batch_size, **cfg.filters())
        how = f"infilled by BERT in {rounds} rounds ({schedule})"
    originals = tokenizer.decode_images(ids).numpy()  # (M, side, side, 3)
    side = originals.shape[1]
    completions = tokenizer.decode_images(result.cpu()).numpy().reshape(M, N, side, side, 3)
    hidden = hide_rows(originals, kept * side // n_px)  # kept rows of ids -> rows of pixels
    dest = Path(out)
    with replacing_dir(dest) as tmp:
        for i, name in enumerate(names):
            save_png(completion_figure(originals[i:i + 1], hidden[i:i + 1], completions[i:i + 1], scale=scale,
                                       title=f"{name} · {title}").image, tmp / f"complete-{name}.png")
        save_png(completion_figure(originals, hidden, completions, scale=scale, title=title).image,
                 tmp / "completions.png")
        write_json(tmp / "provenance.json", provenance(
            checkpoint, located, record, cfg, device, how=how, inputs=where, names=names, rows_kept=kept,
            n_samples=N, scale=scale, **({"rounds": rounds, "schedule": schedule} if not reading.can_sample else {})))
        _check_out(dest, overwrite, COMPLETE_FILES, "igpt complete")  # nothing else came into it meanwhile
    return {"checkpoint": str(checkpoint), "objective": reading.objective, "how": how, "inputs": where,
            "names": names, "rows_kept": kept, "n_px": n_px, "n_samples": N, "out": str(dest),
            "ids": result.cpu(), "original_ids": ids}
