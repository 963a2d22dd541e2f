"""What each probe costs on one machine: feature extraction, the L-BFGS probe, the SGD probe and the
attentive probe, each run as its own `igpt probe` command, timed, with the command's peak host memory.
It prints a Markdown table for docs/evaluation.md and writes it, with the commands, to OUT/costs.json.

The model is an iGPT-S-shaped model (or ``--preset``) at random initialisation, at the side and palette of
the pack: costs depend on the shapes, not the weights. The data is a pack of ids from
`igpt bench quality pack` (38 MiB for the whole of CIFAR-10 at 32x32), so that it travels to a GPU host:

    igpt bench quality pack --data ../shared/data/cifar10.npz --out pack/cifar10-ids.tar.xz     # here, once
    python scripts/probe_costs.py --ids pack/cifar10-ids.tar.xz --out costs --device cuda      # on the GPU

A small run on a CPU (about two minutes), to try it:

    igpt bench quality pack --data ../shared/data/cifar10-small.npz --n-px 8 --vocab-size 16 --out small8.tar.xz
    python scripts/probe_costs.py --ids small8.tar.xz --out costs --device cpu --preset igpt-nano --batch-size 64

The four commands, in order (features are cached by the first and read by the others):
1. `igpt probe` on all layers: extraction, then L-BFGS with the default L2 search;
2. the same with `--overwrite`: L-BFGS alone, on the cached features;
3. `--solver sgd --l2 1e-4`: SGD at one strength (every rate of the grid), on every layer; a full search
   costs this times the strengths walked (up to 13);
4. `--attentive --attentive-epochs 1`: the attentive probe for one epoch on the linear probe's best
   layer; its own cost is this command's time less command 2's.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from igpt.atomic import read_json, write_json
from igpt.bench.quality import unpack
from igpt.config import ModelConfig
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.weights.checkpoint import save_checkpoint


def random_checkpoint(cache: Path, n_px: int, preset: str, out: Path, seed: int) -> Path:
    """A checkpoint of ``preset`` at random initialisation, at side ``n_px`` and with the cache's palette."""
    palette = Palette.load(cache / "palette.npz")
    config = ModelConfig.from_preset(preset, n_px=n_px, n_vocab=palette.k)
    torch.manual_seed(seed)
    return save_checkpoint(out, GPT(config), palette, CheckpointRecord(config, palette.fingerprint(), step=0))


def timed(argv: list[str]) -> dict[str, float | int | str]:
    """Run ``argv``; its wall time, exit status and peak resident memory (``wait4``'s ru_maxrss)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so Popen is told its status
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(argv), "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2), "rc": proc.returncode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ids", required=True, help="a pack file of `igpt bench quality pack`")
    ap.add_argument("--out", required=True, type=Path, help="working directory (cache, checkpoint, probes)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="igpt-s")
    ap.add_argument("--batch-size", type=int, default=256, help="images per feature pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-args", default="", help="more flags for every `igpt probe` command, one string "
                    "(e.g. '--feats-dtype fp32')")
    args = ap.parse_args(argv)
    if not Path(args.ids).is_file():
        ap.error(f"--ids {args.ids}: no such file")
    cache = unpack(args.ids, args.out / "ids")
    n_px = int(read_json(cache / "meta.json")["n_px"])
    ckpt = args.out / "model"
    if not (ckpt / "config.json").is_file():
        random_checkpoint(cache, n_px, args.preset, ckpt, args.seed)
    base = ["igpt", "-q", "probe", "--checkpoint", str(ckpt), "--data", str(cache), "--out", str(args.out / "probe"),
            "--layers", "all", "--device", args.device, "--batch-size", str(args.batch_size),
            *shlex.split(args.probe_args)]
    steps = [
        ("extraction + L-BFGS (L2 search), all layers", base + ["--overwrite"]),
        ("L-BFGS alone (L2 search), all layers, cached features", base + ["--overwrite"]),
        ("SGD at one L2 strength (every rate of the grid), all layers, cached features",
         base + ["--overwrite", "--solver", "sgd", "--l2", "1e-4"]),
        ("L-BFGS + attentive probe (1 epoch, best layer), cached features",
         base + ["--overwrite", "--attentive", "--attentive-epochs", "1"]),
    ]
    for store in (args.out / "probe").glob("feats-*"):  # a rerun: the first row times extraction again
        shutil.rmtree(store)
    rows = []
    for what, command in steps:
        rows.append({"what": what, **timed(command)})
        print(f"{what}: {rows[-1]['seconds']} s, peak RSS {rows[-1]['peak_rss_gib']} GiB, rc {rows[-1]['rc']}",
              flush=True)
        if rows[-1]["rc"] != 0:
            break
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    result = {"machine": machine, "preset": args.preset, "n_px": n_px, "ids": args.ids, "rows": rows}
    write_json(args.out / "costs.json", result)
    print(f"\n{args.preset} at n_px {n_px}, {machine}\n")
    print("| what | wall | peak host RSS |\n|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['seconds']} s | {r['peak_rss_gib']} GiB |")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
