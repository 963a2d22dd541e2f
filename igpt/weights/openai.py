"""OpenAI's released TF checkpoints -> GPT: the variable names and layouts of image-gpt's model.py (the
mapping table is in ``igpt.weights.hf``'s docstring), read with ``igpt.weights.tfbundle`` so no TensorFlow
is needed."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from igpt.config import ModelConfig
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord
from igpt.tensorfile import require_finite, require_tensors
from igpt.weights.tensors import build_model
from igpt.weights.tfbundle import TensorBundle


def _is_training_state(name: str) -> bool:
    """Optimizer slots, step counters and the (never released) classifier head: not model weights."""
    last = name.rsplit("/", 1)[-1]
    return (not name.startswith("model/") or "/clf/" in name or last in ("Adam", "Adam_1", "adam_m", "adam_v")
            or "AdamWeightDecayOptimizer" in name or last.endswith(("_step", "_power")))


def _openai_shapes(cfg: ModelConfig, with_sos: bool) -> dict[str, tuple[int, ...]]:
    d, V, H = cfg.n_embd, cfg.n_vocab, cfg.n_head
    shapes: dict[str, tuple[int, ...]] = {"model/wte": (V, d), "model/wpe": (cfg.n_ctx, d),
                                          "model/wtet": (V, d), "model/ln_f/g": (d,)}
    if with_sos:
        shapes["model/sos"] = (d,)
    for i in range(cfg.n_layer):
        p = f"model/h{i}/"
        shapes.update({p + "ln_1/g": (d,), p + "ln_2/g": (d,), p + "mlp/c_fc/w": (d, 4 * d),
                       p + "mlp/c_proj/w": (4 * d, d)})
        shapes.update({p + f"attn/{x}": (H, cfg.head_dim, d) for x in ("q_proj", "k_proj", "v_proj", "c_proj")})
    return shapes


def openai_config(shapes: Mapping[str, tuple[int, ...]], where: str,
                  objective: str | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, objective) read off the released variables' shapes; checks every tensor's shape.
    The objective is 'ar' when ``model/sos`` exists, else 'bert', unless given."""
    for name, rank in (("model/wte", 2), ("model/wpe", 2), ("model/h0/attn/q_proj", 3)):
        if name not in shapes or len(shapes[name]) != rank:
            what = "is missing" if name not in shapes else f"has shape {tuple(shapes[name])}"
            raise ValueError(f"{where}: tensor {name} {what}; not an image-gpt checkpoint")
    (V, d), (T, _), (H, _, _) = shapes["model/wte"], shapes["model/wpe"], shapes["model/h0/attn/q_proj"]
    n_layer = 0
    while f"model/h{n_layer}/ln_1/g" in shapes:
        n_layer += 1
    n_px = math.isqrt(T)
    if n_px * n_px != T:
        raise ValueError(f"{where}: tensor model/wpe has {T} positions, not a square image")
    has_sos = "model/sos" in shapes
    objective = objective or ("ar" if has_sos else "bert")
    if objective not in ("ar", "bert"):
        raise ValueError(f"objective must be 'ar' or 'bert', got {objective!r}")
    if objective == "ar" and not has_sos:
        raise ValueError(f"{where}: tensor model/sos is missing, and an AR model needs it (BERT checkpoints "
                         "have none: use --objective bert)")
    try:
        cfg = ModelConfig(n_layer=max(n_layer, 1), n_embd=d, n_head=H, n_px=n_px, n_vocab=V)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    weights = {k: tuple(v) for k, v in shapes.items() if not _is_training_state(k)}
    require_tensors(weights, _openai_shapes(cfg, has_sos), where)
    return cfg, objective


def openai_to_igpt(shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], np.ndarray], where: str,
                   objective: str | None = None,
                   progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Released TF variables -> (ModelConfig, GPT state dict, objective). ``read(name)`` returns one array."""
    cfg, objective = openai_config(shapes, where, objective)
    d = cfg.n_embd
    names = list(_openai_shapes(cfg, "model/sos" in shapes))
    quiet = not progress or sum(math.prod(shapes[n]) for n in names) < 1 << 24  # a bar only for big files
    with tqdm(names, desc="reading tensors", unit="tensor", disable=quiet) as bar:
        arrays = {n: torch.from_numpy(np.asarray(read(n), dtype=np.float32)) for n in bar}
    require_finite(arrays, where)
    sd = {"wte.weight": arrays["model/wte"], "wpe.weight": arrays["model/wpe"],
          "lm_head.weight": arrays["model/wtet"], "ln_f.weight": arrays["model/ln_f/g"],
          # BERT never reads the SOS vector; zeros keep GPT's parameter set uniform
          "sos": arrays.get("model/sos", torch.zeros(d))}
    take = arrays.pop  # each source array is dropped once copied, so iGPT-L never needs two full copies
    for i in range(cfg.n_layer):
        p, q = f"model/h{i}/", f"blocks.{i}."
        sd[q + "ln_1.weight"], sd[q + "ln_2.weight"] = take(p + "ln_1/g"), take(p + "ln_2/g")
        # [H, hd, d] -> [d (= h*hd + e), d]: already nn.Linear's [out, in] for q, k, v
        sd[q + "attn.c_attn.weight"] = torch.cat([take(p + f"attn/{x}_proj").reshape(d, d) for x in "qkv"])
        # c_proj [in = (h, e), out] and the MLP's [in, out] matrices -> nn.Linear's [out, in]
        sd[q + "attn.c_proj.weight"] = take(p + "attn/c_proj").reshape(d, d).T.contiguous()
        sd[q + "mlp.c_fc.weight"] = take(p + "mlp/c_fc/w").T.contiguous()
        sd[q + "mlp.c_proj.weight"] = take(p + "mlp/c_proj/w").T.contiguous()
    return cfg, sd, objective


def load_openai(prefix: str | Path, palette: str | Path | None = None, objective: str | None = None,
                progress: bool = False) -> tuple[GPT, Palette, CheckpointRecord]:
    """(model, palette, record) from a released checkpoint prefix; the palette defaults to a
    ``kmeans_centers.npy`` beside the checkpoint."""
    bundle = TensorBundle(prefix)
    where = str(bundle.index_path)
    cfg, objective = openai_config(bundle.shapes, where, objective)
    pal_path = Path(palette) if palette is not None else bundle.prefix.parent / "kmeans_centers.npy"
    if palette is None and not pal_path.is_file():
        raise FileNotFoundError(f"no palette: pass --palette kmeans_centers.npy (looked for {pal_path})")
    pal = Palette.load(pal_path)
    if pal.k != cfg.n_vocab:
        raise ValueError(f"palette {pal_path} has {pal.k} colours, but the checkpoint's model/wte has "
                         f"{cfg.n_vocab} rows")
    cfg, sd, objective = openai_to_igpt(bundle.shapes, bundle.read, where, objective, progress)
    match = re.search(r"ckpt-(\d+)$", bundle.prefix.name)
    step = int(match.group(1)) if match else None
    if step is None and "global_step" in bundle.entries:
        step = int(bundle.read("global_step"))
    source = {"format": "openai", "path": str(bundle.prefix), "palette": str(pal_path)}
    record = CheckpointRecord(cfg, pal.fingerprint(), objective, step=step, source=source)
    return build_model(cfg, sd, causal=record.reading.causal, where=where), pal, record
