"""``igpt serve`` under faults: the files Gradio writes for every picture the page shows (bounded while the
server runs, gone when it stops, also on SIGTERM and Ctrl-C), an address it cannot listen on (one line naming
the flag, before the model is read), and messages that name what the reader sees: the page's controls, not
the command line's flags; a VQ-VAE tokenizer, not a palette. docs/reliability.md tabulates them."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import flat_pictures
from test_serve import CPU, ROOT, _free_port, _run, _wait_for_server
from igpt.cli import main
from igpt.config import DataConfig, ModelConfig, ServeConfig, TrainConfig
from igpt.config.tokenizer import TokenizerFitConfig, VQConfig
from igpt.data.open import prepare
from igpt.serve import Draw, Engine, serving
from igpt.serve.page import _draw
from igpt.serve.server import FOLDER_PREFIX
from igpt.tokenizers import load_tokenizer
from igpt.train import pretrain, resume
from igpt.train.tokenizer import fit_tokenizer

@pytest.fixture(scope="module")
def ar_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("ar"), "ar")


def _entries(folder: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(folder))


def _wait_until(condition, what: str, deadline_s: float = 300.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"still not {what} after {deadline_s:.0f} s")
        time.sleep(0.2)


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process ``pid`` listens on, from /proc (IPv4 as dotted quads; IPv6 as hex)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in (Path(f"/proc/{pid}/net/tcp"), Path(f"/proc/{pid}/net/tcp6")):
        for line in (table.read_text().splitlines()[1:] if table.exists() else []):  # tcp6: when IPv6 is on
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # state 0A: LISTEN
                host, port = cols[1].split(":")
                if len(host) == 8:
                    host = socket.inet_ntoa(bytes.fromhex(host)[::-1])
                found.add((host, int(port, 16)))
    return found


# ---- the page's files


@pytest.mark.slow  # starts a server
def test_the_page_keeps_its_files_in_a_folder_of_its_own_bounded_and_removed_on_close(ar_run, tmp_path,
                                                                                        monkeypatch):
    from gradio_client import Client

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the server's folder, and Gradio's default, would go
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", None)
    engine = Engine(ar_run, ServeConfig(port=_free_port(), cache_s=1), CPU)
    with serving(engine) as served:
        folder = served.folder
        assert folder.parent == tmp_path and folder.name.startswith(FOLDER_PREFIX)
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
        client = Client(served.url, download_files=False, verbose=False)
        shown = []
        for seed in range(8):  # each sample grows row by row: a new PNG per image per row
            images, status = client.predict(2, 1.0, 0, seed, api_name="/sample")
            assert status.startswith("**Done:**") and len(images) == 2
            shown += [Path(image["image"]["path"]) for image in images]
        assert all(folder in path.parents for path in shown)  # every picture of the page is in its folder
        # files older than --cache-s go, and so do the folders Gradio kept each one in: what stays is the
        # model card's swatch (one file in one folder), however many requests came before
        _wait_until(lambda: _entries(folder) <= 2, "down to the swatch")
        assert not any(path.exists() or path.parent.exists() for path in shown)
        assert next(folder.rglob("*.png")).stat().st_size > 0
    assert not folder.exists() and "GRADIO_TEMP_DIR" not in os.environ
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(FOLDER_PREFIX) or p.name == "gradio"]


@pytest.mark.slow  # two servers started in subprocesses: Gradio takes a while to import
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_the_server_and_remove_its_files(ar_run, tmp_path, signum):
    from gradio_client import Client

    port, temp = _free_port(), tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("GRADIO_TEMP_DIR", None)
    # Ctrl-C as in an interactive shell: a runner started in the background passes on an ignored SIGINT, and
    # Python installs its KeyboardInterrupt handler only over the default disposition
    proc = subprocess.Popen([sys.executable, "-m", "igpt", "serve", "--checkpoint", str(ar_run), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_server(proc, port)
        assert _listening(proc.pid) == {("127.0.0.1", port)}  # the address asked for, and no other
        images, _ = Client(f"http://127.0.0.1:{port}/", download_files=False, verbose=False).predict(
            2, 1.0, 0, 0, api_name="/sample")
        folders = [p for p in temp.iterdir() if p.name.startswith(FOLDER_PREFIX)]
        assert len(folders) == 1 and folders[0] in Path(images[0]["image"]["path"]).parents
        with urllib.request.urlopen(images[0]["image"]["url"]) as response:  # served from there
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=300)  # a deadline for a hung stop, not a speed limit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == "igpt serve: stopped; its temporary files are removed"
    assert not [p.name for p in temp.iterdir() if p.name.startswith(FOLDER_PREFIX) or p.name == "gradio"]


# ---- where it listens


def test_a_busy_port_or_a_bad_host_is_one_line_naming_the_flag_before_the_model_is_read(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [(["--port", str(port)], f"--port {port}: already in use on 127.0.0.1"),
                 (["--host", "999.1.1.1"], "--host 999.1.1.1: no address of that name"),
                 (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: no address of that name"),
                 (["--host", "192.0.2.1"], "--host 192.0.2.1: not an address of this machine"),  # TEST-NET-1
                 (["--host", " "], "--host must name an address")]
        for flags, message in cases:
            # a checkpoint that is not there: reading it first would be a different error
            assert main(["serve", "--checkpoint", str(tmp_path / "no-such-run"), *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"igpt serve: error: {message}") and len(err.splitlines()) == 1, err


def test_a_port_taken_after_the_check_is_one_line_and_leaves_no_folder(ar_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"^--port {port}: already in use") as e:
            with serving(Engine(ar_run, ServeConfig(port=port), CPU)):
                pass
    assert len(str(e.value).splitlines()) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(FOLDER_PREFIX) or p.name == "gradio"]
    assert "GRADIO_TEMP_DIR" not in os.environ


# ---- messages in the reader's words


def test_the_page_names_its_own_controls_not_the_command_line_flags(ar_run):
    engine = Engine(ar_run, ServeConfig(), CPU)
    for draw, message in ((Draw(temperature=math.nan), "Temperature must be a finite number >= 0"),
                          (Draw(temperature=-1.0), "Temperature must be a finite number >= 0"),
                          (Draw(top_k=-1), "Top-k must be >= 0"),
                          (Draw(seed=2**32), "Seed must be in 0..4294967295")):
        with pytest.raises(ValueError, match=f"^{message}") as e:
            next(engine.sample(draw))
        assert "--" not in str(e.value)
    # what the page's API passes through (NaN and infinities pass Gradio's range checks), named as labelled
    for args, label in (((math.nan, 1.0, 0, 0), "Images"), ((2, math.nan, 0, 0), "Temperature"),
                        ((2, 1.0, math.inf, 0), "Top-k"), ((2, 1.0, 0, -math.inf), "Seed")):
        with pytest.raises(ValueError, match=f"^{label} must be a finite number, not"):
            _draw(*args)
    assert _draw(2, 0.5, 3, None) == Draw(n=2, temperature=0.5, top_k=3, seed=0)


def test_a_replaced_vq_tokenizer_is_called_a_tokenizer_not_a_palette(tmp_path):
    tiny = VQConfig(input_side=8, factor=2, vocab_size=8, code_dim=4, hidden=8, res_blocks=1, kmeans_iters=2)
    fit = TokenizerFitConfig(steps=1, batch_size=16, eval_every=1, log_every=1, ckpt_every=1, val_images=8,
                             device="cpu")
    npz = tmp_path / "pictures.npz"
    np.savez(npz, x_train=flat_pictures(48, 0))
    fit_tokenizer(str(npz), tmp_path / "tok", tiny, fit, progress=False)
    fit_tokenizer(str(npz), tmp_path / "other", tiny, TokenizerFitConfig(**{**fit.to_dict(), "seed": 1}),
                  progress=False)
    tok, other = tmp_path / "tok" / "tokenizer.safetensors", tmp_path / "other" / "tokenizer.safetensors"
    model = ModelConfig.from_preset("igpt-nano", n_px=4)
    train = TrainConfig(max_steps=1, batch_size=8, eval_every=0, log_every=1, ckpt_every=1, device="cpu", workers=0)
    run = tmp_path / "run"
    pretrain(model, train, DataConfig(data=str(npz), tokenizer=str(tok)), run, progress=False)
    (run / "tokenizer.safetensors").write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match="has tokenizer .* was replaced; put the run's tokenizer back") as e:
        resume(run, changes={"max_steps": 2}, progress=False)
    assert "has palette" not in str(e.value) and "palette back" not in str(e.value)
    # data prepared with one VQ-VAE, trained with another: the same words
    prepare(npz, tmp_path / "cache", n_px=8, tokenizer=load_tokenizer(tok), progress=False)
    with pytest.raises(ValueError, match="ids were made with tokenizer .* the tokenizer given is") as e:
        pretrain(model, train, DataConfig(data=str(tmp_path / "cache"), tokenizer=str(other)), tmp_path / "run2",
                 progress=False)
    assert "with palette" not in str(e.value) and "palette given" not in str(e.value)
