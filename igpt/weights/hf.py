"""Weights in and out: OpenAI's released TensorFlow checkpoints and Hugging Face's ImageGPT directories.

``hf_to_igpt`` / ``igpt_to_hf`` map Hugging Face ``ImageGPTForCausalImageModeling`` weights to ``GPT``'s and
back; ``igpt.weights.openai.openai_to_igpt`` maps the released TF variables (read by ``igpt.weights.tfbundle``,
no TensorFlow needed).
d = n_embd, V = palette colours (512), T = n_px**2, H = n_head, hd = d / H, i = block index.

| Hugging Face (``transformer.`` + name)        | shape   | igpt (GPT)                  | shape   | how       |
|-----------------------------------------------|---------|-----------------------------|---------|-----------|
| wte.weight rows 0..V-1                        | [V+1,d] | wte.weight                  | [V, d]  | as is     |
| wte.weight row V (the SOS id)                 |         | sos                         | [d]     | as is     |
| wpe.weight, ln_f.weight, h.i.ln_1/ln_2.weight |         | same names (h.i -> blocks.i)|         | as is     |
| h.i.attn.c_attn.weight                        | [d, 3d] | blocks.i.attn.c_attn.weight | [3d, d] | transpose |
| h.i.attn.c_proj.weight                        | [d, d]  | blocks.i.attn.c_proj.weight | [d, d]  | transpose |
| h.i.mlp.c_fc.weight                           | [d, 4d] | blocks.i.mlp.c_fc.weight    | [4d, d] | transpose |
| h.i.mlp.c_proj.weight                         | [4d, d] | blocks.i.mlp.c_proj.weight  | [d, 4d] | transpose |
| lm_head.weight (no prefix)                    | [V, d]  | lm_head.weight              | [V, d]  | as is     |
| h.i.{attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj}.bias: iGPT has none; must be exactly 0, exported as 0 |
| h.i.attn.bias, h.i.attn.masked_bias           |         | (old causal-mask buffers)   |         | ignored   |

HF's Conv1D stores [in, out], ``nn.Linear`` [out, in]: hence the transposes. ``c_attn``'s output columns are
[q | k | v], each in ``h * hd + e`` order, exactly our row order. HF's vocabulary has V + 1 ids, the last one
the SOS, which its processor does *not* prepend: ``model(ids)`` here equals HF fed ``[V] + ids[:-1]``.

| OpenAI TF                                 | shape          | igpt                        | how                      |
|-------------------------------------------|----------------|-----------------------------|--------------------------|
| model/wte, model/wpe, model/wtet          | [V,d] [T,d] [V,d] | wte, wpe, lm_head .weight | as is                    |
| model/sos                                 | [d]            | sos                         | as is; BERT: absent, 0s  |
| model/h{i}/ln_1/g, ln_2/g, model/ln_f/g   | [d]            | the norms' .weight          | as is                    |
| model/h{i}/attn/q_proj, k_proj, v_proj    | [H, hd, d]     | blocks.i.attn.c_attn.weight | reshape(d, d), [q; k; v] |
| model/h{i}/attn/c_proj                    | [H, hd, d]     | blocks.i.attn.c_proj.weight | reshape(d, d), transpose |
| model/h{i}/mlp/c_fc/w, mlp/c_proj/w       | [d,4d] [4d,d]  | blocks.i.mlp.*.weight       | transpose                |
| Adam slots, *_power, global_step, clf/*   |                | (training state)            | ignored                  |
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from igpt.atomic import read_json, replacing_dir, require_new, write_json, write_text
from igpt.config import ModelConfig
from igpt.model import GPT, NORM_EPS
from igpt.tokenizers import AnyTokenizer, Palette, require_palette
from igpt.record import CheckpointRecord
from igpt.weights.card import model_card
from igpt.tensorfile import require_fields, require_tensors
from igpt.weights.tensors import build_model, load_weight_file, read_shapes, save_tensors

HF_CONFIG, HF_PROCESSOR, HF_CARD = "config.json", "preprocessor_config.json", "README.md"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded snapshots
# ImageGPTConfig's defaults: save_pretrained writes only the values that differ from them.
_HF_DEFAULTS: dict[str, Any] = dict(vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8,
                                    n_inner=None, activation_function="quick_gelu", layer_norm_epsilon=1e-5,
                                    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                                    add_cross_attention=False)
_HF_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
               "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
_HF_BIASES = ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")
_HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---- Hugging Face ----

def is_hf_dir(path: str | Path) -> bool:
    """True for a directory whose config.json says ``"model_type": "imagegpt"`` (explicit, not key sniffing)."""
    cfg = Path(path) / HF_CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "imagegpt"
    except (OSError, ValueError, AttributeError):
        return False


def _hf_model_config(hf: Mapping[str, Any], where: str) -> ModelConfig:
    """Our ModelConfig from an ImageGPT config.json; refuses settings GPT cannot reproduce."""
    c = {**_HF_DEFAULTS, **{_HF_ALIASES.get(k, k): v for k, v in hf.items()}}
    if c.get("model_type") != "imagegpt":
        raise ValueError(f"{where}: model_type is {c.get('model_type')!r}, not 'imagegpt'")
    spelled = {_HF_ALIASES.get(k, k): k for k in hf}
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):  # int() would truncate 2.5 to 2
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
            raise ValueError(f"{where}: {spelled.get(key, key)} must be a positive integer, got {c[key]!r}")
    if not isinstance(c["layer_norm_epsilon"], (int, float)):
        raise ValueError(f"{where}: layer_norm_epsilon must be a number, got {c['layer_norm_epsilon']!r}")
    d, T = c["n_embd"], c["n_positions"]
    n_px = math.isqrt(T)
    fits = {"n_positions": n_px * n_px == T, "n_inner": c["n_inner"] in (None, 4 * d),
            "activation_function": c["activation_function"] == "quick_gelu",
            "layer_norm_epsilon": abs(c["layer_norm_epsilon"] - NORM_EPS) < 1e-12,
            "scale_attn_weights": bool(c["scale_attn_weights"]),
            "scale_attn_by_inverse_layer_idx": not c["scale_attn_by_inverse_layer_idx"],
            "add_cross_attention": not c["add_cross_attention"]}
    bad = next((key for key, ok in fits.items() if not ok), None)
    if bad is not None:
        raise ValueError(f"{where}: {bad} = {c[bad]!r} cannot be represented by igpt's model (it needs a square "
                         "n_positions, n_inner 4*n_embd, quick_gelu, eps 1e-5, scaled attention, no cross-attention)")
    try:
        return ModelConfig(n_layer=c["n_layer"], n_embd=d, n_head=c["n_head"], n_px=n_px, n_vocab=c["vocab_size"] - 1)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of ImageGPTForCausalImageModeling (without the 'transformer.' prefix) and its shape."""
    d, V = cfg.n_embd, cfg.n_vocab
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V + 1, d), "wpe.weight": (cfg.n_ctx, d),
                                          "ln_f.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_2.weight": (d,),
                       p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                       p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
                       p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)})
    return shapes


def hf_to_igpt(state: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any],
               where: str = "Hugging Face weights") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """HF ImageGPT tensors (with or without the 'transformer.' prefix) -> (ModelConfig, GPT state dict)."""
    cfg = _hf_model_config(hf_config, where)
    original: dict[str, str] = {}
    for key in state:
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers saved by old transformers versions; not weights
        original[key.removeprefix("transformer.")] = key
    src = {k: state[v] for k, v in original.items()}
    _require_hf_shape(hf_config, cfg, {k: tuple(v.shape) for k, v in state.items()}, where, where)
    require_tensors({k: tuple(v.shape) for k, v in src.items()}, _hf_shapes(cfg), where,
                    shown=lambda k: original.get(k, "transformer." * (k != "lm_head.weight") + k))
    for i in range(cfg.n_layer):
        for b in _HF_BIASES:
            t = src[f"h.{i}.{b}"]
            if t.count_nonzero():  # tolerance 0: any bias changes the function and GPT has nowhere to put it
                raise ValueError(f"{where}: bias {original[f'h.{i}.{b}']} is not zero (max |b| = "
                                 f"{t.abs().max().item():.3g}); iGPT has no biases, so this model cannot be "
                                 "represented exactly")
    f32 = {k: v.detach().to("cpu", torch.float32) for k, v in src.items()}
    # wte and sos are cloned so that they do not share storage (safetensors refuses shared tensors)
    out = {"wte.weight": f32["wte.weight"][:cfg.n_vocab].clone(), "sos": f32["wte.weight"][cfg.n_vocab].clone(),
           "wpe.weight": f32["wpe.weight"], "ln_f.weight": f32["ln_f.weight"], "lm_head.weight": f32["lm_head.weight"]}
    for i in range(cfg.n_layer):
        for name in ("ln_1.weight", "ln_2.weight"):
            out[f"blocks.{i}.{name}"] = f32[f"h.{i}.{name}"]
        for name in _HF_TRANSPOSED:
            out[f"blocks.{i}.{name}"] = f32[f"h.{i}.{name}"].T
    return cfg, {k: v.contiguous() for k, v in out.items()}  # copies only the transposed matrices


def igpt_to_hf(model: GPT, head: torch.Tensor | None = None, classes: Sequence[str] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """GPT -> (ImageGPTForCausalImageModeling state dict with zero biases, config.json dict). With a fine-tuned
    ``head`` (n_classes, d): ImageGPTForImageClassification, whose ``score`` is the same bias-free linear map
    on the mean over positions of ``ln_f``'s output, with ``id2label`` from ``classes``."""
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": torch.cat([sd["wte.weight"], sd["sos"][None]]),  # (V + 1, d): SOS last
           "transformer.wpe.weight": sd["wpe.weight"], "transformer.ln_f.weight": sd["ln_f.weight"]}
    if head is None:
        out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        out["score.weight"] = head.detach().to("cpu", torch.float32)  # (n_classes, d)
    for i in range(cfg.n_layer):
        p, q = f"transformer.h.{i}.", f"blocks.{i}."
        for name in ("ln_1.weight", "ln_2.weight"):
            out[p + name] = sd[q + name]
        for name in _HF_TRANSPOSED:
            out[p + name] = sd[q + name].T
        for b in _HF_BIASES:
            out[p + b] = torch.zeros(sd[q + b.replace(".bias", ".weight")].shape[0])
    hf_config = {"architectures": ["ImageGPTForCausalImageModeling"], "model_type": "imagegpt",
                 "vocab_size": cfg.n_vocab + 1, "n_positions": cfg.n_ctx, "n_embd": cfg.n_embd,
                 "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
                 "activation_function": "quick_gelu", "layer_norm_epsilon": NORM_EPS,
                 # the paper trained without dropout; HF's defaults (0.1) would perturb fine-tuning there
                 "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
                 "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                 "reorder_and_upcast_attn": False, "tie_word_embeddings": False, "use_cache": True,
                 "add_cross_attention": False}
    if head is not None:
        names = list(classes) if classes else [f"LABEL_{i}" for i in range(head.shape[0])]
        if len(names) != head.shape[0] or len(set(names)) != len(names):
            raise ValueError(f"the head has {head.shape[0]} classes but the names are {names}")
        hf_config.update(architectures=["ImageGPTForImageClassification"],
                         id2label={str(i): n for i, n in enumerate(names)},
                         label2id={n: i for i, n in enumerate(names)})
    return {k: v.contiguous() for k, v in out.items()}, hf_config


def _hf_weight_files(src: Path) -> tuple[list[Path], str]:
    """The weight files of an ImageGPT folder (one, or those its sharded index lists) and what names them
    in errors (the file, or the index)."""
    for name in HF_WEIGHTS:
        if (src / name).is_file():
            return [src / name], str(src / name)
    for name in HF_INDEXES:
        index = src / name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"{index} is not a weight index ({e})") from None
            return [_indexed_file(src, index, f) for f in names], str(index)
    raise FileNotFoundError(f"{src} has no {' or '.join(HF_WEIGHTS)} (nor a sharded index)")


def _indexed_file(src: Path, index: Path, name: Any) -> Path:
    """A file a sharded index lists, which must lie in the index's folder once every link is followed (an
    index is data: ``../x``, an absolute path or a link out of the folder would have igpt read a file the
    folder does not hold). In the Hub's cache (``.../snapshots/REV/``) every file is a link into the
    repository's ``blobs/``, which counts as the folder."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"{index}: lists {name!r}, not a file name")
    path, home = src / name, src.resolve()
    homes = [home, home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [home]
    if not any(path.resolve().is_relative_to(h) for h in homes):
        raise ValueError(f"{index}: lists {name!r}, which lies outside {src}; refused")
    if not path.is_file():
        raise FileNotFoundError(f"{path} (listed in {index}) does not exist")
    return path


def _hf_fields(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """What ImageGPT tensors' shapes say of its config.json: ``n_layer`` (the blocks h.i present), ``n_embd``
    and ``vocab_size`` (wte: (V + 1, d)) and ``n_positions`` (wpe: (T, d)). A field whose tensor is missing
    or of another rank is left out: the strict check names that tensor."""
    short = {k.removeprefix("transformer."): s for k, s in shapes.items()}
    out = {"n_layer": len({k.split(".")[1] for k in short if k.startswith("h.") and k.count(".") > 1})}
    wte, wpe = short.get("wte.weight", ()), short.get("wpe.weight", ())
    if len(wte) == 2:
        out["vocab_size"], out["n_embd"] = wte
    if len(wpe) == 2:
        out["n_positions"] = wpe[0]
    return out


def _require_hf_shape(hf: Mapping[str, Any], cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                      config_where: str, where: str) -> None:
    """config.json's sizes are those of the stored tensors, before anything of their size is built; a field
    is named as config.json spells it (``num_hidden_layers`` for ``n_layer``...)."""
    spelled = {_HF_ALIASES.get(k, k): k for k in hf}
    declared = {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.n_vocab + 1, "n_positions": cfg.n_ctx}
    require_fields({spelled.get(k, k): v for k, v in declared.items()},
                   {spelled.get(k, k): v for k, v in _hf_fields(shapes).items()}, config_where, where)


def _read_hf_palette(src: Path, n_vocab: int) -> Palette:
    """The palette is the processor's ``clusters`` (K, 3) in [-1, 1]."""
    path = src / HF_PROCESSOR
    clusters = read_json(path).get("clusters")
    if clusters is None:
        raise ValueError(f"{path} has no 'clusters' (the colour palette)")
    try:
        tokenizer = Palette(np.asarray(clusters, dtype=np.float32))
    except ValueError as e:
        raise ValueError(f"{path}: clusters: {e}") from None
    if tokenizer.k != n_vocab:
        raise ValueError(f"{path} has {tokenizer.k} clusters, but the model's vocabulary has {n_vocab} colours "
                         f"(vocab_size {n_vocab + 1} includes the SOS id)")
    return tokenizer


def load_hf(src: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Palette, CheckpointRecord]:
    """(model in eval mode, palette, record) from a local ImageGPT directory: an AR model whose record's
    ``source`` names the directory."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"Hugging Face directory {src} does not exist")
    hf = read_json(src / HF_CONFIG)
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    if model_type != "imagegpt":
        raise ValueError(f"{src / HF_CONFIG}: model_type is {model_type!r}; not an ImageGPT directory")
    if "ImageGPTForImageClassification" in (hf.get("architectures") or []):
        raise ValueError(f"{src / HF_CONFIG}: an ImageGPTForImageClassification folder (an exported classifier); "
                         "igpt reads generative ImageGPT folders: load the igpt checkpoint it was exported from")
    cfg = _hf_model_config(hf, str(src / HF_CONFIG))
    tokenizer = _read_hf_palette(src, cfg.n_vocab)  # cheap checks before reading gigabytes of weights
    files, where = _hf_weight_files(src)
    _require_hf_shape(hf, cfg, {k: s for f in files for k, s in read_shapes(f).items()}, str(src / HF_CONFIG),
                      where)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_weight_file(f))
    cfg, sd = hf_to_igpt(state, hf, where)
    record = CheckpointRecord(cfg, tokenizer.fingerprint(), "ar", source={"format": "hf", "path": str(src)})
    return build_model(cfg, sd, where=where).to(device).eval(), tokenizer, record


def save_hf(model: GPT, tokenizer: AnyTokenizer, out_dir: str | Path, record: CheckpointRecord,
            head: torch.Tensor | None = None, facts: dict[str, Any] | None = None) -> Path:
    """Write an ImageGPT directory (config.json, model.safetensors, preprocessor_config.json and the model
    card README.md, with the run's ``facts``) atomically; with a fine-tuned ``head``, as
    ImageGPTForImageClassification."""
    if not record.reading.causal:
        raise ValueError(f"the checkpoint's objective is {record.objective!r}: Hugging Face's ImageGPT always "
                         "attends causally, so a BERT model exported there would compute the wrong function")
    tokenizer = require_palette(tokenizer, "Hugging Face's ImageGPT")  # its processor holds colour clusters only
    if tokenizer.k != model.config.n_vocab:
        raise ValueError(f"model has {model.config.n_vocab} ids but the palette has {tokenizer.k} colours")
    out = require_new(out_dir)
    classes = record.finetuned.classes if record.finetuned is not None else None
    state, hf_config = igpt_to_hf(model, head, classes)
    n_px = model.config.n_px
    processor = {"image_processor_type": "ImageGPTImageProcessor",
                 "clusters": tokenizer.centers.cpu().numpy().astype(np.float32).tolist(),
                 # PIL's box filter (4), igpt's filter when shrinking (igpt.data.images.to_n_px); the
                 # processor cannot cut the centred square first (see igpt.weights.card.PROCESSOR_NOTE)
                 "do_resize": True, "size": {"height": n_px, "width": n_px}, "resample": 4,
                 # rescale 1/255 then normalise with mean = std = 0.5 is x / 127.5 - 1, our palette's scale
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_color_quantize": True}
    kind = "image classifier" if head is not None else "generative model"
    card = model_card(record if head is not None else record.replace(finetuned=None), tokenizer,
                      library="transformers", title=f"iGPT {kind} ({out.name})", hf_export=True, facts=facts)
    with replacing_dir(out) as tmp:
        save_tensors(state, tmp / HF_WEIGHTS[0], metadata={"format": "pt"})
        write_json(tmp / HF_CONFIG, hf_config)
        write_json(tmp / HF_PROCESSOR, processor)
        write_text(tmp / HF_CARD, card)
    return out
