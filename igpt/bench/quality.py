"""The CIFAR-10 quality protocol: pretrain for a wall-clock budget, probe every layer, beside random init.

One implementation for ``igpt bench quality`` (``pack`` and ``run``; ``igpt.cli.quality``) and the quality part
of ``igpt bench report --quality IDS``:

- ``pack``: fit the palette on the training images, quantize train and test with ``igpt prepare`` (10% of
  train carved out, seeded, for the validation loss) and write that ids cache, the palette and
  ``test_lossless.npy`` into one lzma-compressed tar (small enough for a GPU machine's upload limit);
- ``quality_run``: unpack it, time a step on a throwaway run, pretrain for as many steps as fit in the
  budget, extract the features of every layer for every training and test image, probe them (L-BFGS
  logistic regression, L2 chosen on a carve of train) and do the same for the same architecture at random
  initialisation. Accuracies are on the bit-exact test images (``test_lossless``: the other CIFAR-10 test
  images went through JPEG, which moves their palette ids) and on all of them, for the best layer by
  validation accuracy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
import json
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.atomic import write_json
from igpt.config import DataConfig, FeatureConfig, ModelConfig, ProbeConfig, QualityConfig, TrainConfig
from igpt.data.open import lossless_mask, open_labelled, open_split, prepare, resolve
from igpt.eval.features import cached_extract, checkpoint_identity
from igpt.eval.plots import layer_accuracy_plot, probe_curves
from igpt.eval.probe import probe_layers
from igpt.lock import remove_unheld
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.runtime import resolve_device
from igpt.train.pretrain import pretrain
from igpt.viz import save_png
from igpt.weights.convert import load

log = logging.getLogger(__name__)
CACHE = "cifar-ids"  # the directory inside the tar
CALIBRATION_STEPS = 40  # steps of the throwaway run that times a step; the first half is warm-up
NOT_PACKED = "not a file written by igpt bench quality pack"


# ---- pack


def build_cache(data: str, cache: Path, n_px: int, k: int, palette_file: str | None, device: str) -> Path:
    """palette fit (or load) -> ``igpt prepare`` ids cache with palette.npz and test_lossless.npy inside."""
    if palette_file:
        palette = Palette.load(palette_file)
    else:
        train = open_split(data, "train_all", n_px=n_px, val_fraction=0.0)
        log.info("fitting a %d-colour palette on %d training images", k, len(train))
        palette = Palette.fit(train.pixels, k=k, seed=0, device=resolve_device(device), progress=True)
    prepare(data, cache, n_px=n_px, tokenizer=palette, val_fraction=0.1, seed=0)
    palette.save(cache / "palette.npz")
    meta = json.loads((cache / "meta.json").read_text())
    n_test = meta["splits"]["test"]["n"]
    # torchvision's pickles are the original images, all bit-exact; an npz says which of its are
    exact = np.ones(n_test, bool) if resolve(data).kind == "cifar10" else lossless_mask(data, n_test)
    np.save(cache / "test_lossless.npy", exact)
    return cache


def pack(data: str, out: Path, *, n_px: int = 32, k: int = 512, palette_file: str | None = None,
         lzma_preset: int = 6, device: str = "auto") -> Path:
    """Write the ids cache of ``data`` as one .tar.xz at ``out`` (atomically: complete or absent; its folder
    is made if missing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cache = build_cache(data, Path(tmp) / CACHE, n_px, k, palette_file, device)
        part = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        log.info("compressing %s", out)
        with tarfile.open(part, "w:xz", preset=lzma_preset) as tar:
            tar.add(cache, arcname=CACHE)
        os.replace(part, out)
    return out


def _check_member(member: tarfile.TarInfo, path: str, flag: str) -> None:
    """Only plain files and folders below CACHE: anything else would be written outside the output."""
    if not (member.isfile() or member.isdir()) or not member.name.startswith(CACHE) or ".." in member.name:
        raise ValueError(f"{flag} {path}: unexpected member {member.name!r}; {NOT_PACKED}")


def check_packed(path: str, flag: str = "--ids") -> None:
    """A one-line error unless ``path`` opens as a pack file: its first member only, so it takes
    milliseconds (``unpack`` checks every member)."""
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path} does not exist; write it with: igpt bench quality pack")
    try:
        with tarfile.open(path, "r:xz") as tar:
            first = tar.next()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        raise ValueError(f"{flag} {path}: {NOT_PACKED} ({e})") from None
    if first is None:
        raise ValueError(f"{flag} {path}: an empty archive; {NOT_PACKED}")
    _check_member(first, path, flag)


def unpack(path: str, dest: Path, flag: str = "--ids") -> Path:
    """Extract a ``pack`` file into dest (once; a later run reuses it) and return the cache directory."""
    cache = dest / CACHE
    if (cache / "meta.json").is_file():
        return cache
    check_packed(path, flag)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest))
    try:
        with tarfile.open(path, "r:xz") as tar:
            for member in tar.getmembers():
                _check_member(member, path, flag)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            tar.extractall(tmp, **safe)
        os.replace(tmp / CACHE, cache)  # complete or absent: an interrupted unpack is redone
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise ValueError(f"{flag} {path}: {NOT_PACKED} ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


# ---- pretrain


def configs(cfg: QualityConfig, palette: Palette, n_px: int, steps: int) -> tuple[ModelConfig, TrainConfig]:
    overrides = {k: v for k, v in (("n_layer", cfg.n_layer), ("n_embd", cfg.n_embd), ("n_head", cfg.n_head))
                 if v is not None}
    model_cfg = ModelConfig.from_preset(cfg.preset, n_vocab=palette.k, n_px=n_px, **overrides)
    train_cfg = TrainConfig(objective="ar", batch_size=cfg.batch_size, max_steps=steps, lr=cfg.lr,
                            warmup_steps=cfg.warmup_steps, augment=cfg.augment, eval_every=max(1, steps // 5),
                            eval_batches=8, log_every=50, ckpt_every=steps, keep_last=1, seed=cfg.seed,
                            device=cfg.device, compile=cfg.compile)
    return model_cfg, train_cfg


def data_config(cache: Path) -> DataConfig:
    return DataConfig(data=str(cache), tokenizer=str(cache / "palette.npz"))


def calibrate(cfg: QualityConfig, cache: Path, palette: Palette, n_px: int, out: Path,
              seconds: float) -> tuple[int, float]:
    """(steps that fit in ``seconds``, seconds per step) from a throwaway run of CALIBRATION_STEPS steps."""
    model_cfg, train_cfg = configs(cfg, palette, n_px, CALIBRATION_STEPS)
    times: list[float] = []
    remove_unheld([out / "calibration"])  # a throwaway run, never one another process writes
    pretrain(model_cfg, dataclasses.replace(train_cfg, eval_every=0), data_config(cache), out / "calibration",
             progress=False, on_step=lambda step, m: times.append(time.perf_counter()))
    remove_unheld([out / "calibration"])
    # The first half is warm-up (compilation, autotuning); the last step also wrote the checkpoint.
    half = len(times) // 2
    per_step = (times[-2] - times[half]) / (len(times) - 2 - half)
    return max(1, int(seconds / per_step)), per_step


# ---- probe


def probe_model(model: GPT, palette: Palette, images: dict[str, Any], mask: np.ndarray, identity: dict[str, Any],
                cfg: QualityConfig, out: Path) -> dict[str, Any]:
    """Features of every layer (cached under out/feats), then the probe, scored on both test subsets."""
    feat_cfg = FeatureConfig(batch_size=cfg.eval_batch_size, device=cfg.device, flip_average=cfg.flip_average)
    show = log.isEnabledFor(logging.INFO)  # progress bars where the caller asked for INFO logging
    feats = {split: cached_extract(model, im, palette, feat_cfg, split=split, model_identity=identity,
                                   cache_dir=out / "feats", progress=show) for split, im in images.items()}
    probe_cfg = ProbeConfig(concat=cfg.concat, max_iter=cfg.max_iter, eval_subset="lossless")
    metrics = probe_layers(feats["train_all"], images["train_all"].labels, feats["test"], images["test"].labels,
                           probe_cfg, subsets={"lossless": mask, "all": None}, device=resolve_device(cfg.device),
                           progress=show)
    return {**metrics, "n_train": len(images["train_all"]), "n_test": len(mask), "n_lossless": int(mask.sum())}


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """The best layer (by validation accuracy) and its accuracy on the exact test images and on all."""
    best = m["layers"][m["best_layer"]]
    head = {"best_layer": m["best_layer"], "lossless": best["accs"]["lossless"], "all": best["accs"]["all"],
            "n_lossless": m["n_lossless"], "n_test": m["n_test"]}
    if m.get("concat"):
        head["concat"] = {"layers": m["concat"]["layers"], **m["concat"]["accs"]}
    return head


def machine_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def quality_run(ids: str, out: Path, cfg: QualityConfig, *, seconds: float | None = None, steps: int = 0,
                flag: str = "--ids", command: str = "") -> dict[str, Any]:
    """Unpack ``ids`` (a ``pack`` file; ``flag`` names it in errors) into out, then ``run_on_cache``."""
    t0 = time.perf_counter()
    cache = unpack(ids, out, flag)
    return run_on_cache(cache, out, cfg, seconds=seconds, steps=steps, command=command,
                        clock={"data": time.perf_counter() - t0})


def run_on_cache(cache: Path, out: Path, cfg: QualityConfig, *, seconds: float | None = None, steps: int = 0,
                 command: str = "", clock: dict[str, float] | None = None) -> dict[str, Any]:
    """Pretrain on the ids cache for ``steps`` or, after a calibration run, for as many as fit in ``seconds``
    of pretraining; probe the trained model and its random init; write out/results.json and out/probe.png and
    return the results ({"trained": headline, "random_init": headline, "probe_trained", ...})."""
    if not steps and seconds is None:
        raise ValueError("the quality run needs a pretraining budget (seconds) or a number of steps")
    clock = dict(clock or {})
    t0 = time.perf_counter() - sum(clock.values())
    palette = Palette.load(cache / "palette.npz")
    n_px = json.loads((cache / "meta.json").read_text())["n_px"]  # the resolution the ids were made at
    per_step = None
    if not steps:
        steps, per_step = calibrate(cfg, cache, palette, n_px, out, seconds)
    clock["calibration"] = time.perf_counter() - t0 - sum(clock.values())
    log.info("pretraining for %d steps%s", steps, f" ({per_step:.3f} s/step measured)" if per_step else "")
    model_cfg, train_cfg = configs(cfg, palette, n_px, steps)
    remove_unheld([out / "run"])
    result = pretrain(model_cfg, train_cfg, data_config(cache), out / "run", progress=log.isEnabledFor(logging.INFO))
    clock["pretrain"] = time.perf_counter() - t0 - sum(clock.values())

    # The trained model and then the same architecture at random init, on the same features pipeline.
    model, palette, record = load(result["checkpoint"])
    images = {split: open_labelled(str(cache), split, n_px=model.config.n_px, tokenizer=palette)
              for split in ("train_all", "test")}
    mask = np.load(cache / "test_lossless.npy")
    trained = probe_model(model, palette, images, mask, checkpoint_identity(Path(result["checkpoint"]), record),
                          cfg, out)
    clock["probe trained"] = time.perf_counter() - t0 - sum(clock.values())
    torch.manual_seed(cfg.seed)
    init = probe_model(GPT(model.config), palette, images, mask,
                       {"random_init": model.config.to_dict(), "seed": cfg.seed}, cfg, out)
    clock["probe init"] = time.perf_counter() - t0 - sum(clock.values())

    results = {"command": command, "machine": machine_name(resolve_device(cfg.device)), "torch": torch.__version__,
               "config": dataclasses.asdict(cfg), "model": model.config.to_dict(), "parameters": model.num_params(),
               "steps": steps, "seconds_per_step": per_step, "pretrain_budget_seconds": seconds,
               "pretrain": {k: v for k, v in result.items() if k != "checkpoint"},
               "trained": headline(trained), "random_init": headline(init), "seconds": clock,
               "probe_trained": trained, "probe_init": init}
    write_json(out / "results.json", results)
    curves = probe_curves({"probes": {"linear probe": trained, "linear probe, random init": init}}, "lossless")
    save_png(layer_accuracy_plot(curves, "CIFAR-10 linear probe, exact test images", chance=0.1), out / "probe.png")
    return results


def summary(results: dict[str, Any]) -> list[str]:
    """The lines the script prints under the per-layer table."""
    val = results["pretrain"].get("val", {})
    lines = [f"{results['machine']}; {results['parameters']:,} parameters, {results['steps']} steps"
             + (f", val loss {val['loss']:.4f} nats/token" if val else "")]
    for name, key in (("pretrained", "trained"), ("random init", "random_init")):
        h = results[key]
        line = (f"{name:>12}: layer {h['best_layer']}: {h['lossless']:.4f} on the {h['n_lossless']:,} exact test "
                f"images, {h['all']:.4f} on all {h['n_test']:,}")
        if "concat" in h:
            c = h["concat"]
            line += f"; layers {c['layers']} concatenated: {c['lossless']:.4f} / {c['all']:.4f}"
        lines.append(line)
    clock = results["seconds"]
    lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items())
                 + f"; total {sum(clock.values()):.0f}")
    return lines


# The script's split: 5.5 of its 10 minutes pretrain; unpacking, timing a step, extracting the features of
# every layer for 60,000 images and probing them, twice (trained and random init), take the rest.
QUALITY_PRETRAIN_SHARE = 0.55


@dataclass(frozen=True)
class QualityPart:
    """The quality part: the ids file, where it works, its settings and its pretraining budget (set from the
    cap when the part starts)."""

    ids: str
    out: str
    settings: QualityConfig
    pretrain_seconds: float = 0.0
    max_pretrain_seconds: float | None = None

    def with_cap(self, cap: float) -> QualityPart:
        seconds = QUALITY_PRETRAIN_SHARE * max(cap, 0.0)
        return replace(self, pretrain_seconds=min(seconds, self.max_pretrain_seconds or seconds))


def bench_quality(part: QualityPart, show: bool = False) -> dict[str, Any]:
    """The quality protocol on ``part.ids`` within its pretraining budget (``show`` is unused: the report
    prints)."""
    return quality_run(part.ids, Path(part.out), part.settings, seconds=part.pretrain_seconds, flag="--quality")
