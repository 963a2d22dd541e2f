"""Data-parallel pretraining under torchrun (CPU, gloo): the result must not depend on the process count."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test starts two training processes (torchrun or by hand)

COMMON = ["pretrain", "--preset", "igpt-nano", "--data", "digits", "--vocab-size", "16", "--max-steps", "4",
          "--batch-size", "16", "--grad-accum", "2", "--warmup-steps", "1", "--eval-every", "2",
          "--eval-batches", "2", "--ckpt-every", "2", "--log-every", "1", "--device", "cpu", "-q"]


def run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "igpt"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "igpt"]
    # -q must precede the sub-command
    return subprocess.run(launcher + ["-q"] + args, capture_output=True, text=True, env=env, timeout=300)


def curve(run_dir) -> dict[tuple[int, str], float]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"]): r["loss"] for r in records}


def resume_to_step_4(run_dir, nproc: int = 1) -> None:
    """Continue a run that stopped at step 2 up to step 4, in ``nproc`` processes."""
    run_file = run_dir / "run.json"
    config = json.loads(run_file.read_text())
    config["train"]["max_steps"] = 4
    run_file.write_text(json.dumps(config))
    proc = run(["pretrain", "--resume", str(run_dir)], nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("extra", [["--objective", "ar"], ["--objective", "bert", "--augment", "cifar"],
                                   ["--objective", "ar", "--fsdp", "--grad-checkpoint"]])
def test_two_processes_match_one(tmp_path, extra):
    args = [a for a in COMMON if a != "-q"] + extra
    for name, nproc in (("one", 1), ("two", 2)):
        proc = run(args + ["--out", str(tmp_path / name)], nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 6  # 4 train + 2 val records, written once (rank 0)
    assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-5)
    w1 = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000004" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-0000004" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_batch_must_split_evenly_across_processes(tmp_path):
    args = [a for a in COMMON if a != "-q"]
    args[args.index("--batch-size") + 1] = "15"
    proc = run(args + ["--out", str(tmp_path / "r")], 2)
    assert proc.returncode != 0 and "not divisible by the 2 processes" in proc.stderr


def test_fsdp_matches_one_process_and_resumes_in_one(tmp_path):
    """FSDP2 over two processes gives the single-process curve; its checkpoint (gathered to full,
    name-keyed state) resumes in a single process and continues that curve."""
    args = [a for a in COMMON if a != "-q"]
    assert run(args + ["--out", str(tmp_path / "one")], 1).returncode == 0
    proc = run(args + ["--fsdp", "--out", str(tmp_path / "fsdp")], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(curve(tmp_path / "fsdp").values()) == pytest.approx(list(curve(tmp_path / "one").values()), rel=1e-5)

    short = [a if a != "4" else "2" for a in args]  # --max-steps 2; warm-up 1, so steps 0-1 see the same lr
    proc = run(short + ["--fsdp", "--out", str(tmp_path / "split")], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resume_to_step_4(tmp_path / "split")
    assert list(curve(tmp_path / "split").values()) == pytest.approx(list(curve(tmp_path / "one").values()), rel=1e-5)


def test_sharded_checkpoint_from_two_processes_resumes_in_one_and_consolidates(tmp_path):
    """--sharded-checkpoint: each FSDP rank writes its own shards; the run resumes in a single process on the
    uninterrupted curve, and `convert --consolidate` gives the weights the single-process run has."""
    from igpt import load

    args = [a for a in COMMON if a != "-q"]
    assert run(args + ["--out", str(tmp_path / "one")], 1).returncode == 0
    short = [a if a != "4" else "2" for a in args]  # --max-steps 2 (see the FSDP test above)
    proc = run(short + ["--fsdp", "--sharded-checkpoint", "--out", str(tmp_path / "split")], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step2 = tmp_path / "split" / "checkpoints" / "step-0000002"
    assert not (step2 / "model.safetensors").exists()
    assert sorted(p.name for p in (step2 / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    consolidated = tmp_path / "consolidated"
    proc = run(["convert", "--consolidate", "--checkpoint", str(tmp_path / "split"), "--out", str(consolidated)], 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000002" / "model.safetensors"))
    merged = load_file(str(consolidated / "model.safetensors"))
    assert sorted(merged) == sorted(reference)
    for k in reference:
        torch.testing.assert_close(merged[k], reference[k], rtol=1e-4, atol=1e-6, msg=k)
    direct, _, record = load(step2)  # igpt.load reads the shards directly too
    assert record.sharded and record.saved_by_processes == 2
    torch.testing.assert_close(direct.state_dict()["lm_head.weight"], reference["lm_head.weight"],
                               rtol=1e-4, atol=1e-6)

    resume_to_step_4(tmp_path / "split")
    assert list(curve(tmp_path / "split").values()) == pytest.approx(list(curve(tmp_path / "one").values()), rel=1e-5)
    assert not (tmp_path / "split" / "checkpoints" / "step-0000004" / "model.safetensors").exists()  # still sharded



def test_sharded_checkpoint_from_one_process_resumes_in_two(tmp_path):
    args = [a for a in COMMON if a != "-q"]
    assert run(args + ["--out", str(tmp_path / "one")], 1).returncode == 0
    short = [a if a != "4" else "2" for a in args]
    proc = run(short + ["--fsdp", "--sharded-checkpoint", "--out", str(tmp_path / "split")], 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resume_to_step_4(tmp_path / "split", nproc=2)  # FSDP over two: each rank loads its slices of one writer's file
    assert list(curve(tmp_path / "split").values()) == pytest.approx(list(curve(tmp_path / "one").values()), rel=1e-5)
    shards = sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "step-0000004" / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_process_stops_the_other_with_a_clear_error(tmp_path, victim):
    """Two ranks started by hand (no torchrun agent to clean up after them): SIGKILL one mid-training and
    the survivor must exit by itself with a one-line error, not hang in its next collective."""
    args = [a for a in COMMON if a != "-q"]
    args[args.index("--max-steps") + 1] = "100000"
    args[args.index("--ckpt-every") + 1] = "100000"
    args[args.index("--eval-every") + 1] = "0"
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "igpt", "-q"] + args + ["--out", str(tmp_path / "r")],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        metrics = tmp_path / "r" / "metrics.jsonl"
        deadline = time.monotonic() + 240  # a guard against a broken start-up, not a timing assertion
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.2)
        procs[victim].kill()
        _, err = procs[1 - victim].communicate(timeout=240)  # would raise if the survivor hung
    finally:
        for p in procs:
            p.kill()
    assert procs[1 - victim].returncode == 2, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("igpt pretrain: error:")]
    assert len(lines) == 1 and "lost contact with another process" in lines[0], err[-3000:]
    assert "Traceback" not in err and f"--resume {tmp_path / 'r'}" in lines[0]
