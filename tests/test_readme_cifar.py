"""The README's typical CIFAR-10 run, as written, on a tiny CIFAR-10 in torchvision's format
(cifar-10-batches-py), scaled down only in size; and the quality protocol packing that format."""

from __future__ import annotations

import io
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import rand_images
from test_sources import write_cifar

from igpt.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
# what makes the run tiny: the README's text -> the test's (each must be found in the README)
SMALLER = {"--preset igpt-bench": "--preset igpt-nano", "--n-px 32": "--n-px 8", "--max-steps 20000": "--max-steps 2",
           "--batch-size 64": "--batch-size 4", "--sample-every 1000": "--sample-every 2",
           "--out cifar-palette.npz": "--out cifar-palette.npz --vocab-size 16"}


@pytest.fixture
def cifar_folder(tmp_path: Path) -> Path:
    """cifar-10-batches-py as torchvision unpacks it: five training batches, a test batch and batches.meta."""
    x, y = rand_images(24, 32, 32, 3), [k % 10 for k in range(24)]
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    batches = {n: (x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) for i, n in enumerate(names)}
    root = tmp_path / "data" / "cifar-10-batches-py"
    write_cifar(root, batches, b"labels", "batches.meta", {b"label_names": [f"c{k}".encode() for k in range(10)]},
                protocol=2)
    return root


def _typical_run() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"A typical CIFAR-10 run.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split("#")[0]) for line in lines if line.strip()]


def test_the_readmes_typical_cifar_run_works_on_a_torchvision_folder(cifar_folder, tmp_path, monkeypatch, capsys):
    commands = _typical_run()
    assert [c[:2] for c in commands] == [["igpt", "palette"], ["igpt", "prepare"], ["igpt", "pretrain"],
                                         ["igpt", "pretrain"]]
    joined = " ".join(" ".join(c) for c in commands)
    for old in SMALLER:
        assert old in joined, f"the README's run no longer has {old}"
    monkeypatch.chdir(tmp_path)
    for command in commands:
        line = " ".join(command[1:]).replace("~/data/cifar-10-batches-py", str(cifar_folder))
        for old, new in SMALLER.items():
            line = line.replace(old, new)
        assert main(line.split()) == 0, line
    run = tmp_path / "runs" / "c10"
    assert (run / "checkpoints" / "step-0000002").is_dir() and (run / "samples" / "step-0000002.png").is_file()
    assert (run / "curves.png").is_file() and "val_loss=" in capsys.readouterr().err


def test_quality_pack_reads_a_torchvision_folder_with_every_test_image_exact(cifar_folder, tmp_path):
    out = tmp_path / "ids.tar.xz"
    assert main(["bench", "quality", "pack", "--data", str(cifar_folder), "--out", str(out), "--n-px", "8",
                 "--vocab-size", "8", "--device", "cpu"]) == 0
    with tarfile.open(out) as tar:
        mask = np.load(io.BytesIO(tar.extractfile("cifar-ids/test_lossless.npy").read()))
    assert mask.dtype == bool and mask.shape == (4,) and mask.all()
