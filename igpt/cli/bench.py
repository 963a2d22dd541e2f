"""``igpt bench <what>``: speed measurements. ``bench sample`` times sampling (``igpt.bench``).

    igpt bench sample --preset igpt-s --batch 256 --compare-hf   # prints our images/s and HF's
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from igpt.config import PRESETS


def cmd_bench_sample(args: argparse.Namespace) -> None:
    from igpt.bench import bench_sample
    from igpt.checkpoint import write_json_atomic

    result = bench_sample(args.preset, args.batch, n_px=args.n_px, n_vocab=args.n_vocab, device=args.device,
                          dtype=args.dtype, batches=args.batches, warmup=args.warmup, window=args.window,
                          cuda_graph=args.cuda_graph, compile=args.compile, top_k=args.top_k or None,
                          compare_hf=args.compare_hf,
                          hf_batches=args.hf_batches, seed=args.seed)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
        print(f"-> {path}")


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
                   help="weights and cache: auto = bf16 on GPU, fp32 on CPU (default: auto)")
    p.add_argument("--compare-hf", action="store_true",
                   help="also time Hugging Face's ImageGPT generate (needs transformers)")
    p.add_argument("--hf-batches", type=int, default=1, help="timed batches of HF's generate (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and draws (default: 0)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_bench_sample)


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="speed benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True, help="what to time")
    _sample_parser(bsub)
