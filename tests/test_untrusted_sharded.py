"""Sharded checkpoints' index (``sharded/.metadata``, a pickle by torch's format) is never unpickled: a
hostile one is refused by the command line, read only when the record declares a sharded checkpoint, and a
damaged one is a one-line error naming it (docs/reliability.md, "What igpt trusts")."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

import igpt
from igpt.train.pretrain import resume
from igpt.weights.sharded import read_metadata
from test_untrusted import STEP, as_pickle, checkpoint


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "igpt", "-q", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


@pytest.mark.slow  # runs the command line in a subprocess
@pytest.mark.parametrize("command", ["sample", "resume"])
def test_the_cli_refuses_hostile_sharded_metadata(command, sharded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    metadata = run / STEP / "sharded" / ".metadata"
    marker = tmp_path / "MARKER"
    as_pickle(metadata, marker)
    if command == "sample":
        proc = cli("sample", "--checkpoint", str(run / STEP), "--n-images", "1", "--out", str(tmp_path / "s"),
                   "--device", "cpu")
    else:
        proc = cli("pretrain", "--resume", str(run))
    assert not marker.exists()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(metadata) in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]


def test_sharded_metadata_is_read_only_when_the_record_declares_it(tmp_path):
    """A full checkpoint with a hostile sharded/.metadata beside its weights loads from model.safetensors."""
    ckpt = checkpoint(tmp_path)
    (ckpt / "sharded").mkdir()
    as_pickle(ckpt / "sharded" / ".metadata", tmp_path / "MARKER")
    assert not igpt.load(ckpt).record.sharded
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "not metadata", "outside its directory"])
def test_a_damaged_sharded_index_is_a_one_line_error_naming_it(damage, sharded_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    metadata = run / STEP / "sharded" / ".metadata"
    if damage == "truncated":
        metadata.write_bytes(metadata.read_bytes()[:200])
    elif damage == "empty":
        metadata.write_bytes(b"")
    elif damage == "missing":
        metadata.unlink()
    elif damage == "not metadata":
        metadata.write_bytes(pickle.dumps({"storage_data": {}}))
    else:  # a shard "file" that is really a file elsewhere
        index = read_metadata(metadata)
        key = next(iter(index.storage_data))
        index.storage_data[key] = replace(index.storage_data[key], relative_path="../../../run.json")
        metadata.write_bytes(pickle.dumps(index))
    for front in (lambda: igpt.load(run / STEP), lambda: resume(run, progress=False)):
        with pytest.raises(ValueError) as info:
            front()
        assert "\n" not in str(info.value) and str(metadata) in str(info.value), str(info.value)
