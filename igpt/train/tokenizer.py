"""``igpt tokenizer fit``: a VQ-VAE trained on the pixels of any ``--data`` (or a palette fitted on them).

Fit layout (``--out DIR``)::

    fit.json                 the VQ-VAE shape, the fit recipe, the data and its identity (``--resume`` reads it)
    tokenizer.safetensors    the tokenizer as of the newest checkpoint: give it to --tokenizer anywhere
    metrics.jsonl            {"split": "train", "step", "loss", "mse", "commit", "perplexity"} and
                             {"split": "val", "step", "mse", "psnr", "perplexity", "dead_codes"}
    checkpoint/              the newest checkpoint: tokenizer.safetensors + train_state.{json,safetensors}

A palette (``--kind palette``) is written as DIR/palette.npz with fit.json beside it.

Each step's batch and every random draw of the quantizer (k-means seeding, dead-code restarts) come from the
seed and the step alone, so a fit resumed after a kill (``--resume``) ends with the same weights as one that
never stopped. The validation error is in 0..255 units: ``mse`` per channel value, ``psnr`` = 10 log10(255^2 /
mse), on at most ``--val-images`` images of the val split (the same ones each time).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from igpt.atomic import read_json, replacing_dir, write_json
from igpt.config.tokenizer import FIT_RESUME_CHANGES, TokenizerFitConfig, VQConfig
from igpt.data.imageset import ImageSet
from igpt.data.open import check_upscale, identity, open_split
from igpt.lock import DirLock, claim_new
from igpt.tokenizers import VQVAE, VQ_FILE, Palette, VQTokenizer, reconstruction, save_in, usage
from igpt.runtime import derived_seed, resolve_device
from igpt.stop import GracefulStop, Stopped
from igpt.tensorfile import first_nonfinite
from igpt.train.rundir import append_metrics, truncate_metrics
from igpt.weights.trainstate import load_train_state_files, save_train_state

log = logging.getLogger(__name__)
FIT_FILE, CKPT = "fit.json", "checkpoint"
STATE_JSON, STATE_TENSORS = "train_state.json", "train_state.safetensors"


def to_unit(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1] on ``device``, scaled as the palette scales."""
    px = torch.as_tensor(np.asarray(pixels)).to(device)
    return px.permute(0, 3, 1, 2).float() / 127.5 - 1


def _pixels(data: str, split: str, side: int, cfg: TokenizerFitConfig) -> ImageSet:
    images = open_split(data, split, n_px=side, val_fraction=cfg.val_fraction, seed=cfg.seed, resize=cfg.resize)
    if images.pixels is None:
        raise ValueError(f"--data {data} holds ids, not pixels: a tokenizer is fitted on images")
    return images


def fit_tokenizer(data: str, out: str | Path, vq_cfg: VQConfig, cfg: TokenizerFitConfig, *,
                  progress: bool = True) -> dict[str, Any]:
    """Fit a new tokenizer in ``out`` (which must be new or empty); returns the last metrics."""
    out = Path(out)
    check_upscale(data, vq_cfg.input_side, cfg.upscale)
    with claim_new(out, marker=FIT_FILE, what="a tokenizer fit") as lock:
        try:
            train = _pixels(data, "train", vq_cfg.input_side, cfg)
        except Exception:
            lock.discard()
            raise
        write_json(out / FIT_FILE, {"vq": vq_cfg.to_dict(), "fit": cfg.to_dict(), "data": data,
                                    "data_identity": identity(data)})
        if cfg.kind == "palette":
            return _fit_palette(train, out, vq_cfg, cfg, progress)
        return _fit_vq(train, data, out, vq_cfg, cfg, resuming=False, progress=progress)


def resume_fit(out: str | Path, *, changes: Mapping[str, Any] | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Continue the VQ-VAE fit in ``out`` from its checkpoint; ``changes`` may set FIT_RESUME_CHANGES."""
    out = Path(out)
    if not (out / FIT_FILE).is_file():
        raise ValueError(f"--resume {out}: no {FIT_FILE} there, so it is not a tokenizer fit")
    spec = read_json(out / FIT_FILE)
    bad = sorted(set(changes or {}) - set(FIT_RESUME_CHANGES))
    if bad:
        raise ValueError(f"--resume keeps the fit's recipe; {', '.join(bad)} cannot change (may: "
                         f"{', '.join(FIT_RESUME_CHANGES)})")
    vq_cfg = VQConfig.from_dict(spec["vq"])
    cfg = TokenizerFitConfig.from_dict({**spec["fit"], **(changes or {})})
    if cfg.kind != "vqvae":
        raise ValueError(f"--resume {out}: a palette fit is not resumed; fit it again")
    if identity(spec["data"]) != spec["data_identity"]:
        raise ValueError(f"--resume {out}: --data {spec['data']} changed since the fit started")
    with DirLock(out, "--resume"):
        write_json(out / FIT_FILE, {**spec, "fit": cfg.to_dict()})
        train = _pixels(spec["data"], "train", vq_cfg.input_side, cfg)
        return _fit_vq(train, spec["data"], out, vq_cfg, cfg, resuming=True, progress=progress)


def _fit_palette(train: ImageSet, out: Path, vq_cfg: VQConfig, cfg: TokenizerFitConfig,
                 progress: bool) -> dict[str, Any]:
    palette = Palette.fit(train.pixels, k=vq_cfg.vocab_size, iters=cfg.iters, seed=cfg.seed,
                          device=resolve_device(cfg.device), progress=progress)
    path = save_in(palette, out)
    return {"tokenizer": str(path), "fingerprint": palette.fingerprint(), **palette.meta}


class _Fit:
    """The state of a VQ-VAE fit: model, optimizer, step; saved and restored whole."""

    def __init__(self, out: Path, vq_cfg: VQConfig, cfg: TokenizerFitConfig, data: str) -> None:
        self.out, self.cfg, self.data = out, cfg, data
        self.device = resolve_device(cfg.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(cfg.seed, 0))  # the initial weights
            self.model = VQVAE(vq_cfg).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.step = 0
        self.saved: int | None = None  # the step of the tokenizer file on disk, once one is written

    def diverged(self, what: str, step: int) -> FloatingPointError:
        """The one-line error of a fit whose numbers stopped being finite: it ends there, before anything
        non-finite is written, and the tokenizer file on disk (if any) stays the last good one."""
        kept = f"; {self.out / VQ_FILE} is the last good tokenizer (step {self.saved})" if self.saved is not None \
            else ""
        return FloatingPointError(f"{what} at step {step}: the learning rate is too high for this fit; "
                                  f"start a new fit with a lower --lr{kept}")

    def save(self) -> None:
        bad = first_nonfinite(self.model.state_dict())
        if bad is not None:
            raise self.diverged(f"tensor {bad!r} became NaN or infinite", self.step)
        tok = VQTokenizer(self._copy(), {"steps": self.step, "data": self.data})
        optimizer = self.opt.state_dict()
        state = {"step": self.step, "optimizer": {"state": {str(k): v for k, v in optimizer["state"].items()},
                                                  "param_groups": optimizer["param_groups"]}}
        with replacing_dir(self.out / CKPT) as tmp:
            tok.save(tmp / VQ_FILE)
            save_train_state(state, tmp / STATE_JSON, tmp / STATE_TENSORS)
        tok.save(self.out / VQ_FILE)
        self.saved = self.step
        self.model.train()

    def _copy(self) -> VQVAE:
        model = VQVAE(self.model.config)
        model.load_state_dict({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        return model

    def restore(self) -> None:
        ckpt = self.out / CKPT
        if not (ckpt / STATE_JSON).is_file():
            raise ValueError(f"--resume {self.out}: no checkpoint yet ({ckpt} is missing); start the fit again")
        tok = VQTokenizer.load(ckpt / VQ_FILE)
        if tok.config != self.model.config:
            raise ValueError(f"{ckpt / VQ_FILE}: its shape differs from {self.out / FIT_FILE}'s")
        self.model.load_state_dict(tok.model.state_dict())
        state = load_train_state_files(ckpt / STATE_JSON, ckpt / STATE_TENSORS)
        opt = state["optimizer"]
        self.opt.load_state_dict({"state": {int(k): v for k, v in opt["state"].items()},
                                  "param_groups": [dict(g) for g in opt["param_groups"]]})
        self.step = self.saved = int(state["step"])


def _batch(train: ImageSet, step: int, cfg: TokenizerFitConfig) -> np.ndarray:
    """The indices of step ``step``'s batch: drawn from the seed and the step alone."""
    rng = np.random.default_rng([cfg.seed, step])
    return np.sort(rng.choice(len(train), cfg.batch_size, replace=len(train) < cfg.batch_size))


def train_step(fit: _Fit, train: ImageSet) -> dict[str, float]:
    cfg, dev = fit.cfg, fit.device
    x = to_unit(train.pixels[_batch(train, fit.step, cfg)], dev)  # (B, 3, S, S)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(derived_seed(cfg.seed, 1, fit.step))  # the quantizer's k-means and restarts
        fit.model.train()
        out = fit.model(x)
        mse = F.mse_loss(out.recon, x)
        loss = mse + out.commit
        if not math.isfinite(value := float(loss.detach())):  # checked before the step: the weights stay finite
            raise fit.diverged(f"loss became {value}", fit.step + 1)
        fit.opt.zero_grad(set_to_none=True)
        loss.backward()
        fit.opt.step()
    fit.step += 1
    perplexity, _ = usage(out.ids, fit.model.config.vocab_size)
    # [-1, 1] -> 0..255 units: a factor of 127.5 on each value, squared
    return {"loss": value, "mse": float(mse.detach()) * 127.5 ** 2, "commit": float(out.commit.detach()),
            "perplexity": perplexity}


def _validate(fit: _Fit, val: ImageSet | None) -> dict[str, float] | None:
    if val is None:
        return None
    n = len(val) if fit.cfg.val_images == 0 else min(len(val), fit.cfg.val_images)
    tok = VQTokenizer(fit.model)  # eval mode: no EMA update while measuring
    result = reconstruction(tok, np.asarray(val.pixels[:n]))
    fit.model.train()
    return result


def _fit_vq(train: ImageSet, data: str, out: Path, vq_cfg: VQConfig, cfg: TokenizerFitConfig, *,
            resuming: bool, progress: bool) -> dict[str, Any]:
    fit = _Fit(out, vq_cfg, cfg, data)
    if resuming:
        fit.restore()
        truncate_metrics(out, fit.step)
    try:
        val = _pixels(data, "val", vq_cfg.input_side, cfg)
    except ValueError as e:
        log.warning("no validation split, so no validation error: %s", e)
        val = None
    result: dict[str, Any] = {}
    with GracefulStop("tokenizer fit") as stop, tqdm(total=cfg.steps, initial=fit.step, disable=not progress,
                                                       desc="tokenizer fit", unit="step") as bar:
        while fit.step < cfg.steps:
            metrics = train_step(fit, train)
            result["train"] = metrics
            if fit.step % cfg.log_every == 0 or fit.step == cfg.steps:
                append_metrics(out, {"split": "train", "step": fit.step, **metrics})
            if fit.step % cfg.eval_every == 0 or fit.step == cfg.steps:
                if (v := _validate(fit, val)) is not None:
                    result["val"] = v
                    append_metrics(out, {"split": "val", "step": fit.step, **v})
                    bar.set_postfix(val_psnr=f"{v['psnr']:.2f}")
            stopping = stop.requested and fit.step < cfg.steps
            if stopping or fit.step % cfg.ckpt_every == 0 or fit.step == cfg.steps:
                fit.save()
            bar.update(1)
            if stopping:
                raise Stopped(f"stopped by {stop.signal_name} at step {fit.step} of {cfg.steps}; continue with: "
                              f"igpt tokenizer fit --resume {out}")
    if fit.step == 0 or not (out / VQ_FILE).is_file():
        fit.save()
    result.update(tokenizer=str(out / VQ_FILE), fingerprint=VQTokenizer.load(out / VQ_FILE).fingerprint(),
                  steps=fit.step)
    return result
