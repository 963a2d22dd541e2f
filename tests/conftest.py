from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# vector-quantize-pytorch logs through loguru, whose default sink is the sys.stderr of the moment loguru is
# first imported. Imported first inside a test that captures output (capsys), the sink would be that test's
# stream, closed when it ends, and every later VQ-VAE build would print loguru's "Logging error" traceback
# into the next test's captured stderr. Imported here, the sink is the session's own stream.
import loguru  # noqa: F401,E402

from igpt.config import DataConfig, ModelConfig, TrainConfig
from igpt.data import sources
from igpt.data.open import open_split, prepare, resolve
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.train.pretrain import pretrain

# One thread per test process, and for the commands tests start: `make test` runs one pytest worker per core
# (pytest-xdist), and torch's default of one thread per core in each would oversubscribe the CPU, which slows
# tiny models many times over and makes their float sums depend on the load.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Tiny checkpoints in the released layout, written by real TensorFlow (scripts/make_tf_fixture.py)
OPENAI_FIXTURES = Path(__file__).parent / "fixtures" / "openai_tiny"
OPENAI_AR = OPENAI_FIXTURES / "ar" / "model.ckpt-131000"
OPENAI_BERT = OPENAI_FIXTURES / "bert" / "model.ckpt-262000"


def read_source(spec, n_px: int, **kw):
    """The splits a reader makes of ``--data spec`` (resolved as every command resolves it)."""
    d = resolve(spec)
    return sources.read(d.kind, d.path, n_px, **kw)


def tf_arrays(prefix: Path) -> dict[str, np.ndarray]:
    """What TensorFlow saved into a fixture checkpoint, by variable name."""
    with np.load(prefix.parent / "expected.npz") as f:
        return {k.replace("|", "/"): f[k] for k in f.files}


def randomize(model: GPT, seed: int = 0, scale: float = 0.3) -> GPT:
    """Give every parameter (including the zero-initialised head and unit gains) random values, so tests of
    dependence between positions cannot pass merely because logits are identically zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if ".ln_" in name or name.startswith("ln_f") else 0.0  # norm gains stay near 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + offset)
    return model


@pytest.fixture
def nano_config() -> ModelConfig:
    return ModelConfig.from_preset("igpt-nano", n_vocab=16, n_px=4)


@pytest.fixture
def nano_model(nano_config: ModelConfig) -> GPT:
    torch.manual_seed(0)
    return randomize(GPT(nano_config)).eval()


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not present (the shared data folder sits beside the repository)")
    return path


def openai_reference(w: dict[str, np.ndarray], ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """image-gpt's model.py on the TF tensors as TensorFlow wrote them (float64): per-head einsums with
    q/k/v/c_proj [H, hd, d], explicit -1e10 causal mask, [in, out] MLP matrices."""
    t = {k: torch.from_numpy(v).double() for k, v in w.items() if k.startswith("model/")}
    norm = lambda x, g: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g  # noqa: E731
    B, T = ids.shape
    _, hd, d = t["model/h0/attn/q_proj"].shape
    tok = t["model/wte"][ids]
    if keep is None:
        tok = torch.cat([t["model/sos"].expand(B, 1, d), tok[:, :-1]], 1)
    else:
        tok = tok * keep[..., None].double()
    h = tok + t["model/wpe"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.float64))
    i = 0
    while f"model/h{i}/ln_1/g" in t:
        p = f"model/h{i}/"
        x = norm(h, t[p + "ln_1/g"])
        q, k, v = (torch.einsum("bsf,hef->bhse", x, t[p + f"attn/{n}_proj"]) for n in "qkv")
        a = torch.einsum("bhse,bhte->bhst", q, k) / math.sqrt(hd)
        if keep is None:
            a = a * causal - 1e10 * (1 - causal)
        a = torch.einsum("bhst,bhte->bhse", a.softmax(-1), v)
        h = h + torch.einsum("bhse,hef->bsf", a, t[p + "attn/c_proj"])
        x = norm(h, t[p + "ln_2/g"]) @ t[p + "mlp/c_fc/w"]
        h = h + (x * torch.sigmoid(1.702 * x)) @ t[p + "mlp/c_proj/w"]
        i += 1
    return norm(h, t["model/ln_f/g"]) @ t["model/wtet"].T


# ---- tiny image data shared by the reader and cache tests


def rand_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 noise: no symmetry, so any flip or transpose shows."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def flat_pictures(n: int, seed: int, side: int = 8) -> np.ndarray:
    """(n, side, side, 3) uint8: two flat colours, top and bottom, and a white or black band on the left of
    varying width; enough structure for a VQ-VAE's codes and for two classes (odd and even)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, side, side, 3), np.uint8)
    for i in range(n):
        out[i, :side // 2], out[i, side // 2:] = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out[i, :, : 2 + i % 3] = 255 * (i % 2)
    return out


def smooth_image(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 gradients, which JPEG keeps close (noise it would not)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 128)], -1).astype(np.uint8)



@pytest.fixture
def npz_file(tmp_path: Path) -> tuple[Path, dict]:
    arrays = dict(x_train=rand_images(20, 8, 8, 1), y_train=np.arange(20, dtype=np.uint8) % 3,
                  x_test=rand_images(4, 8, 8, 2), y_test=np.array([0, 1, 2, 0], np.uint8),
                  label_names=np.array(["a", "b", "c"]))
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    return path, arrays


def write_openai(prefix: Path, n: dict[str, int], t: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng, out = np.random.default_rng(seed), {}
    for tag, count in n.items():
        out[f"{tag}X"] = rng.integers(0, 512, (count, t))
        out[f"{tag}Y"] = np.eye(10, dtype=np.float32)[rng.integers(0, 10, count)]
    for key, arr in out.items():
        np.save(f"{prefix}_{key}.npy", arr)
    return out


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """A two-step pretraining run with --sharded-checkpoint, written once; each test takes a copy."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    cfg = TrainConfig(batch_size=16, max_steps=2, warmup_steps=1, eval_every=0, log_every=1, ckpt_every=2,
                      device="cpu", sharded_checkpoint=True)
    pretrain(ModelConfig.from_preset("igpt-nano"), cfg, DataConfig(data="digits", vocab_size=16), run, progress=False)
    return run


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A 2-layer model (igpt-nano, 32 wide) pretrained for 100 steps on the digits: ``palette.npz`` (16
    colours), the ids ``cache`` and the ``run``, for the probe and fine-tuning tests. Built once per test
    process and only read by the tests, which write under their own ``tmp_path``."""
    root = tmp_path_factory.mktemp("digits")
    train = open_split("digits", "train", n_px=8, val_fraction=0.0)
    palette = Palette.fit(train.pixels, k=16, seed=0, device="cpu")
    palette.save(root / "palette.npz")
    prepare("digits", str(root / "cache"), n_px=8, tokenizer=palette, progress=False)
    cfg = TrainConfig(batch_size=32, max_steps=100, lr=1e-2, eval_every=0, ckpt_every=100, log_every=50,
                      device="cpu")
    pretrain(ModelConfig.from_preset("igpt-nano"), cfg,
             DataConfig(data=str(root / "cache"), tokenizer=str(root / "palette.npz")), root / "run", progress=False)
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory for a test that runs commands writing relative paths."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
