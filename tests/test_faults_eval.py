"""Evaluation and fine-tuning interrupted by SIGTERM: the stop is one line, and the same command (or --resume)
continues to the uninterrupted result."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from igpt.stop import EXIT_STOPPED
from test_faults import FLAGS, STEPS, error_line, igpt_cli

pytestmark = pytest.mark.slow  # every test runs the command line in subprocesses


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A short pretraining run whose checkpoint the interrupted commands read."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert igpt_cli("pretrain", *FLAGS, "--data", "digits", "--max-steps", str(STEPS), "--out", str(run)).returncode == 0
    return run


# A SIGTERM sent from inside the at-th call of a function, as a cluster would send it mid-run.
SIGNAL_AT = """
import importlib, signal, sys
from igpt.cli import main
where, at = {where!r}, {at}
calls = [0]
def hook(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            signal.raise_signal(signal.SIGTERM)  # handled before it returns, unlike os.kill
        return real(*args, **kwargs)
    return wrapped
module, name = where.split(":")
owner = importlib.import_module(module)
if "." in name:  # a method: Class.method
    cls, method = name.split(".")
    setattr(getattr(owner, cls), method, hook(getattr(getattr(owner, cls), method)))
else:
    setattr(owner, name, hook(getattr(owner, name)))
sys.exit(main(sys.argv[1:]))
"""


def run_signalled(where: str, at: int, *args: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(SIGNAL_AT).format(where=where, at=at)
    return subprocess.run([sys.executable, "-c", script, "-q", *args], capture_output=True, text=True, timeout=180)


def test_finetune_stops_on_sigterm_and_resumes_to_the_straight_result(tmp_path, straight):
    flags = ["--checkpoint", str(straight), "--data", "digits", "--max-steps", "9", "--eval-every", "3",
             "--batch-size", "16", "--labels-per-class", "20", "--augment", "cifar", "--device", "cpu"]
    assert igpt_cli("finetune", *flags, "--out", str(tmp_path / "straight")).returncode == 0
    out = tmp_path / "ft"
    proc = run_signalled("igpt.data.streams:LabelledBatchStream.next", 5, "finetune", *flags, "--out", str(out))
    assert proc.returncode == EXIT_STOPPED and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"igpt finetune --resume {out}" in proc.stderr.strip().splitlines()[-1]
    assert (out / "last" / "config.json").is_file() and not (out / "metrics.json").exists()
    assert "leave out --data" in error_line(igpt_cli("finetune", "--resume", str(out), "--data", "digits"),
                                            "finetune")
    proc = igpt_cli("finetune", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "straight"))
    assert {k: got[k] for k in ("val_acc", "best_step", "test_acc", "steps")} == \
        {k: want[k] for k in ("val_acc", "best_step", "test_acc", "steps")}
    assert (out / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert not (out / "last").exists()  # finished: only the best checkpoint remains


def test_feature_extraction_stops_on_sigterm_and_the_same_command_continues(tmp_path, straight):
    args = ["probe", "--checkpoint", str(straight), "--data", "digits", "--batch-size", "100", "--device", "cpu"]
    assert igpt_cli(*args, "--out", str(tmp_path / "straight")).returncode == 0
    out = tmp_path / "probe"
    proc = run_signalled("igpt.eval.features:_split_feats", 4, *args, "--out", str(out))
    assert proc.returncode == EXIT_STOPPED and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "the same command continues" in proc.stderr.strip().splitlines()[-1]
    # the first split's store holds the batches done before the signal, and says so; nothing else is written
    records = [json.loads(p.read_text()) for p in out.glob("feats-*/progress.json")]
    assert len(records) == 1 and 0 < records[0]["done"] < records[0]["n"], records
    assert not (out / "metrics.json").exists()
    proc = igpt_cli(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in out.glob("feats-*/progress.json")]
    assert len(records) == 2 and all(r["done"] == r["n"] for r in records)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "straight"))
    assert got["probes"] == want["probes"]
