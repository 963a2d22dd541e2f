"""``igpt bench <what>``: speed measurements and the quality protocol. ``bench sample`` times sampling,
``bench train`` training steps, ``bench loader`` the input pipeline alone; ``bench memory`` prints the per-GPU
memory plan; ``bench report`` runs the first three in one time budget and writes every headline figure to
one JSON and one markdown file; ``bench quality`` is the CIFAR-10 quality protocol (``igpt.cli.quality``).

    igpt bench sample --preset igpt-s --batch-size 256 --compare-hf   # our images/s and HF's
    igpt bench train --preset igpt-s --batch-size 32 --compare-hf     # tokens/s, MFU, peak memory: ours and HF's
    igpt bench loader --data cache/cifar10 --tokenizer p.npz          # images/s of the input pipeline
    igpt bench memory --preset igpt-xl --batch-size 4 --processes 8 --fsdp --grad-checkpoint
    igpt bench report --out reports/h100                              # all of the above in one budget (8 min)
    igpt bench quality run --ids cifar10-ids.tar.xz --out runs/quality   # pretrain, probe every layer
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from igpt.atomic import check_output, write_json
from igpt.bench.loader import bench_loader
from igpt.bench.memory import format_plan, max_batch, plan
from igpt.bench.report import bench_report
from igpt.bench.sample import bench_sample
from igpt.bench.train import bench_train
from igpt.cli.args import build
from igpt.config import (BenchLoaderConfig, BenchMemoryConfig, BenchReportConfig, BenchSampleConfig, BenchTrainConfig,
                          ModelConfig)


def _json_out(args: argparse.Namespace) -> Path | None:
    """``--json``, checked before anything is measured: a file that does not exist yet, or ``--overwrite``."""
    return None if args.json is None else check_output(args.json, "--json", overwrite=args.overwrite, is_dir=False)


def _write_json(result: dict[str, Any], path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
        print(f"-> {path}")


def cmd_bench_sample(args: argparse.Namespace) -> None:
    cfg, out = build(BenchSampleConfig, args), _json_out(args)
    _write_json(bench_sample(cfg), out)


def cmd_bench_train(args: argparse.Namespace) -> None:
    cfg, out = build(BenchTrainConfig, args), _json_out(args)
    _write_json(bench_train(cfg), out)


def cmd_bench_loader(args: argparse.Namespace) -> None:
    cfg, out = build(BenchLoaderConfig, args), _json_out(args)
    _write_json(bench_loader(cfg), out)


def cmd_bench_memory(args: argparse.Namespace) -> None:
    cfg, out = build(BenchMemoryConfig, args), _json_out(args)
    config = ModelConfig.from_preset(cfg.preset, **({"n_px": cfg.n_px} if cfg.n_px else {}))
    kw = {"processes": cfg.processes, "fsdp": cfg.fsdp, "bf16": cfg.dtype == "bf16",
          "grad_checkpoint": cfg.grad_checkpoint, "compiled": cfg.compiled}
    p = plan(config, cfg.batch_size, **kw)
    largest = max_batch(config, cfg.gpu_gb * 1e9, **kw)
    print(format_plan(config, cfg.batch_size, p))
    fits = largest or "none (the state alone is too big)"
    print(f"largest micro-batch per GPU within 90% of {cfg.gpu_gb:g} GB: {fits}")
    setup = {**asdict(cfg), "n_px": config.n_px}
    _write_json({"setup": setup, "plan": {**asdict(p), "total": p.total}, "max_batch": largest}, out)


def cmd_bench_report(args: argparse.Namespace) -> None:
    bench_report(build(BenchReportConfig, args), command=shlex.join(["igpt", *args.argv]), overwrite=args.overwrite)
