"""Images per second of the training input pipeline alone: read, decode, augment, move, quantize.

    igpt bench loader --data shards/imagenet --augment imagenet --workers 8 --device cuda
    igpt bench loader --data cache/cifar10 --tokenizer p.npz --augment cifar --batch-size 128

The stream is the one ``igpt pretrain`` builds for the same flags (``igpt.data.open``), so the figure is
what a training step would wait for if the GPU took no time. ``warmup`` batches are drawn untimed (worker
start-up, page cache), then ``batches`` timed batches, each ending with the ids on the device (synchronised
on CUDA). Compare images/s with ``igpt bench train``'s images/s for the same batch: the loader keeps up when
it is the larger of the two, since loading overlaps the step (workers prefetch while the GPU computes).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from igpt.config import BenchLoaderConfig
from igpt.data.imageset import check_ids
from igpt.data.open import open_training
from igpt.tokenizers import Palette, load_tokenizer
from igpt.runtime import resolve_device

FIT_IMAGES = 500  # enough for a palette whose encoding costs what a real one does


def bench_loader(cfg: BenchLoaderConfig, *, show: bool = True) -> dict[str, Any]:
    """Time ``batches`` draws of the training stream; returns {"setup": {...}, "loader": {...}}."""
    data, n_px, batch, augment, workers = cfg.data, cfg.n_px, cfg.batch_size, cfg.augment, cfg.workers
    batches = cfg.batches
    dev = resolve_device(cfg.device)
    given = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    if given is not None and given.input_side is not None:
        n_px = given.input_side  # a VQ-VAE reads its own image side
    train = open_training(data, n_px, batch_size=batch, seed=cfg.seed, device=dev, augment=augment,
                          workers=workers, val_fraction=0.0, validate=False)
    if given is not None:
        tok = given
        check_ids(train.fit_set, tok, any_palette=cfg.any_palette)  # the ids a training run would check
    elif train.fit_set.pixels is None:
        raise ValueError(f"--data {data} holds ids: pass the --tokenizer it was prepared with")
    else:
        tok = Palette.fit(train.fit_set.pixels[:FIT_IMAGES], k=cfg.vocab_size, iters=5, seed=cfg.seed)
    stream = train.make_stream(tok)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(cfg.warmup):
        stream.next()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        ids = stream.next()
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = batches * batch
    tokens = int(ids.shape[-1])  # n_px**2 for a palette, the code grid's for a VQ-VAE
    setup = {"data": data, "n_px": n_px, "T": tokens, "batch": batch, "augment": augment, "workers": workers,
             "device": str(dev), "vocab_size": tok.k, "tokenizer": tok.kind, "cpu_count": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "stream": type(stream).__name__}
    result = {"setup": setup, "loader": {"batches": batches, "seconds": wall, "images_per_s": images / wall,
                                         "tokens_per_s": images * tokens / wall,
                                         "main_process_cpu_seconds": cpu, "last_shape": list(ids.shape)}}
    if show:
        print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    s, r = result["setup"], result["loader"]
    return "\n".join([
        f"loader: {s['stream']} over {s['data']} at {s['n_px']}x{s['n_px']}, batch {s['batch']}, augment "
        f"{s['augment']}, {s['workers']} worker(s), {s['vocab_size']}-id {s['tokenizer']} on {s['device']} "
        f"({s['cpu_count']} CPUs, {s['torch_threads']} torch threads)",
        f"{'batches':>7} {'seconds':>9} {'images/s':>10} {'tokens/s':>12} {'main CPU s':>10}",
        f"{r['batches']:>7} {r['seconds']:>9.2f} {r['images_per_s']:>10.1f} {r['tokens_per_s']:>12,.0f} "
        f"{r['main_process_cpu_seconds']:>10.2f}"])
