"""Faults of outputs: ``--overwrite`` replaces only what the command wrote, nothing is deleted from under a
process holding a lock, and a picture too large to write is refused before the sampling that would fill it.
In-process (``igpt.cli.main``): a subprocess holds the lock where another process must."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

import igpt
import igpt.bench.demo
from igpt.cli import main
from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.lock import LOCK_FILE, DirLock
from igpt.train.pretrain import pretrain

generating = importlib.import_module("igpt.generate.complete")  # igpt.generate.complete is also a function's name


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("outputs") / "run"
    pretrain(ModelConfig.from_preset("igpt-nano"),
             TrainConfig(max_steps=2, batch_size=8, device="cpu", eval_every=0, log_every=1),
             DataConfig(data="digits", vocab_size=16), run, progress=False)
    return run


@contextmanager
def held_by_another_process(directory: Path):
    """``directory``'s lock, held by a live child process (as a training run holds its run directory's)."""
    code = textwrap.dedent(f"""
        import sys, time
        from igpt.lock import DirLock
        DirLock({str(directory)!r}).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def refused(argv: list[str], capsys) -> str:
    """The one-line error of a refused command (exit status 2)."""
    capsys.readouterr()  # what commands before it printed
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"igpt {argv[0]}: error: "), err
    return err


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def sample_args(run: Path, out: Path, n: int = 2) -> list[str]:
    return ["sample", "--checkpoint", str(run), "--n-images", str(n), "--device", "cpu", "--out", str(out)]


def test_overwrite_replaces_an_earlier_sample_and_nothing_else(run, tmp_path, capsys):
    earlier = tmp_path / "earlier"
    assert main(sample_args(run, earlier, n=3)) == 0
    assert main(sample_args(run, earlier, n=2) + ["--overwrite", "--seed", "1"]) == 0  # an earlier sample: replaced
    assert sorted(p.name for p in earlier.iterdir()) == ["grid.png", "provenance.json", "sample-0000.png",
                                                         "sample-0001.png"]

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    stale = tmp_path / "stale-lock"  # an earlier sample beside the lock file of a process that has ended
    assert main(sample_args(run, stale)) == 0
    (stale / LOCK_FILE).write_text("process 1 (igpt pretrain)\n")
    before = {d: tree(d) for d in (run, mine, stale, earlier)}
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    for out, needle in [(run, "holds checkpoints, which igpt sample does not write"), (checkpoint, "holds config.json"),
                        (mine, "holds notes.txt"), (stale, "holds .lock")]:
        err = refused(sample_args(checkpoint, out) + ["--overwrite"], capsys)
        assert str(out) in err and needle in err and "not an earlier output of igpt sample" in err
    for out in (run, earlier):  # complete writes other names than sample: a sample's output is not its own
        err = refused(["complete", "--checkpoint", str(run), "--data", "digits", "--n-images", "1", "--out", str(out),
                       "--overwrite", "--device", "cpu"], capsys)
        assert "igpt complete does not write" in err
    assert {d: tree(d) for d in before} == before


@pytest.mark.slow  # a second process holds the directory
def test_overwrite_refuses_a_directory_a_live_process_holds_naming_it(run, tmp_path, capsys):
    training = tmp_path / "training"  # a run still training: its run.json, its palette and its lock
    training.mkdir()
    (training / "run.json").write_text("{}")
    (training / "palette.npz").write_bytes(b"the run's")
    with held_by_another_process(training) as pid:
        for argv in (sample_args(run, training),
                     ["prepare", "--data", "digits", "--n-px", "8", "--out", str(training)],
                     ["palette", "fit", "--data", "digits", "--vocab-size", "4",
                      "--out", str(training / "palette.npz")]):
            err = refused(argv + ["--overwrite"], capsys)
            assert f"{training} is in use by process {pid}" in err, err
    assert sorted(p.name for p in training.iterdir()) == [LOCK_FILE, "palette.npz", "run.json"]
    assert (training / "palette.npz").read_bytes() == b"the run's"


@pytest.mark.slow  # a second process holds the run
def test_demo_never_deletes_a_run_another_process_holds(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / igpt.bench.demo.DEMO_MARK).touch()
    (out / "run" / "run.json").write_text("{}")  # the demo's run, resumed by hand and still training
    started = []
    monkeypatch.setattr(igpt.bench.demo, "_demo", lambda *a: started.append(a) or {})  # the pipeline itself is not run
    with held_by_another_process(out / "run") as pid:
        with pytest.raises(ValueError, match=f"run is in use by process {pid}") as e:
            igpt.bench.demo.run_demo(out, steps=1, progress=False)
        assert len(str(e.value).splitlines()) == 1
        assert (out / "run" / "run.json").exists() and not started
    igpt.bench.demo.run_demo(out, steps=1, progress=False)  # once that process has ended, the demo starts afresh
    assert started and not (out / "run").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--scale", "3000"], "--scale 3000: each sample-NNNN.png would be 24000x24000 pixels"),
    (["--n-images", "100000000"], "--n-images 100000000 --ncol 8 --scale 4: grid.png would be"),
    (["--n-images", "100000", "--ncol", "100000", "--scale", "1"], "--ncol 100000 --scale 1: grid.png would be"),
])
def test_a_sample_too_large_to_write_is_refused_before_sampling(run, tmp_path, monkeypatch, capsys, flags, needle):
    def never(*a, **kw):
        raise AssertionError("sampled before the size was checked")

    monkeypatch.setattr(generating, "sample", never)
    out = tmp_path / "out"
    err = refused(sample_args(run, out) + flags, capsys)
    assert needle in err and "at most 65535 pixels a side and 89 million pixels" in err
    assert not out.exists()


@pytest.mark.parametrize("flags,needle", [
    (["--scale", "3000"], "--n-samples 4 --scale 3000: completions.png would be"),
    (["--n-samples", "100000"], "--n-images 2 --n-samples 100000 --scale 4: completions.png would be"),
])
def test_a_completion_too_large_to_write_is_refused_before_completing(run, tmp_path, monkeypatch, capsys, flags,
                                                                      needle):
    def never(*a, **kw):
        raise AssertionError("completed before the size was checked")

    monkeypatch.setattr(generating, "sample", never)
    out = tmp_path / "out"
    err = refused(["complete", "--checkpoint", str(run), "--data", "digits", "--n-images", "2", "--device", "cpu",
                   "--out", str(out), *flags], capsys)
    assert needle in err and not out.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_current_directory_is_never_replaced(run, tmp_path, monkeypatch, capsys, overwrite):
    here = tmp_path / "here"
    assert main(sample_args(run, here)) == 0  # an earlier sample: what --overwrite may replace, except here
    before = tree(here)
    monkeypatch.chdir(here)
    for out in (".", ""):
        err = refused(sample_args(run, Path(out)) + ["--overwrite"] * overwrite, capsys)
        assert "--out . is the current directory or holds it" in err and "name a new directory" in err
    err = refused(sample_args(run, here.parent) + ["--overwrite"] * overwrite, capsys)
    assert "is the current directory or holds it" in err
    assert tree(here) == before


def test_save_with_overwrite_replaces_an_earlier_save_and_nothing_else(run, tmp_path):
    model, palette, _ = igpt.load(run)
    earlier = igpt.save(model, palette, tmp_path / "earlier")
    igpt.save(model, palette, earlier, overwrite=True)  # an earlier igpt.save: replaced
    before = tree(run)
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    for out, needle in [(run, "holds checkpoints"), (checkpoint, "holds train_state.json")]:
        with pytest.raises(ValueError, match=f"{needle}, which igpt.save does not write"):
            igpt.save(model, palette, out, overwrite=True)
    assert tree(run) == before
