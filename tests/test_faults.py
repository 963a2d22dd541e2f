"""Fault injection against the real command line, in subprocesses: kills at any moment, signals, a file-size
limit during a checkpoint write, damaged checkpoints, two writers, inputs replaced under a run, and bad
flags. Each asserts that nothing is lost (a resumed run draws the straight run's loss curve) and that every
error is one line. docs/reliability.md tabulates the faults and their outcomes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import igpt
from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.tokenizers import Palette
from igpt.stop import EXIT_STOPPED
from igpt.train import pretrain

pytestmark = pytest.mark.slow  # every test runs the command line in subprocesses

STEPS = 12
FLAGS = ["--preset", "igpt-nano", "--vocab-size", "16", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2",
         "--eval-every", "0", "--log-every", "1", "--ckpt-every", "4", "--keep-last", "5", "--device", "cpu",
         "--workers", "0"]
SIGNAL_STEPS = 400  # long enough that a signal sent after the first steps always arrives mid-run


def igpt_cli(*args: str, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "igpt", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def error_line(proc: subprocess.CompletedProcess, command: str = "pretrain") -> str:
    """The one-line error of a refused command: exit status 2, no traceback, the message last."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"igpt {command}: error: "), proc.stderr[-3000:]
    return last


def train_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def steps_of(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in sorted((run / "checkpoints").glob("step-*"))]


def assert_same_run(run: Path, straight: Path) -> None:
    """The run ended where the straight run did, with its loss at every step and its weights."""
    assert train_losses(run) == pytest.approx(train_losses(straight), rel=1e-6, abs=1e-7)
    a, b = igpt.load(run).model.state_dict(), igpt.load(straight).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def no_leftovers(run: Path) -> None:
    found = [p for p in run.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not found, found


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert igpt_cli("pretrain", *FLAGS, "--data", "digits", "--max-steps", str(STEPS), "--out", str(run)).returncode == 0
    return run


@pytest.fixture(scope="module")
def straight_long(tmp_path_factory) -> Path:
    """An uninterrupted SIGNAL_STEPS run (through the API, which the command line calls)."""
    run = tmp_path_factory.mktemp("straight_long") / "run"
    model = ModelConfig.from_preset("igpt-nano")
    cfg = TrainConfig(batch_size=16, lr=3e-3, warmup_steps=2, eval_every=0, log_every=1, ckpt_every=4, keep_last=5,
                      device="cpu", workers=0, max_steps=SIGNAL_STEPS)
    pretrain(model, cfg, DataConfig(data="digits", vocab_size=16), run, progress=False)
    return run


# A command line with one fault planted in it (the code under test is unchanged; only the moment of death is
# chosen): KILL_STEP dies at the end of that training step, before it is logged or saved, KILL_IN_WRITE inside the checkpoint write of that step,
# after its weights are on disk and before the directory is renamed into place.
INJECT = """
import importlib, os, signal, sys
from igpt.cli import main
pretrain = importlib.import_module("igpt.train.pretrain")  # the module, which igpt.train's function shadows
checkpoint = importlib.import_module("igpt.weights.checkpoint")
kill_step, kill_in_write = {kill_step}, {kill_in_write}
step = pretrain.Trainer.train_step
def train_step(self):
    metrics = step(self)
    if self.step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return metrics
write = checkpoint.write_small_files
def write_small_files(tmp, record, *args):
    write(tmp, record, *args)
    if record.step == kill_in_write:
        os.kill(os.getpid(), signal.SIGKILL)
pretrain.Trainer.train_step = train_step
checkpoint.write_small_files = write_small_files
sys.exit(main(sys.argv[1:]))
"""


def run_with_fault(run: Path, kill_step: int = -1, kill_in_write: int = -1, *extra: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(INJECT).format(kill_step=kill_step, kill_in_write=kill_in_write)
    return subprocess.run([sys.executable, "-c", script, "-q", "pretrain", *FLAGS, "--data", "digits", "--max-steps",
                           str(STEPS), "--out", str(run), *extra], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("kill_step", sorted(np.random.default_rng(0).choice(np.arange(1, STEPS), 2, replace=False)))
def test_sigkill_at_a_random_step_then_resume_equals_the_straight_run(tmp_path, straight, kill_step):
    run = tmp_path / "run"
    assert run_with_fault(run, kill_step=int(kill_step)).returncode == -signal.SIGKILL
    assert max(train_losses(run)) == kill_step - 1  # died inside step kill_step, steps logged after its checkpoint
    assert igpt_cli("pretrain", "--resume", str(run)).returncode == 0
    assert_same_run(run, straight)


def test_sigkill_inside_a_checkpoint_write_leaves_the_last_one_and_no_debris(tmp_path, straight):
    run = tmp_path / "run"
    assert run_with_fault(run, kill_in_write=8).returncode == -signal.SIGKILL
    assert steps_of(run) == [4]  # step 8's directory never appeared
    assert list((run / "checkpoints").glob(".step-0000008.tmp-*"))  # the half-written one, under its temp name
    proc = igpt_cli("pretrain", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    no_leftovers(run)  # removed when the resume started
    assert_same_run(run, straight)


def start(run: Path, *extra: str) -> subprocess.Popen:
    """A long run in the background, returned once it has logged its first steps."""
    proc = subprocess.Popen([sys.executable, "-m", "igpt", "-q", "pretrain", *FLAGS, "--data", "digits",
                             "--max-steps", str(SIGNAL_STEPS), "--out", str(run), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len(train_losses(run)) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_finish_the_step_save_and_say_how_to_resume(tmp_path, straight_long, sig):
    run = tmp_path / "run"
    proc = start(run)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(sig).name}" in last and f"igpt pretrain --resume {run}" in last
    stopped_at = max(train_losses(run))
    assert stopped_at < SIGNAL_STEPS and steps_of(run)[-1] == stopped_at  # a fresh checkpoint at the last step
    if sig == signal.SIGTERM:  # and nothing is lost
        assert igpt_cli("pretrain", "--resume", str(run)).returncode == 0
        assert_same_run(run, straight_long)


# The second Ctrl-C arrives while the first one's checkpoint is being written. signal.raise_signal runs the
# Python handler before it returns; after os.kill the handler could run later, under load even after the
# regular checkpoint of step 6 had started, and the two signals then arrived as one.
SECOND_SIGNAL = """
import importlib, signal, sys
from igpt.cli import main
# Ctrl-C as in an interactive shell, whatever disposition the test runner's process passed on (an ignored
# SIGINT is inherited, and the second Ctrl-C would then be ignored); said on stderr for a failure's message.
print("SIGINT disposition at start:", signal.getsignal(signal.SIGINT), file=sys.stderr)
signal.signal(signal.SIGINT, signal.default_int_handler)
pretrain = importlib.import_module("igpt.train.pretrain")
save = pretrain.Trainer.save
def train_step(self, step=pretrain.Trainer.train_step):
    metrics = step(self)
    if self.step == 6:
        signal.raise_signal(signal.SIGINT)
    return metrics
def saving(self):
    if self.step == 6:
        signal.raise_signal(signal.SIGINT)
    save(self)
pretrain.Trainer.train_step, pretrain.Trainer.save = train_step, saving
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_signal_stops_at_once_and_loses_nothing_written(tmp_path, straight):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SECOND_SIGNAL), "-q", "pretrain", *FLAGS, "--data",
                           "digits", "--max-steps", str(STEPS), "--out", str(run)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "igpt pretrain: interrupted"
    assert steps_of(run) == [4]  # the interrupted write left nothing; step 4's checkpoint is whole
    no_leftovers(run)
    assert igpt_cli("pretrain", "--resume", str(run)).returncode == 0
    assert_same_run(run, straight)


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_a_file_size_limit_during_a_checkpoint_write_is_one_line_and_recoverable(tmp_path, straight, kind):
    run = tmp_path / "run"
    extra = ["--sharded-checkpoint"] if kind == "sharded" else []
    assert run_with_fault(run, 5, -1, *extra).returncode == -signal.SIGKILL
    weights = sum(p.stat().st_size for p in (run / "checkpoints" / "step-0000004").rglob("*") if p.is_file()) // 3

    def limit() -> None:  # room for everything but a checkpoint's weights
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights // 2, weights // 2))

    last = error_line(igpt_cli("pretrain", "--resume", str(run), preexec_fn=limit))
    assert "no space left writing" in last and "step-0000008" in last and "MB needed" in last
    assert steps_of(run) == [4]
    no_leftovers(run)
    assert igpt_cli("pretrain", "--resume", str(run)).returncode == 0
    assert_same_run(run, straight)


@pytest.mark.parametrize("damage", ["truncated weights", "corrupt training state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, straight, damage):
    run = tmp_path / "run"
    assert run_with_fault(run, kill_step=10).returncode == -signal.SIGKILL
    newest = run / "checkpoints" / "step-0000008"
    if damage == "truncated weights":
        path = newest / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    else:
        for path in newest.glob("train_state*"):
            path.write_bytes(b"\x00garbage" * 10)
    proc = igpt_cli("pretrain", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step-0000008 cannot be resumed from" in proc.stderr
    assert (run / "checkpoints" / ".step-0000008.unreadable").is_dir()  # set aside for a look, not deleted
    assert_same_run(run, straight)


@pytest.mark.parametrize("damage", ["truncated weights", "corrupt config"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(straight, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in (straight / "checkpoints" / f"step-{STEPS:07d}").iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    name = "model.safetensors" if damage == "truncated weights" else "config.json"
    (ckpt / name).write_bytes((ckpt / name).read_bytes()[:50])
    last = error_line(igpt_cli("sample", "--checkpoint", str(ckpt), "--n-images", "1", "--out", str(tmp_path / "s"),
                               "--device", "cpu"), "sample")
    assert str(ckpt / name) in last
    assert not (tmp_path / "s").exists()


def test_two_writers_on_one_run_the_second_is_refused(tmp_path):
    run = tmp_path / "run"
    first = start(run, "--max-steps", "1000000")  # still running while the second writer tries, however fast
    try:
        for args in (["--out", str(run), *FLAGS, "--data", "digits"], ["--resume", str(run)]):
            last = error_line(igpt_cli("pretrain", *args))
            assert f"is in use by process {first.pid}" in last
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == EXIT_STOPPED
    assert igpt_cli("pretrain", "--resume", str(run), "--max-steps", str(max(train_losses(run)) + 2)).returncode == 0


def test_readers_never_fail_while_a_run_prunes_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "igpt", "-q", "pretrain", *FLAGS, "--data", "digits",
                             "--ckpt-every", "1", "--keep-last", "1", "--max-steps", "150", "--out", str(run)],
                            stderr=subprocess.PIPE, text=True)
    loads, steps = 0, set()
    while proc.poll() is None:
        if list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []:
            steps.add(igpt.load(run).record.step)  # must never raise
            loads += 1
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert loads > 10 and len(steps) > 3  # it really read while checkpoints came and went


def test_resume_refuses_changed_inputs_and_flags_and_applies_the_changeable_ones(tmp_path):
    data = tmp_path / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8))
    original_data = data.read_bytes()
    run = tmp_path / "run"
    assert igpt_cli("pretrain", *FLAGS, "--data", str(data), "--max-steps", "4", "--out", str(run)).returncode == 0

    last = error_line(igpt_cli("pretrain", "--resume", str(run), "--max-steps", "6", "--lr", "5"))
    assert "--lr 5.0 (the run's is 0.003)" in last and "--max-steps 6" not in last
    palette = run / "palette.npz"
    original = palette.read_bytes()
    Palette.fit(rng.integers(0, 256, (500, 3), dtype=np.uint8), k=16, seed=1).save(palette)
    assert "was replaced" in error_line(igpt_cli("pretrain", "--resume", str(run)))
    palette.write_bytes(original)
    np.savez(data, x_train=rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8))
    assert "has changed since the run started" in error_line(igpt_cli("pretrain", "--resume", str(run)))
    assert max(train_losses(run)) == 4  # none of the refused resumes trained

    data.write_bytes(original_data)
    proc = igpt_cli("pretrain", "--resume", str(run), "--max-steps", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(train_losses(run)) == 6
    assert json.loads((run / "run.json").read_text())["train"]["max_steps"] == 6


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    run = tmp_path / "run"
    proc = igpt_cli("pretrain", *FLAGS, "--data", "digits", "--max-steps", "1", "--out", str(run),
                    preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


@pytest.mark.parametrize("command,flag,value", [
    ("pretrain", "--grad-clip", "-1"), ("pretrain", "--weight-decay", "-1"), ("pretrain", "--dist-timeout", "nan"),
    ("pretrain", "--log-every", "0"), ("pretrain", "--ckpt-every", "0"), ("pretrain", "--data", "missing.npz"),
    ("sample", "--temperature", "nan"), ("sample", "--temperature", "inf"),
])
def test_a_bad_flag_is_one_line_naming_it_and_leaves_nothing_behind(tmp_path, straight, command, flag, value):
    out = tmp_path / "out"
    if command == "pretrain":
        args = [*FLAGS, "--data", "digits", "--max-steps", "2", "--out", str(out), flag, value]
    else:
        args = ["--checkpoint", str(straight), "--n-images", "1", "--device", "cpu", "--out", str(out), flag, value]
    last = error_line(igpt_cli(command, *args), command)
    assert flag in last
    assert not out.exists()


def test_outputs_are_not_replaced_silently(tmp_path, straight):
    palette = tmp_path / "palette.npz"
    palette.write_bytes(b"precious")
    last = error_line(igpt_cli("palette", "fit", "--data", "digits", "--vocab-size", "4", "--out", str(palette)),
                      "palette")
    assert "already exists; pass --overwrite" in last and palette.read_bytes() == b"precious"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for command, args in [("demo", ["--out", str(mine)]),
                          ("sample", ["--checkpoint", str(straight), "--n-images", "1", "--out", str(mine)]),
                          ("prepare", ["--data", "digits", "--n-px", "8", "--out", str(mine)]),
                          ("pretrain", [*FLAGS, "--data", "digits", "--out", str(mine)])]:
        assert str(mine) in error_line(igpt_cli(command, *args), command)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# A signal that arrives at a chosen moment of a fine-tune or a probe: sent by the process to itself from
# inside the work, so the test does not race the work.
