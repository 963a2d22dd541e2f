"""Training throughput: full optimizer steps of our model, and of Hugging Face's ImageGPT on the same shape.

    igpt bench train --preset igpt-s --batch-size 32 --compile on --compare-hf   # the headline figure (GPU)
    igpt bench train --preset igpt-l --max-batch --grad-checkpoint        # largest batch that fits, and its MFU
    igpt bench train --preset igpt-nano --batch-size 4 --device cpu --steps 2  # seconds on a CPU: checks the harness

A step is what ``igpt.train.trainer.Trainer.train_step`` does for one micro-batch: the loss under autocast, from
``igpt.train.trainer.micro_loss`` itself (AR over all T pixels, or BERT with a fresh mask drawn per step on the CPU
from (seed, step), then moved), backward, the loss read back to the host, global-norm clipping, an AdamW step
from ``igpt.train.optim.make_optimizer`` (fused on CUDA) and dropping the gradients. The model is initialised as
in pretraining (zero head, so the first AR loss is ln V) and, with ``compile``, wrapped in ``torch.compile``
as ``igpt pretrain --compile`` wraps it. Data is one random batch of ids already on the device, reused every
step: no loader is timed, and the falling loss shows that the steps really train.

Timing: ``warmup`` untimed steps (compilation happens in the first; their time is reported), then ``steps``
steps between two device synchronisations. tokens/s = batch * T / step time. Model FLOPs per token come
from ``igpt.bench.flops.train_flops_per_token`` (causal attention for AR, bidirectional for BERT; recomputation by
activation checkpointing is not counted, by definition of model FLOPs), and MFU divides the achieved model
FLOP/s by the rate of a large matrix product measured in the same run in the run's dtype. Peak memory is
``torch.cuda.max_memory_allocated``, reset before each model is built (weights, optimizer state and
activations all count); the CPU has no such counter.

Hugging Face's ``ImageGPTForCausalImageModeling`` (eager attention: it has no SDPA path; not compiled, as it
is usually run) gets the same ids with its SOS id prepended and the last one dropped, our cross-entropy
over all T positions, and the same optimizer, clipping and autocast. It has no masked-pixel objective.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from igpt.bench.flops import measure_matmul_flops, train_flops_per_token
from igpt.bench.memory import check_fits, max_batch as plan_max_batch, plan
from igpt.bench.sample import hf_config
from igpt.bench.timing import DTYPE_NAMES, device_label, timed_seconds
from igpt.config import BenchTrainConfig, ModelConfig, TrainConfig
from igpt.config.bench import resolve_preset
from igpt.runtime import autocast, compile_enabled, resolve_device, resolve_dtype
from igpt.train.optim import pretrain_optimizer
from igpt.train.trainer import init_model, micro_loss

LossFn = Callable[[torch.Tensor, int], torch.Tensor]  # (ids, step) -> scalar loss
NO_CUDA_MEMORY = "not measured on the CPU: torch.cuda.max_memory_allocated counts CUDA memory only"


class TrainStep:
    """One training step of ``model`` on one micro-batch, as the pretraining loop takes it."""

    def __init__(self, model: nn.Module, loss_of: LossFn, cfg: TrainConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.loss_of, self.cfg, self.device, self.dtype = model, loss_of, cfg, device, dtype
        self.optimizer = pretrain_optimizer(model, cfg, device)

    def __call__(self, ids: torch.Tensor, step: int) -> float:
        with autocast(self.device, self.dtype):
            loss = self.loss_of(ids, step)
        loss.backward()
        value = loss.item()  # the trainer reads every loss back (a host sync, so it is timed here too)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


def igpt_step(config: ModelConfig, objective: str, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
              *, compile: bool) -> tuple[TrainStep, str]:
    """Our model with pretraining's initialisation (from ``cfg.seed``), optimizer and loss; returns (step,
    label)."""
    torch.manual_seed(cfg.seed)
    model = init_model(config, replace(cfg, objective=objective)).to(device).train()  # as pretraining builds it
    forward = torch.compile(model) if compile else model

    def loss_of(ids: torch.Tensor, step: int) -> torch.Tensor:
        return micro_loss(forward, ids, replace(cfg, objective=objective, batch_size=len(ids)), step)

    parts = ["SDPA", "fused AdamW" if device.type == "cuda" else "AdamW"]
    parts += ["compiled"] * compile + ["grad checkpoint"] * cfg.grad_checkpoint
    return TrainStep(model, loss_of, cfg, device, dtype), f"igpt ({', '.join(parts)})"


def hf_step(config: ModelConfig, cfg: TrainConfig, device: torch.device,
            dtype: torch.dtype) -> tuple[TrainStep, str]:
    """Hugging Face's ImageGPT of the same shape under the same loop (AR only); ImportError without
    transformers."""
    from transformers import ImageGPTForCausalImageModeling

    torch.manual_seed(cfg.seed)
    model = ImageGPTForCausalImageModeling(hf_config(config)).to(device).train()
    if cfg.grad_checkpoint:  # transformers 5 renamed gradient_checkpointing_enable (kept as an alias)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    V = config.n_vocab

    def loss_of(ids: torch.Tensor, step: int) -> torch.Tensor:
        # HF's layout: the SOS id V first, so logits[:, i] predict pixel i from pixels < i, as ours do
        inputs = torch.cat([torch.full_like(ids[:, :1], V), ids[:, :-1]], dim=1)  # (B, T)
        logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V + 1)
        return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())

    parts = ["eager attention"] + ["grad checkpoint"] * cfg.grad_checkpoint
    return TrainStep(model, loss_of, cfg, device, dtype), f"hf ImageGPT ({', '.join(parts)})"


def random_ids(batch: int, config: ModelConfig, device: torch.device, seed: int) -> torch.Tensor:
    """(batch, T) uniform ids, the same for every model of a run."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(config.n_vocab, (batch, config.n_ctx), generator=generator).to(device)


def free_memory(device: torch.device) -> None:
    """Drop what the last model left (compiled graphs included) and restart the peak-memory counter."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(step: TrainStep, label: str, ids: torch.Tensor, *, steps: int, warmup: int,
            flops_per_token: int, matmul_flops: float, show: bool) -> dict[str, Any]:
    """Time ``warmup`` then ``steps`` training steps on ``ids``; throughput, MFU, peak memory and losses."""
    device = ids.device
    B, T = ids.shape
    losses: list[float] = []
    bar = tqdm(total=warmup + steps, desc=label, leave=False, disable=not show)

    def run(first: int, n: int) -> None:
        for i in range(first, first + n):
            losses.append(step(ids, i))
            bar.update(1)

    warm = [timed_seconds(lambda i=i: run(i, 1), device) for i in range(warmup)]
    seconds = timed_seconds(lambda: run(warmup, steps), device)
    bar.close()
    step_s = seconds / steps
    model_flops = B * T * flops_per_token / step_s
    return {"trainer": label, "batch": B, "steps": steps, "warmup_steps": warmup, "warmup_seconds": sum(warm),
            "first_step_seconds": warm[0] if warm else None, "seconds": seconds, "step_seconds": step_s,
            "tokens_per_s": B * T / step_s, "images_per_s": B / step_s, "model_tflops": model_flops / 1e12,
            "mfu": model_flops / matmul_flops,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses}


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OOM, also when a compiled graph or a backend re-raises it as a plain RuntimeError."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def search_max_batch(step: TrainStep, config: ModelConfig, start: int, *, seed: int, limit: int = 1 << 16,
                     show: bool = True) -> dict[str, Any]:
    """Largest micro-batch for which two training steps (the second with the optimizer state allocated)
    run without CUDA running out of memory: double from ``start`` until one fails, then bisect."""
    device = step.device
    tries: list[dict[str, Any]] = []
    bar = tqdm(desc="largest batch", unit="try", leave=False, disable=not show)

    def fits(batch: int) -> bool:
        ok, ids = True, random_ids(batch, config, device, seed)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            for i in range(2):
                step(ids, i)
        except RuntimeError as e:  # the exception (and the activations its traceback holds) ends with the block
            if not is_out_of_memory(e):
                raise
            ok = False
        peak = torch.cuda.max_memory_allocated(device) if ok else None
        step.optimizer.zero_grad(set_to_none=True)
        if not ok:  # an OOM inside AdamW's lazy state set-up can leave a parameter's state half made
            step.optimizer.state.clear()
        del ids
        gc.collect()
        torch.cuda.empty_cache()
        tries.append({"batch": batch, "fits": ok, "peak_memory_bytes": peak})
        bar.update(1)
        bar.set_postfix(batch=batch, fits=ok)
        return ok

    low, high = 0, start  # low fits (0 trivially); high is the next candidate, then the smallest failure
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    bar.close()
    if low == 0:
        raise ValueError(f"--max-batch: not even a batch of 1 fits on {device_label(device)}")
    return {"batch": low, "start": start, "tries": tries, "limit": limit}


def _check_device(max_batch: bool, device: torch.device) -> None:
    if max_batch and device.type != "cuda":
        raise ValueError(f"--max-batch searches GPU memory and needs a CUDA device; got --device {device}")


def _bench_igpt(config: ModelConfig, objective: str, cfg: TrainConfig, dt: torch.dtype, ids: torch.Tensor, *,
                compile: bool, **kw: Any) -> dict[str, Any]:
    free_memory(ids.device)
    step, label = igpt_step(config, objective, cfg, ids.device, dt, compile=compile)
    out = measure(step, label, ids, **kw)
    del step
    free_memory(ids.device)
    return out


def _bench_at_max_batch(config: ModelConfig, objective: str, cfg: TrainConfig, dt: torch.dtype,
                        device: torch.device, start: int, *, compile: bool, show: bool,
                        **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Search with one model (compiled graphs may turn dynamic in the batch), then measure a fresh one at
    the largest batch; should it not fit after all (memory fragments differently), the next smaller one."""
    free_memory(device)
    step, _ = igpt_step(config, objective, cfg, device, dt, compile=compile)
    search = search_max_batch(step, config, start, seed=cfg.seed, show=show)
    del step
    for fit in sorted((t["batch"] for t in search["tries"] if t["fits"]), reverse=True):
        try:
            ids = random_ids(fit, config, device, cfg.seed)
            return search, _bench_igpt(config, objective, cfg, dt, ids, compile=compile, show=show, **kw)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            search.setdefault("measure_failed", []).append(fit)
        free_memory(device)
    raise ValueError(f"--max-batch: the search found batch {search['batch']}, but no fitting batch could "
                     f"then be measured on {device_label(device)}")


def bench_train(bench: BenchTrainConfig = BenchTrainConfig(), *, show: bool = True) -> dict[str, Any]:
    """Time training steps of our model (and HF's, with ``compare_hf``); print a table and return
    {"setup": {...}, "igpt": {...}, "hf": {...} | None, "hf_skipped": reason | None, "max_batch": {...} | None}.
    ``compile`` "auto" decides as ``igpt pretrain`` does (on capable GPUs only). With ``max_batch`` (CUDA
    only) ``batch_size`` is where the search starts and the figures are those at the largest batch that
    fits."""
    dev = resolve_device(bench.device)
    _check_device(bench.max_batch, dev)
    dt = resolve_dtype(bench.dtype, dev)
    compile = compile_enabled(bench.compile, dev)  # as igpt pretrain decides
    preset, batch, n_vocab, objective, seed = (resolve_preset(bench.preset, dev.type), bench.batch_size, bench.n_vocab,
                                               bench.objective, bench.seed)
    steps, warmup, grad_checkpoint = bench.steps, bench.warmup, bench.grad_checkpoint
    config = ModelConfig.from_preset(preset, n_vocab=n_vocab, **({"n_px": bench.n_px} if bench.n_px else {}))
    cfg = TrainConfig(objective=objective, batch_size=batch, seed=seed, grad_checkpoint=grad_checkpoint)
    memory = {"bf16": dt == torch.bfloat16, "grad_checkpoint": grad_checkpoint, "compiled": compile}
    if not bench.max_batch:  # the search finds its own limit by trying
        check_fits(plan(config, batch, **memory).total, dev, batch,
                   lambda free: plan_max_batch(config, free, **memory), f"training {preset} at T = {config.n_ctx}")
    causal = objective == "ar"
    flops_per_token = train_flops_per_token(config, causal=causal)
    matmul = measure_matmul_flops(dev, dt)
    free_memory(dev)
    setup = {"preset": preset, "n_px": config.n_px, "T": config.n_ctx, "n_vocab": n_vocab,
             "params": config.num_params(), "device": device_label(dev), "torch": torch.__version__,
             "dtype": DTYPE_NAMES.get(dt, str(dt)), "batch": batch, "objective": objective,
             "mask_prob": cfg.mask_prob if objective == "bert" else None, "compile": compile,
             "grad_checkpoint": grad_checkpoint, "steps": steps, "warmup": warmup, "seed": seed,
             "lr": cfg.lr, "flops_per_token": flops_per_token,
             "attention_flops": "causal" if causal else "bidirectional", "matmul_tflops": matmul / 1e12,
             "total_memory_bytes": torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None,
             "peak_memory_note": None if dev.type == "cuda" else NO_CUDA_MEMORY}
    result: dict[str, Any] = {"setup": setup, "hf": None, "hf_skipped": None, "max_batch": None}
    kw = {"steps": steps, "warmup": warmup, "flops_per_token": flops_per_token, "matmul_flops": matmul,
          "show": show}
    if bench.max_batch:
        result["max_batch"], result["igpt"] = _bench_at_max_batch(config, objective, cfg, dt, dev, batch,
                                                                  compile=compile, **kw)
        setup["batch"] = batch = result["igpt"]["batch"]
    else:
        ids = random_ids(batch, config, dev, seed)
        result["igpt"] = _bench_igpt(config, objective, cfg, dt, ids, compile=compile, **kw)
    # igpt.bench.memory's estimate for the same step, to set beside the measured peak (docs/scaling.md)
    result["igpt"]["planned_memory_bytes"] = plan(config, batch, **memory).total
    result["hf"], result["hf_skipped"] = _maybe_hf(config, cfg, dt, dev, batch, bench.compare_hf, bench.max_batch, kw)
    if result["hf"] is not None:
        import transformers

        setup["transformers"] = transformers.__version__
    if show:
        print(format_table(result))
    return result


def _maybe_hf(config: ModelConfig, cfg: TrainConfig, dt: torch.dtype, dev: torch.device, batch: int,
              compare_hf: bool, max_batch: bool, kw: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(HF's figures, None) or (None, why they were not taken)."""
    if not compare_hf:
        return None, "not asked for (--compare-hf)"
    if cfg.objective != "ar":
        return None, "Hugging Face's ImageGPT has no masked-pixel (BERT) objective"
    if max_batch:
        return None, "--max-batch times our model only"
    try:
        step, label = hf_step(config, cfg, dev, dt)
    except ImportError as e:
        return None, f"transformers is not importable ({e})"
    out = measure(step, label, random_ids(batch, config, dev, cfg.seed), **kw)
    del step
    free_memory(dev)
    return out, None


def _gb(n_bytes: int | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 1e9:.1f}"


def format_table(result: dict[str, Any]) -> str:
    s = result["setup"]
    what = "AR (causal)" if s["objective"] == "ar" else f"BERT (mask {s['mask_prob']}, bidirectional)"
    shape = f"{s['preset']} ({s['params']:,} parameters) on {s['n_px']}x{s['n_px']} (T = {s['T']})"
    lines = [f"training {shape}, batch {s['batch']}, {what}, {s['dtype']} on {s['device']}, torch {s['torch']}",
             (f"model FLOPs {s['flops_per_token'] / 1e6:.1f} MFLOP/token; {s['dtype']} matrix product "
              f"{s['matmul_tflops']:.4g} TFLOP/s measured in this run (the MFU denominator)"),
             (f"{'trainer':<48} {'step ms':>9} {'tokens/s':>11} {'images/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'peak GB':>7} {'loss first -> last':>18} {'warmup s':>8}")]
    for r in (result["igpt"], result["hf"]):
        if r is None:
            continue
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        lines.append(f"{r['trainer']:<48} {r['step_seconds'] * 1e3:>9.1f} {r['tokens_per_s']:>11,.0f} "
                     f"{r['images_per_s']:>9.2f} {r['model_tflops']:>8.4g} {r['mfu']:>6.1%} "
                     f"{_gb(r['peak_memory_bytes']):>7} {loss:>18} {r['warmup_seconds']:>8.2f}")
    lines.append(f"memory plan (igpt.bench.memory) for our step: {_gb(result['igpt']['planned_memory_bytes'])} GB")
    if s["peak_memory_note"]:
        lines.append(f"peak memory: {s['peak_memory_note']}")
    if result["hf"] is not None:
        ours, hf = result["igpt"], result["hf"]
        ratio = f"speed-up over Hugging Face: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x tokens/s"
        if ours["peak_memory_bytes"] and hf["peak_memory_bytes"]:
            ratio += f", {ours['peak_memory_bytes'] / hf['peak_memory_bytes']:.2f}x its peak memory"
        lines.append(ratio)
    elif result["hf_skipped"]:
        lines.append(f"Hugging Face: skipped, {result['hf_skipped']}")
    if result["max_batch"] is not None:
        tried = ", ".join(f"{t['batch']} {'fits' if t['fits'] else 'OOM'}" for t in result["max_batch"]["tries"])
        lines.append(f"largest batch that fits in {_gb(s['total_memory_bytes'])} GB: {result['max_batch']['batch']}"
                     f" (grad checkpoint {'on' if s['grad_checkpoint'] else 'off'}; tried {tried})")
    return "\n".join(lines)
