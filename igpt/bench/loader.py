"""Images per second of the training input pipeline alone: read, decode, augment, move, quantize.

    igpt bench loader --data shards/imagenet --augment imagenet --workers 8 --device cuda
    igpt bench loader --data cache/cifar10 --palette p.npz --augment cifar --batch 128

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

from igpt.config import DataConfig, TrainConfig
from igpt.palette import Palette
from igpt.runtime import resolve_device
from igpt.data.open import open_training_data

FIT_IMAGES = 500  # enough for a palette whose encoding costs what a real one does


def bench_loader(data: str, *, n_px: int = 32, batch: int = 64, augment: str = "none", workers: int = 0,
                 batches: int = 20, warmup: int = 2, device: str = "auto", palette: str | None = None,
                 palette_k: int = 512, seed: int = 0, show: bool = True) -> dict[str, Any]:
    """Time ``batches`` draws of the training stream; returns {"setup": {...}, "loader": {...}}."""
    if batch < 1 or batches < 1 or warmup < 0:
        raise ValueError(f"need --batch >= 1, --batches >= 1 and --warmup >= 0; got {batch}, {batches}, {warmup}")
    dev = resolve_device(device)
    cfg = TrainConfig(batch_size=batch, augment=augment, workers=workers, eval_every=0, seed=seed)
    data_cfg = DataConfig(data=data, val_fraction=0.0, palette=palette, palette_k=palette_k)
    train = open_training_data(cfg, data_cfg, n_px, dev)
    if palette is not None:
        pal = Palette.load(palette)
    elif train.fit_set.pixels is None:
        raise ValueError(f"--data {data} holds palette ids: pass the --palette it was prepared with")
    else:
        pal = Palette.fit(train.fit_set.pixels[:FIT_IMAGES], k=palette_k, iters=5, seed=seed)
    stream = train.make_stream(pal)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        stream.next()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        ids = stream.next()
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = batches * batch
    setup = {"data": data, "n_px": n_px, "T": n_px * n_px, "batch": batch, "augment": augment, "workers": workers,
             "device": str(dev), "palette_k": pal.k, "cpu_count": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "stream": type(stream).__name__}
    result = {"setup": setup, "loader": {"batches": batches, "seconds": wall, "images_per_s": images / wall,
                                         "tokens_per_s": images * n_px * n_px / wall,
                                         "main_process_cpu_seconds": cpu, "last_shape": list(ids.shape)}}
    if show:
        print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    s, r = result["setup"], result["loader"]
    return "\n".join([
        f"loader: {s['stream']} over {s['data']} at {s['n_px']}x{s['n_px']}, batch {s['batch']}, augment "
        f"{s['augment']}, {s['workers']} worker(s), {s['palette_k']}-colour palette on {s['device']} "
        f"({s['cpu_count']} CPUs, {s['torch_threads']} torch threads)",
        f"{'batches':>7} {'seconds':>9} {'images/s':>10} {'tokens/s':>12} {'main CPU s':>10}",
        f"{r['batches']:>7} {r['seconds']:>9.2f} {r['images_per_s']:>10.1f} {r['tokens_per_s']:>12,.0f} "
        f"{r['main_process_cpu_seconds']:>10.2f}"])
