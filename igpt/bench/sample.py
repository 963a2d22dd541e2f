"""Sampling throughput of our KV-cached sampler, and of Hugging Face's ``generate`` on the same shape.

    igpt bench sample --preset igpt-s --batch-size 256 --compare-hf   # the headline figure (GPU)
    igpt bench sample --preset igpt-nano --batch-size 8 --device cpu  # seconds on a CPU: checks the harness

Both models get random weights of the preset's shape (speed does not depend on their values; our head is
re-drawn from N(0, 0.02) because the released initialisation zeroes it) and draw all T pixels of ``batch``
images, starting from the SOS, with the same temperature and top-k. Timing: ``warmup`` untimed batches
first (our CUDA graphs are captured there; the first batch's time is reported separately), then
``batches`` timed batches between device synchronisations. images/s = images / seconds.

Hugging Face's model is ``ImageGPTForCausalImageModeling`` (eager attention, its own KV cache) in the same
dtype; its warm-up is one short generate, and it is timed on ``hf_batches`` batches, because at a few
images per second one batch of 256 already takes most of a minute.
"""

from __future__ import annotations

from typing import Any

import torch

from igpt.bench.memory import check_fits, max_sampling_batch, sampling_bytes
from igpt.bench.timing import DTYPE_NAMES, device_label, random_model, timed_seconds
from igpt.config import BenchSampleConfig, ModelConfig
from igpt.config.bench import resolve_preset
from igpt.generate.sample import Sampler, make_generator
from igpt.model import GPT
from igpt.runtime import compile_enabled, resolve_device, resolve_dtype

def _throughput(name: str, batch: int, first: float | None, times: list[float]) -> dict[str, Any]:
    total = sum(times)
    return {"sampler": name, "batch": batch, "batches": len(times), "seconds": total,
            "first_batch_seconds": first, "images_per_s": batch * len(times) / total}


@torch.no_grad()
def bench_igpt(model: GPT, batch: int, dtype: torch.dtype, *, batches: int = 2, warmup: int = 1,
               window: int = 64, cuda_graph: bool | None = None, compile: bool = False,
               top_k: int | None = None, seed: int = 0) -> dict[str, Any]:
    device = model.wte.weight.device
    sampler = Sampler(model, batch, dtype=dtype, window=window, cuda_graph=cuda_graph, compile=compile)
    generator = make_generator(seed, device)
    run = lambda: sampler.run(top_k=top_k, generator=generator)  # noqa: E731
    warm = [timed_seconds(run, device) for _ in range(warmup)]
    label = "igpt (" + ", ".join(["KV cache"] + ["compiled"] * compile + ["CUDA graphs"] * sampler.graphs_on) + ")"
    return _throughput(label, batch, warm[0] if warm else None, [timed_seconds(run, device) for _ in range(batches)])


def hf_config(config: ModelConfig) -> Any:
    """An ImageGPTConfig of our shape: V + 1 ids (HF's SOS is the last row), quick-GELU, no dropout, an
    untied head. ImportError when transformers is not installed."""
    from transformers import ImageGPTConfig

    return ImageGPTConfig(vocab_size=config.n_vocab + 1, n_positions=config.n_ctx, n_embd=config.n_embd,
                          n_layer=config.n_layer, n_head=config.n_head, activation_function="quick_gelu",
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)


@torch.no_grad()
def bench_hf(config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype, *, batches: int = 1,
             top_k: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Hugging Face's generate on the same shape; ImportError when transformers is not installed."""
    from transformers import ImageGPTForCausalImageModeling

    V, T = config.n_vocab, config.n_ctx
    torch.manual_seed(seed)
    model = ImageGPTForCausalImageModeling(hf_config(config)).to(device=device, dtype=dtype).eval()
    sos = torch.full((batch, 1), V, dtype=torch.long, device=device)  # HF's SOS is the last vocabulary row

    def run(n_new: int) -> torch.Tensor:
        # top_k=0 switches HF's default top-k of 50 off; pad 0 is never used (there is no end-of-sequence id)
        return model.generate(input_ids=sos, attention_mask=torch.ones_like(sos), do_sample=True,
                              max_new_tokens=n_new, min_new_tokens=n_new, top_k=top_k or 0, top_p=1.0,
                              temperature=1.0, pad_token_id=0)

    first = timed_seconds(lambda: run(min(T, 16)), device)
    times = [timed_seconds(lambda: run(T), device) for _ in range(batches)]
    out = _throughput("hf generate (eager, KV cache)", batch, None, times)
    out["warmup_seconds"] = first
    return out


def bench_sample(cfg: BenchSampleConfig = BenchSampleConfig(), *, show: bool = True) -> dict[str, Any]:
    """Time our sampler (and HF's, with ``compare_hf`` when transformers is importable); print a table and
    return {"setup": {...}, "igpt": {...}, "hf": {...} | None, "hf_skipped": reason | None}."""
    dev = resolve_device(cfg.device)
    dt = resolve_dtype(cfg.dtype, dev)
    compile = compile_enabled(cfg.compile, dev)
    batch, top_k, seed, preset = cfg.batch_size, cfg.top_k or None, cfg.seed, resolve_preset(cfg.preset, dev.type)
    config = ModelConfig.from_preset(preset, n_vocab=cfg.n_vocab, **({"n_px": cfg.n_px} if cfg.n_px else {}))
    width = dt.itemsize  # bytes per cached value
    check_fits(sampling_bytes(config, batch, bytes_per_value=width), dev, batch,
               lambda free: max_sampling_batch(config, free, bytes_per_value=width),
               f"sampling {preset} at T = {config.n_ctx}")
    setup = {"preset": preset, "n_px": config.n_px, "n_vocab": cfg.n_vocab, "params": config.num_params(),
             "device": device_label(dev), "dtype": DTYPE_NAMES.get(dt, str(dt)), "batch": batch,
             "window": cfg.window, "compile": compile, "top_k": top_k, "torch": torch.__version__}
    result: dict[str, Any] = {"setup": setup, "hf": None, "hf_skipped": None}
    model = random_model(config, dev, seed)
    result["igpt"] = bench_igpt(model, batch, dt, batches=cfg.batches, warmup=cfg.warmup, window=cfg.window,
                                cuda_graph=cfg.cuda_graph, compile=compile, top_k=top_k, seed=seed)
    del model
    if cfg.compare_hf:
        try:
            result["hf"] = bench_hf(config, batch, dev, dt, batches=cfg.hf_batches, top_k=top_k, seed=seed)
        except ImportError as e:
            result["hf_skipped"] = f"transformers is not importable ({e})"
    else:
        result["hf_skipped"] = "not asked for (--compare-hf)"
    if show:
        print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [f"sampling {s['batch']} images of {s['n_px']}x{s['n_px']} ({s['n_px'] ** 2} steps), preset "
             f"{s['preset']} ({s['params']:,} parameters, {s['n_vocab']} ids), {s['dtype']} on {s['device']}, "
             f"torch {s['torch']}",
             f"{'sampler':<40} {'batches':>7} {'seconds':>9} {'images/s':>9} {'first batch s':>13}"]
    rows = [r for r in (result["igpt"], result["hf"]) if r is not None]
    for r in rows:
        first = f"{r['first_batch_seconds']:.2f}" if r.get("first_batch_seconds") is not None else "-"
        lines.append(f"{r['sampler']:<40} {r['batches']:>7} {r['seconds']:>9.2f} {r['images_per_s']:>9.2f} "
                     f"{first:>13}")
    if result["hf"] is not None:
        ratio = result["igpt"]["images_per_s"] / result["hf"]["images_per_s"]
        lines.append(f"speed-up over Hugging Face: {ratio:.1f}x")
    elif result["hf_skipped"]:
        lines.append(f"Hugging Face: skipped, {result['hf_skipped']}")
    return "\n".join(lines)
