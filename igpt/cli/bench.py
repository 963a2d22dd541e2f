"""``igpt bench <what>``: speed measurements. ``bench sample`` times sampling (``igpt.bench.sample``), ``bench
train`` training steps (``igpt.bench.train``), ``bench loader`` the input pipeline alone
(``igpt.bench.loader``); ``bench memory`` prints the per-GPU memory plan (``igpt.bench.memory``).

    igpt bench sample --preset igpt-s --batch 256 --compare-hf   # prints our images/s and HF's
    igpt bench train --preset igpt-s --batch 32 --compare-hf     # tokens/s, MFU, peak memory: ours and HF's
    igpt bench loader --data cache/cifar10 --palette p.npz       # images/s of the input pipeline
    igpt bench memory --preset igpt-xl --batch 4 --processes 8 --fsdp --grad-checkpoint
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from igpt.config import PRESETS


def cmd_bench_sample(args: argparse.Namespace) -> None:
    from igpt.bench.sample import bench_sample

    result = bench_sample(args.preset, args.batch, n_px=args.n_px, n_vocab=args.n_vocab, device=args.device,
                          dtype=args.dtype, batches=args.batches, warmup=args.warmup, window=args.window,
                          cuda_graph=args.cuda_graph, compile=args.compile, top_k=args.top_k or None,
                          compare_hf=args.compare_hf,
                          hf_batches=args.hf_batches, seed=args.seed)
    _write_json(result, args.json)


def _sample_parser(bsub: Any) -> None:
    p = bsub.add_parser("sample", help="images per second of the KV-cached sampler (and of HF's generate)")
    p.add_argument("--preset", default="igpt-s", choices=sorted(PRESETS), help="model shape (default: igpt-s)")
    p.add_argument("--batch", type=int, default=256, help="images sampled at once (default: 256)")
    p.add_argument("--n-px", type=int, default=None, help="image side (default: the preset's)")
    p.add_argument("--n-vocab", type=int, default=512, help="palette size (default: 512)")
    p.add_argument("--batches", type=int, default=2, help="timed batches of our sampler (default: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches before timing (default: 1)")
    p.add_argument("--window", type=int, default=64,
                   help="cache slots attended per step come in multiples of this (default: 64)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the one-token step as CUDA graphs (default: on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token step (the first batch then includes compiling)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filter for both samplers; 0 = off (default: 0)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ... (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="weights and cache: auto = bf16 on GPUs that have it, else fp32 (default: auto)")
    p.add_argument("--compare-hf", action="store_true",
                   help="also time Hugging Face's ImageGPT generate (needs transformers)")
    p.add_argument("--hf-batches", type=int, default=1, help="timed batches of HF's generate (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and draws (default: 0)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_bench_sample)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from igpt.bench.train import bench_train

    result = bench_train(args.preset, args.batch, n_px=args.n_px, n_vocab=args.n_vocab, objective=args.objective,
                         compile=args.compile, dtype=args.dtype, grad_checkpoint=args.grad_checkpoint,
                         steps=args.steps, warmup=args.warmup, device=args.device, compare_hf=args.compare_hf,
                         max_batch=args.max_batch, seed=args.seed)
    _write_json(result, args.json)


def _train_parser(bsub: Any) -> None:
    p = bsub.add_parser("train", help="tokens/s, MFU and peak memory of training steps (and of HF's ImageGPT)")
    p.add_argument("--preset", default="igpt-s", choices=sorted(PRESETS), help="model shape (default: igpt-s)")
    p.add_argument("--batch", type=int, default=32,
                   help="images per step; with --max-batch, where the search starts (default: 32)")
    p.add_argument("--n-px", type=int, default=None, help="image side (default: the preset's)")
    p.add_argument("--n-vocab", type=int, default=512, help="palette size (default: 512)")
    p.add_argument("--objective", default="ar", choices=("ar", "bert"),
                   help="'ar' (next pixel, causal) or 'bert' (masked pixels, bidirectional) (default: ar)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our model; compiling happens in the warm-up steps (default: as igpt "
                        "pretrain does: on CUDA GPUs with triton, off on CPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast dtype: auto = bf16 on GPUs that have it, else fp32 (default: auto)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block in the backward pass (activation checkpointing), for both models")
    p.add_argument("--steps", type=int, default=20, help="timed training steps (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default: 3)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', ... (default: auto)")
    p.add_argument("--compare-hf", action="store_true",
                   help="also train Hugging Face's ImageGPT the same way (AR only; needs transformers)")
    p.add_argument("--max-batch", action="store_true",
                   help="CUDA only: find the largest batch that fits (double until out of memory, then bisect) "
                        "and measure there")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, ids and masks (default: 0)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_bench_train)


def _write_json(result: dict[str, Any], path: str | None) -> None:
    from igpt.weights.checkpoint import write_json_atomic

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), result)
        print(f"-> {path}")


def cmd_bench_loader(args: argparse.Namespace) -> None:
    from igpt.bench.loader import bench_loader

    result = bench_loader(args.data, n_px=args.n_px, batch=args.batch, augment=args.augment, workers=args.workers,
                          batches=args.batches, warmup=args.warmup, device=args.device, palette=args.palette,
                          palette_k=args.palette_k, seed=args.seed)
    _write_json(result, args.json)


def _loader_parser(bsub: Any) -> None:
    p = bsub.add_parser("loader", help="images/s of the training input pipeline alone (read, decode, augment, "
                                       "quantize)")
    p.add_argument("--data", required=True, help="any --data igpt pretrain accepts")
    p.add_argument("--n-px", type=int, default=32, help="image side (default: 32)")
    p.add_argument("--batch", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--augment", default="none", choices=("none", "cifar", "imagenet"),
                   help="as igpt pretrain --augment (default: none)")
    p.add_argument("--workers", type=int, default=0,
                   help="decoding worker processes, as igpt pretrain --workers (default: 0)")
    p.add_argument("--batches", type=int, default=20, help="timed batches (default: 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (default: 2)")
    p.add_argument("--device", default="auto", help="where ids are quantized: 'auto', 'cpu', 'cuda' (default: auto)")
    p.add_argument("--palette", default=None,
                   help="palette file (required for ids data; default: fit a quick one on 500 training images)")
    p.add_argument("--palette-k", type=int, default=512, help="colours of the quick palette (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order and augmentation (default: 0)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_bench_loader)


def cmd_bench_memory(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from igpt.config import ModelConfig
    from igpt.bench.memory import format_plan, max_batch, plan

    config = ModelConfig.from_preset(args.preset, **({"n_px": args.n_px} if args.n_px else {}))
    kw = {"processes": args.processes, "fsdp": args.fsdp, "bf16": args.dtype == "bf16",
          "grad_checkpoint": args.grad_checkpoint, "compiled": args.compiled}
    p = plan(config, args.batch, **kw)
    largest = max_batch(config, args.gpu_gb * 1e9, **kw)
    print(format_plan(config, args.batch, p))
    fits = largest or "none (the state alone is too big)"
    print(f"largest micro-batch per GPU within 90% of {args.gpu_gb:g} GB: {fits}")
    setup = {"preset": args.preset, "n_px": config.n_px, "batch": args.batch, "gpu_gb": args.gpu_gb, **kw}
    _write_json({"setup": setup, "plan": {**asdict(p), "total": p.total}, "max_batch": largest}, args.json)


def _memory_parser(bsub: Any) -> None:
    p = bsub.add_parser("memory", help="estimated memory per GPU of a pretraining step (docs/scaling.md)")
    p.add_argument("--preset", default="igpt-s", choices=sorted(PRESETS), help="model shape (default: igpt-s)")
    p.add_argument("--n-px", type=int, default=None, help="image side (default: the preset's)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per GPU (default: 32)")
    p.add_argument("--processes", type=int, default=1, help="GPUs sharing the job (default: 1)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and Adam state (FSDP)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compiled", action="store_true", help="torch.compile's smaller MLP activations (estimate)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype (default: bf16)")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU, for the largest batch (default: 80)")
    p.add_argument("--json", default=None, help="also write the plan to this JSON file")
    p.set_defaults(func=cmd_bench_memory)


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="speed benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True, help="what to time")
    _sample_parser(bsub)
    _train_parser(bsub)
    _loader_parser(bsub)
    _memory_parser(bsub)
