from __future__ import annotations

import json
import math

import pytest
import torch

from igpt.bench.train import bench_train, igpt_step, random_ids, search_max_batch
from igpt.cli import main, make_parser
from igpt.config import BenchTrainConfig, ModelConfig, TrainConfig

IMPL_KEYS = {"trainer", "batch", "steps", "warmup_steps", "warmup_seconds", "first_step_seconds", "seconds",
             "step_seconds", "tokens_per_s", "images_per_s", "model_tflops", "mfu", "peak_memory_bytes",
             "first_loss", "last_loss", "losses"}
SETUP_KEYS = {"preset", "n_px", "T", "n_vocab", "params", "device", "torch", "dtype", "batch", "objective",
              "mask_prob", "compile", "grad_checkpoint", "steps", "warmup", "seed", "lr", "flops_per_token",
              "attention_flops", "matmul_tflops", "total_memory_bytes", "peak_memory_note"}


def _losses(config: ModelConfig, compile: bool, lr: float = 1e-3, n_steps: int = 3) -> list[float]:
    cpu = torch.device("cpu")
    step, label = igpt_step(config, "ar", TrainConfig(lr=lr, seed=0), cpu, torch.float32, compile=compile)
    assert ("compiled" in label) == compile
    ids = random_ids(4, config, cpu, seed=0)
    return [step(ids, i) for i in range(n_steps)]


@pytest.mark.slow  # torch.compile
def test_compiled_and_eager_training_give_the_same_losses():
    # one small block keeps inductor's CPU compile (forward and backward) to about 20 s on two cores
    config = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_px=4, n_vocab=16)
    eager, compiled = _losses(config, False), _losses(config, True)
    assert eager == pytest.approx(compiled, rel=1e-5, abs=1e-6)
    assert eager[0] == pytest.approx(math.log(16), abs=1e-5)  # zero head: uniform predictions at step 0
    assert eager[-1] < eager[0] - 1e-3  # the steps really train
    # the tolerance is tight enough to see a small real difference: a 10% larger learning rate
    assert _losses(config, False, lr=1.1e-3)[1:] != pytest.approx(eager[1:], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_cpu_harness_reports_every_field(objective):
    result = bench_train(BenchTrainConfig("igpt-nano", 2, n_px=4, n_vocab=16, objective=objective, device="cpu",
                                          steps=2, warmup=1, compare_hf=True), show=False)
    json.dumps(result)  # serialisable as written by --json
    setup = result["setup"]
    assert SETUP_KEYS <= set(setup) and setup["T"] == 16 and setup["dtype"] == "fp32" and not setup["compile"]
    assert setup["attention_flops"] == ("causal" if objective == "ar" else "bidirectional")
    assert "CUDA" in setup["peak_memory_note"] and setup["total_memory_bytes"] is None
    ours = result["igpt"]
    assert set(ours) == IMPL_KEYS | {"planned_memory_bytes"} and ours["peak_memory_bytes"] is None
    assert len(ours["losses"]) == 3 and ours["planned_memory_bytes"] > 0
    assert ours["tokens_per_s"] == pytest.approx(2 * 16 / ours["step_seconds"])
    per_token = setup["flops_per_token"]
    assert ours["mfu"] == pytest.approx(ours["tokens_per_s"] * per_token / (setup["matmul_tflops"] * 1e12))
    assert ours["first_loss"] == pytest.approx(math.log(16), abs=1e-4)
    assert result["max_batch"] is None
    if objective == "ar":
        assert set(result["hf"]) == IMPL_KEYS and result["hf_skipped"] is None
        assert result["hf"]["trainer"].startswith("hf ImageGPT") and "transformers" in setup
        # HF's head is not zero-initialised, yet a 17-way softmax starts near ln 16 on our 16 ids
        assert abs(result["hf"]["first_loss"] - math.log(16)) < 0.5
    else:
        assert result["hf"] is None and "BERT" in result["hf_skipped"]


def test_without_compare_hf_the_reason_is_given():
    result = bench_train(BenchTrainConfig("igpt-nano", 1, n_px=2, n_vocab=8, device="cpu", steps=1, warmup=0),
                         show=False)
    assert result["hf"] is None and "--compare-hf" in result["hf_skipped"]
    assert result["igpt"]["first_step_seconds"] is None and result["igpt"]["warmup_seconds"] == 0


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "sub" / "train.json"
    assert main(["bench", "train", "--preset", "igpt-nano", "--n-px", "4", "--n-vocab", "16", "--batch-size", "2",
                 "--device", "cpu", "--steps", "2", "--warmup", "1", "--compare-hf", "--grad-checkpoint",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out and "speed-up over Hugging Face" in out and "grad checkpoint" in out
    result = json.loads(path.read_text())
    assert result["setup"]["grad_checkpoint"] and result["hf"]["batch"] == 2


@pytest.mark.parametrize("argv, needle", [
    (["--max-batch"], "--max-batch"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_cli_bad_input_is_one_line(argv, needle, capsys):
    assert main(["bench", "train", "--preset", "igpt-nano", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


class FakeStep:
    """Stands in for a TrainStep on a GPU that holds ``capacity`` images: larger batches raise ``error``."""

    def __init__(self, capacity: int, error: Exception | None = None) -> None:
        self.capacity, self.device = capacity, torch.device("cpu")
        self.error = error or torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
        self.optimizer.state["half made"] = {"step": 0}  # what an OOM inside AdamW's state set-up leaves

    def __call__(self, ids: torch.Tensor, step: int) -> float:
        if len(ids) > self.capacity:
            raise self.error
        return 0.0


@pytest.fixture
def fake_cuda_memory(monkeypatch):
    # the search's CUDA memory calls, on a CPU-only build (the search itself only runs on GPUs)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


@pytest.mark.slow  # times training at each batch size tried
@pytest.mark.parametrize("start, tried", [
    (8, [8, 16, 32, 64, 48, 40, 36, 38, 37]),  # double until it fails, then bisect
    (64, [64, 32, 48, 40, 36, 38, 37]),  # a start that does not fit bisects down from it
])
def test_max_batch_search_doubles_then_bisects(fake_cuda_memory, start, tried):
    config = ModelConfig(n_layer=1, n_embd=8, n_head=2, n_px=2, n_vocab=8)
    step = FakeStep(37)
    search = search_max_batch(step, config, start, seed=0, show=False)  # type: ignore[arg-type]
    assert search["batch"] == 37 and [t["batch"] for t in search["tries"]] == tried
    assert all(t["fits"] == (t["batch"] <= 37) for t in search["tries"])
    assert all((t["peak_memory_bytes"] is None) != t["fits"] for t in search["tries"])
    assert not step.optimizer.state  # cleared after an OOM


def test_max_batch_search_errors(fake_cuda_memory):
    config = ModelConfig(n_layer=1, n_embd=8, n_head=2, n_px=2, n_vocab=8)
    with pytest.raises(ValueError, match="not even a batch of 1"):
        search_max_batch(FakeStep(0), config, 4, seed=0, show=False)  # type: ignore[arg-type]
    # an OOM that a compiled graph re-raises as a plain RuntimeError still counts as a full GPU
    wrapped = FakeStep(3, RuntimeError("CUDA error: out of memory"))
    assert search_max_batch(wrapped, config, 2, seed=0, show=False)["batch"] == 3  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="device-side assert"):  # any other error is not mistaken for one
        search_max_batch(FakeStep(1, RuntimeError("device-side assert")), config, 2, seed=0,  # type: ignore[arg-type]
                         show=False)


def test_every_bench_train_flag_has_help():
    sub = next(a for a in make_parser()._actions if a.dest == "command")
    bench = next(a for a in sub.choices["bench"]._actions if a.dest == "bench_command")
    for action in bench.choices["train"]._actions:
        assert action.help, action.option_strings


def test_bench_loader_cli_times_the_training_stream(tmp_path):
    out = tmp_path / "loader.json"
    assert main(["-q", "bench", "loader", "--data", "digits", "--n-px", "8", "--batch-size", "16", "--batches", "3",
                 "--vocab-size", "16", "--device", "cpu", "--augment", "cifar", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["stream"] == "BatchStream" and result["setup"]["augment"] == "cifar"
    assert result["loader"]["images_per_s"] > 0 and result["loader"]["last_shape"] == [16, 64]


def test_bench_memory_cli_prints_the_plan(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--preset", "igpt-xl", "--batch-size", "2", "--processes", "8", "--fsdp",
                 "--grad-checkpoint", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["plan"]["state"] == 16 * ModelConfig.from_preset("igpt-xl").num_params() / 8
    assert result["max_batch"] >= 2
    assert "largest micro-batch per GPU" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["bench", "memory", "--preset", "igpt-xl", "--json", str(out)]) == 2  # an earlier result stays
    assert "--json" in capsys.readouterr().err and json.loads(out.read_text())["max_batch"] >= 2
    assert main(["bench", "memory", "--preset", "igpt-xl", "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["max_batch"] == 0  # one GPU: nothing fits

