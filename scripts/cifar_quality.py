"""The CIFAR-10 quality protocol: pretrain on the CIFAR-10 train set, probe every layer.

Two steps, so that what a GPU machine receives stays small (its uploads are limited to 64 MiB):

1. ``pack`` (CPU, once): fit the 512-colour palette on the 50,000 training images, quantize train and
   test with ``igpt prepare`` (10% of train carved out, seeded, for the validation loss) and write that
   ids cache, the palette and ``test_lossless.npy`` into one lzma-compressed tar (38 MiB; about 6 minutes on
   one busy CPU core)::

       OMP_NUM_THREADS=1 python scripts/cifar_quality.py pack --data ../shared/data/cifar10.npz \\
           --out cifar10-ids.tar.xz

2. ``run`` (one GPU, everything included, about 10 minutes): unpack, pretrain a fixed configuration for
   a wall-clock budget (``--minutes``; a short calibration run measures the step time first) or for
   ``--steps``, extract features of every layer for all 50,000 training and 10,000 test images, probe
   them (L-BFGS logistic regression, L2 chosen on a carve of train) and do the same for the same
   architecture at random initialisation::

       python scripts/cifar_quality.py run --ids cifar10-ids.tar.xz --out runs/quality

   It reports the accuracy on the 1,000 bit-exact test images (``test_lossless``) and on all 10,000 (the
   other 9,000 went through JPEG, which moves their palette ids), for the best layer (chosen by validation
   accuracy) and, with ``--concat K``, for the K layers around it concatenated; prints a table and writes
   ``OUT/results.json`` and ``OUT/probe.png`` (trained against random init).

``run --data ../shared/data/cifar10.npz`` instead of ``--ids`` does the packing steps in-process (the
palette is then fitted on the GPU). Scaled down for a CPU, e.g.: ``pack --data .../cifar10-small.npz
--n-px 16`` and ``run ... --preset igpt-demo --n-embd 64 --minutes 2 --compile off --batch-size 32 --device cpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import lzma
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.atomic import write_json
from igpt.config import PRESETS, SWITCH, DataConfig, FeatureConfig, ModelConfig, ProbeConfig, TrainConfig
from igpt.data.open import lossless_mask, open_labelled, open_split, prepare
from igpt.eval.features import cached_extract, checkpoint_identity
from igpt.eval.probe import format_table, probe_layers
from igpt.model import GPT
from igpt.palette import Palette
from igpt.runtime import resolve_device
from igpt.train.pretrain import pretrain
from igpt.viz import layer_plot, save_png
from igpt.weights.convert import load

log = logging.getLogger("cifar_quality")
CACHE = "cifar-ids"  # the directory inside the tar
CALIBRATION_STEPS = 40  # steps of the throwaway run that times a step; the first half is warm-up


# ---------------------------------------------------------------------------------------------- pack


def build_cache(data: str, cache: Path, n_px: int, k: int, palette_file: str | None, device: str) -> Path:
    """palette fit (or load) -> ``igpt prepare`` ids cache with palette.npz and test_lossless.npy inside."""
    if palette_file:
        palette = Palette.load(palette_file)
    else:
        train = open_split(data, "train_all", n_px=n_px, val_fraction=0.0)
        log.info("fitting a %d-colour palette on %d training images", k, len(train))
        palette = Palette.fit(train.pixels, k=k, seed=0, device=resolve_device(device), progress=True)
    prepare(data, cache, n_px=n_px, palette=palette, val_fraction=0.1, seed=0)
    palette.save(cache / "palette.npz")
    meta = json.loads((cache / "meta.json").read_text())
    np.save(cache / "test_lossless.npy", lossless_mask(data, meta["splits"]["test"]["n"]))
    return cache


def cmd_pack(args: argparse.Namespace) -> None:
    out = Path(args.out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        cache = build_cache(args.data, Path(tmp) / CACHE, args.n_px, args.palette_k, args.palette, args.device)
        part = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        log.info("compressing %s", out)
        with tarfile.open(part, "w:xz", preset=args.preset) as tar:
            tar.add(cache, arcname=CACHE)
        os.replace(part, out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (palette, ids of train/val/test, test_lossless)")


def unpack(path: str, dest: Path) -> Path:
    """Extract a ``pack`` file into dest (once; a later run reuses it) and return the cache directory."""
    cache = dest / CACHE
    if (cache / "meta.json").is_file():
        return cache
    if not Path(path).is_file():
        raise FileNotFoundError(f"--ids {path} does not exist; write it with: cifar_quality.py pack")
    tmp = Path(tempfile.mkdtemp(dir=dest))
    try:
        with tarfile.open(path, "r:xz") as tar:
            for member in tar.getmembers():  # only plain files and folders below CACHE
                if not (member.isfile() or member.isdir()) or not member.name.startswith(CACHE) or ".." in member.name:
                    raise ValueError(f"--ids {path}: unexpected member {member.name!r}; not a file written by pack")
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            tar.extractall(tmp, **safe)
        os.replace(tmp / CACHE, cache)  # complete or absent: an interrupted unpack is redone
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise ValueError(f"--ids {path}: not a file written by cifar_quality.py pack ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


# ---------------------------------------------------------------------------------------------- pretrain


def _configs(args: argparse.Namespace, palette: Palette, steps: int) -> tuple[ModelConfig, TrainConfig]:
    overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_embd", args.n_embd), ("n_head", args.n_head),
                                   ("n_px", args.n_px)) if v is not None}
    model_cfg = ModelConfig.from_preset(args.preset, n_vocab=palette.k, **overrides)
    train_cfg = TrainConfig(objective="ar", batch_size=args.batch_size, max_steps=steps, lr=args.lr,
                            warmup_steps=args.warmup_steps, augment=args.augment, eval_every=max(1, steps // 5),
                            eval_batches=8, log_every=50, ckpt_every=steps, keep_last=1, seed=args.seed,
                            device=args.device, compile=args.compile)
    return model_cfg, train_cfg


def calibrate(args: argparse.Namespace, cache: Path, palette: Palette, out: Path) -> tuple[int, float]:
    """(steps that fit in --minutes, seconds per step) from a throwaway run of CALIBRATION_STEPS steps."""
    model_cfg, cfg = _configs(args, palette, CALIBRATION_STEPS)
    times: list[float] = []
    shutil.rmtree(out / "calibration", ignore_errors=True)
    pretrain(model_cfg, dataclasses.replace(cfg, eval_every=0), _data_cfg(cache), out / "calibration",
             progress=False, on_step=lambda step, m: times.append(time.perf_counter()))
    shutil.rmtree(out / "calibration", ignore_errors=True)
    # The first half is warm-up (compilation, autotuning); the last step also wrote the checkpoint.
    half = len(times) // 2
    per_step = (times[-2] - times[half]) / (len(times) - 2 - half)
    return max(1, int(args.minutes * 60 / per_step)), per_step


def _data_cfg(cache: Path) -> DataConfig:
    return DataConfig(data=str(cache), palette=str(cache / "palette.npz"))


# ---------------------------------------------------------------------------------------------- probe


def probe_model(model: GPT, palette: Palette, images: dict[str, Any], mask: np.ndarray, identity: dict[str, Any],
                args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Features of every layer (cached under out/feats), then the probe, scored on both test subsets."""
    feat_cfg = FeatureConfig(batch_size=args.eval_batch_size, device=args.device, flip_average=args.flip_average)
    feats = {split: cached_extract(model, im, palette, feat_cfg, split=split, model_identity=identity,
                                   cache_dir=out / "feats") for split, im in images.items()}
    cfg = ProbeConfig(concat=args.concat, max_iter=args.max_iter, eval_subset="lossless")
    metrics = probe_layers(feats["train_all"], images["train_all"].labels, feats["test"], images["test"].labels,
                           cfg, subsets={"lossless": mask, "all": None}, device=resolve_device(args.device),
                           progress=True)
    return {**metrics, "n_train": len(images["train_all"]), "n_test": len(mask), "n_lossless": int(mask.sum())}


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    best = m["layers"][m["best_layer"]]
    head = {"best_layer": m["best_layer"], "lossless": best["accs"]["lossless"], "all": best["accs"]["all"]}
    if m.get("concat"):
        head["concat"] = {"layers": m["concat"]["layers"], **m["concat"]["accs"]}
    return head


def cmd_run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock, t0 = {}, time.perf_counter()
    cache = unpack(args.ids, out) if args.ids else (out / CACHE if (out / CACHE / "meta.json").is_file() else
                                                    build_cache(args.data, out / CACHE, args.n_px or 32, 512, None,
                                                                args.device))
    palette = Palette.load(cache / "palette.npz")
    args.n_px = json.loads((cache / "meta.json").read_text())["n_px"]  # the resolution the ids were made at
    clock["data"] = time.perf_counter() - t0

    steps, per_step = (args.steps, None) if args.steps else calibrate(args, cache, palette, out)
    clock["calibration"] = time.perf_counter() - t0 - sum(clock.values())
    log.info("pretraining for %d steps%s", steps, f" ({per_step:.3f} s/step measured)" if per_step else "")
    model_cfg, train_cfg = _configs(args, palette, steps)
    shutil.rmtree(out / "run", ignore_errors=True)
    result = pretrain(model_cfg, train_cfg, _data_cfg(cache), out / "run")
    clock["pretrain"] = time.perf_counter() - t0 - sum(clock.values())

    model, palette, record = load(result["checkpoint"])
    images = {split: open_labelled(str(cache), split, n_px=model.config.n_px, palette=palette)
              for split in ("train_all", "test")}
    mask = np.load(cache / "test_lossless.npy")
    trained = probe_model(model, palette, images, mask, checkpoint_identity(Path(result["checkpoint"]), record),
                          args, out)
    clock["probe trained"] = time.perf_counter() - t0 - sum(clock.values())
    torch.manual_seed(args.seed)
    init = probe_model(GPT(model.config), palette, images, mask,
                       {"random_init": model.config.to_dict(), "seed": args.seed}, args, out)
    clock["probe init"] = time.perf_counter() - t0 - sum(clock.values())
    report(args, out, model, result, steps, per_step, trained, init, clock)


def report(args: argparse.Namespace, out: Path, model: GPT, result: dict[str, Any], steps: int,
           per_step: float | None, trained: dict[str, Any], init: dict[str, Any], clock: dict[str, float]) -> None:
    device = resolve_device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    results = {"command": " ".join(sys.argv), "machine": machine, "torch": torch.__version__,
               "model": model.config.to_dict(), "parameters": model.num_params(), "steps": steps,
               "seconds_per_step": per_step, "pretrain": {k: v for k, v in result.items() if k != "checkpoint"},
               "trained": _headline(trained), "random_init": _headline(init), "seconds": clock,
               "probe_trained": trained, "probe_init": init}
    write_json(out / "results.json", results)
    accs = {layer: r["accs"]["lossless"] for layer, r in trained["layers"].items()}
    base = {layer: r["accs"]["lossless"] for layer, r in init["layers"].items()}
    save_png(layer_plot(accs, "CIFAR-10 probe, 1,000 exact test images (blue: pretrained, grey: init)", base),
             out / "probe.png")
    print(format_table(trained, baseline=init))
    val = result.get("val", {})
    print(f"\n{machine}; {model.num_params():,} parameters, {steps} steps"
          + (f", val loss {val['loss']:.4f} nats/token" if val else ""))
    for name, m in (("pretrained", trained), ("random init", init)):
        h = _headline(m)
        line = (f"{name:>12}: layer {h['best_layer']}: {h['lossless']:.4f} on the {m['n_lossless']:,} exact test "
                f"images, {h['all']:.4f} on all {m['n_test']:,}")
        if "concat" in h:
            line += f"; layers {h['concat']['layers']} concatenated: {h['concat']['lossless']:.4f} / {h['concat']['all']:.4f}"
        print(line)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in clock.items()) + f"; total {sum(clock.values()):.0f}")
    print(f"outputs: {out}/results.json, {out}/probe.png")


# ---------------------------------------------------------------------------------------------- CLI


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, help="step of the protocol")
    pack = sub.add_parser("pack", help="palette fit + quantize on CPU -> one compact .tar.xz")
    pack.add_argument("--data", required=True, help="an npz with x_train/y_train/x_test/y_test/test_lossless")
    pack.add_argument("--out", required=True, help="the .tar.xz to write")
    pack.add_argument("--n-px", type=int, default=32, help="image side (default: 32)")
    pack.add_argument("--palette-k", type=int, default=512, help="palette colours (default: 512)")
    pack.add_argument("--palette", default=None, help="use this palette file instead of fitting one")
    pack.add_argument("--preset", type=int, default=6, help="lzma preset 0-9 (default: 6)")
    pack.add_argument("--device", default="auto", help="where the palette is fitted (default: auto)")
    pack.set_defaults(func=cmd_pack)

    run = sub.add_parser("run", help="pretrain, probe every layer, compare with random init")
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="a file written by pack")
    src.add_argument("--data", help="the npz itself: fit the palette and quantize here first")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--minutes", type=float, default=5.5, help="pretraining wall-clock budget (default: 5.5)")
    run.add_argument("--steps", type=int, default=0, help="pretrain this many steps instead of --minutes")
    run.add_argument("--preset", default="igpt-bench", choices=sorted(PRESETS), help="model shape (default: igpt-bench)")
    for name in ("n_layer", "n_embd", "n_head"):
        run.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset's {name}")
    run.add_argument("--n-px", type=int, default=None, help="with --data: quantize at this side (default: 32); "
                     "with --ids the packed side is used")
    run.add_argument("--batch-size", type=int, default=64, help="pretraining batch (default: 64)")
    run.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    run.add_argument("--warmup-steps", type=int, default=-1, help="-1: one epoch, capped at 10%% (default)")
    run.add_argument("--augment", default="none", choices=("none", "cifar"), help="pretraining augmentation")
    run.add_argument("--compile", default="on", choices=SWITCH,
                     help="torch.compile the model for pretraining, as pretrain --compile (default: on)")
    run.add_argument("--concat", type=int, default=3, help="also probe this many layers around the best (default: 3)")
    run.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=False,
                     help="average each image's features with its mirror image's (default: off)")
    run.add_argument("--max-iter", type=int, default=300, help="L-BFGS iterations per fit (default: 300)")
    run.add_argument("--eval-batch-size", type=int, default=500, help="images per feature pass (default: 500)")
    run.add_argument("--seed", type=int, default=0, help="seed of pretraining and of the random init (default: 0)")
    run.add_argument("--device", default="auto", help="'auto', 'cuda', 'cpu' (default: auto)")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"cifar_quality {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
