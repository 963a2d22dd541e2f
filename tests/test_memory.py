"""The memory formulas of igpt.bench.memory against what autograd really saves (counted on CPU)."""

from __future__ import annotations

import pytest
import torch

from igpt.bench import memory
from igpt.bench.memory import (GB, available_bytes, head_activation_bytes, host_available_bytes,
                               layer_activation_bytes, max_batch, max_sampling_batch, plan, sampling_bytes)
from igpt.cli import main
from igpt.config import BenchSampleConfig, BenchTrainConfig, ModelConfig
from igpt.config.bench import resolve_preset
from igpt.model import GPT
from igpt.objectives import ar_loss
from igpt.runtime import autocast


def saved_bytes(cfg: ModelConfig, batch: int, *, bf16: bool, grad_checkpoint: bool) -> float:
    """The plan's formulas for what autograd holds when the forward pass ends, weight copies included."""
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.n_vocab
    if grad_checkpoint:  # block inputs only; the blocks' weight copies are made again when recomputed
        per_image, copies = L * 4 * d * cfg.n_ctx, 2 * d * V
    else:
        per_image, copies = L * layer_activation_bytes(cfg, bf16), 2 * (12 * d * d * L + d * V)
    return batch * (per_image + head_activation_bytes(cfg, bf16)) + (copies if bf16 else 0)


def measured_saved_bytes(cfg: ModelConfig, batch: int, dtype: torch.dtype, grad_checkpoint: bool) -> int:
    """Bytes of every distinct storage autograd keeps for the backward pass of an AR loss, parameters
    excluded (the plan counts them as state)."""
    model = GPT(cfg).train()
    model.grad_checkpoint = grad_checkpoint
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, cfg.n_vocab, (batch, cfg.n_ctx), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), dtype):
        ar_loss(model, ids)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_checkpoint", [False, True])
@pytest.mark.parametrize("shape", [(2, 64, 8), (3, 96, 6)])
def test_saved_bytes_formula_matches_autograd(dtype, grad_checkpoint, shape):
    L, d, n_px = shape
    cfg = ModelConfig(n_layer=L, n_embd=d, n_head=4, n_px=n_px, n_vocab=512)
    predicted = saved_bytes(cfg, 3, bf16=dtype == torch.bfloat16, grad_checkpoint=grad_checkpoint)
    assert measured_saved_bytes(cfg, 3, dtype, grad_checkpoint) == pytest.approx(predicted, rel=0.01)


def test_plan_parts_and_fsdp_sharding():
    cfg = ModelConfig.from_preset("igpt-s")
    ddp, fsdp = plan(cfg, 32), plan(cfg, 32, processes=8, fsdp=True)
    assert ddp.state == 16 * cfg.num_params() and fsdp.state == ddp.state / 8
    assert fsdp.activations == ddp.activations and fsdp.fsdp_gathered > 0 == ddp.fsdp_gathered
    ckpt = plan(cfg, 32, grad_checkpoint=True)
    assert ckpt.activations < ddp.activations / 5
    # the lean model measured 16 GB at batch 32 with torch.compile; eager saves more
    assert 12 * GB < plan(cfg, 32, compiled=True).total < 18 * GB < ddp.total


def test_max_batch_is_the_largest_that_fits():
    cfg = ModelConfig.from_preset("igpt-l")
    b = max_batch(cfg, 80 * GB)
    assert b >= 1
    assert plan(cfg, b).total <= 0.9 * 80 * GB < plan(cfg, b + 1).total
    assert max_batch(ModelConfig.from_preset("igpt-xl"), 80 * GB) == 0  # XL's state alone is 109 GB
    assert max_batch(ModelConfig.from_preset("igpt-xl"), 80 * GB, processes=8, fsdp=True, grad_checkpoint=True) >= 1


def test_default_bench_configs_plan_little_on_the_cpu():
    # 'auto' resolving to the CPU picks the CPU preset, so the defaults run on a machine without a GPU
    train, sample = BenchTrainConfig(), BenchSampleConfig()
    cfg = ModelConfig.from_preset(resolve_preset(train.preset, "cpu"))
    assert resolve_preset(train.preset, "cuda") == "igpt-s" and resolve_preset("igpt-nano", "cpu") == "igpt-nano"
    assert plan(cfg, train.batch_size, bf16=False).total < 2 * GB
    assert sampling_bytes(ModelConfig.from_preset(resolve_preset(sample.preset, "cpu")), sample.batch_size,
                          bytes_per_value=4) < 2 * GB
    assert plan(ModelConfig.from_preset("igpt-s"), 32, bf16=False).total > 20 * GB  # what the GPU default would plan


def test_sampling_bytes_counts_the_kv_cache():
    cfg = ModelConfig.from_preset("igpt-s")
    cache = 24 * 2 * 256 * 1024 * 512 * 2  # layers x K and V x batch x slots x width x bf16
    assert sampling_bytes(cfg, 256) - sampling_bytes(cfg, 0) == pytest.approx(cache, rel=0.01)
    b = max_sampling_batch(cfg, 20 * GB)
    assert sampling_bytes(cfg, b) <= 0.9 * 20 * GB < sampling_bytes(cfg, b + 1)


def test_host_available_bytes_is_a_real_figure():
    assert 0 < host_available_bytes() < 1 << 50
    assert available_bytes(torch.device("cpu")) == pytest.approx(host_available_bytes(), rel=0.5)


@pytest.mark.parametrize("command", ["train", "sample"])
def test_bench_refuses_a_batch_the_memory_cannot_hold(monkeypatch, capsys, command):
    cfg = ModelConfig.from_preset("igpt-nano", n_px=4, n_vocab=16)
    if command == "train":
        need = lambda b: plan(cfg, b, bf16=False).total  # noqa: E731
    else:
        need = lambda b: sampling_bytes(cfg, b, bytes_per_value=4)  # noqa: E731
    free = need(2) / 0.9 + 1  # room for 2 images and not for 4: deterministic, whatever the machine has
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    argv = ["bench", command, "--preset", "igpt-nano", "--n-px", "4", "--n-vocab", "16", "--batch-size", "4",
            "--device", "cpu", "--warmup", "0", *(["--steps", "1"] if command == "train" else ["--batches", "1"])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"needs {need(4) / GB:.3g} GB" in err and f"{free / GB:.3g} GB free" in err, err
    assert "--batch-size 4" in err and "the largest batch that fits is 2" in err, err
    argv[argv.index("--batch-size") + 1] = "2"  # the batch it names runs
    assert main(argv) == 0
