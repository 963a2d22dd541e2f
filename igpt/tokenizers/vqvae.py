"""The VQ-VAE that turns an image into a grid of codes (van den Oord et al. 2017), iGPT's tokenizer at high
input resolution (the paper's ICML version: 192x192 images -> a 48x48 grid of 512 codes).

A convolutional encoder downsamples by ``factor`` (one stride-2 convolution per factor of 2), residual blocks
work at the grid resolution, and the decoder mirrors it. The codebook is ``vector_quantize_pytorch``'s
``VectorQuantize``: EMA updates, k-means initialisation on the first batch, dead-code restarts and a
commitment loss, all maintained there rather than rewritten here.

Images enter as floats in [-1, 1] (pixels / 127.5 - 1, as the palette scales them) and leave the same way.
In eval mode ``forward``'s reconstruction is the decoder applied to the codebook rows of the chosen ids, so
``decode_ids(encode_ids(x))`` is exactly the model's own reconstruction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from igpt.config.tokenizer import VQConfig


class VQOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, H, W) float, the decoded codes
    ids: torch.Tensor  # (B, g, g) int64
    commit: torch.Tensor  # () the commitment loss (zero in eval mode)


class _Residual(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(cfg: VQConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    ch = 3
    for _ in range(int(math.log2(cfg.factor))):
        layers += [nn.Conv2d(ch, cfg.hidden, 4, stride=2, padding=1), nn.ReLU()]
        ch = cfg.hidden
    layers.append(nn.Conv2d(ch, cfg.hidden, 3, padding=1))
    layers += [_Residual(cfg.hidden) for _ in range(cfg.res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.code_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: VQConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, cfg.hidden, 3, padding=1)]
    layers += [_Residual(cfg.hidden) for _ in range(cfg.res_blocks)]
    ups = int(math.log2(cfg.factor))
    for i in range(ups):
        layers += [nn.ReLU(), nn.ConvTranspose2d(cfg.hidden, cfg.hidden if i < ups - 1 else 3, 4, stride=2,
                                                 padding=1)]
    if ups == 0:
        layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, 3, 3, padding=1)]
    return nn.Sequential(*layers)


def config_fields(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """What the shapes of a VQVAE's tensors say of its VQConfig: ``res_blocks`` (the encoder's residual
    blocks present), ``factor`` (2 to the number of its stride-2, 4x4 convolutions), ``hidden`` (the first
    convolution's outputs) and ``vocab_size`` and ``code_dim`` (the codebook, (1, K, D)). A field whose
    tensor is missing or of another rank is left out: the strict shape check names that tensor."""
    convs = [s for k, s in shapes.items() if re.fullmatch(r"encoder\.\d+\.weight", k)]
    out = {"res_blocks": sum(bool(re.fullmatch(r"encoder\.\d+\.body\.1\.weight", k)) for k in shapes),
           "factor": 2 ** min(64, sum(len(s) == 4 and s[2:] == (4, 4) for s in convs))}
    first, embed = shapes.get("encoder.0.weight", ()), shapes.get("vq._codebook.embed", ())
    if len(first) == 4:
        out["hidden"] = first[0]
    if len(embed) == 3:
        out["vocab_size"], out["code_dim"] = embed[1:]
    return out


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = _encoder(cfg), _decoder(cfg)
        # Imported here, where a VQ-VAE is built: the library pulls in einx, whose import costs seconds, and
        # every igpt command would pay them otherwise (palette runs never need it).
        from vector_quantize_pytorch import VectorQuantize

        # sync_* off: a tokenizer is fitted in one process; the library would otherwise all-reduce when a
        # process group happens to exist.
        self.vq = VectorQuantize(dim=cfg.code_dim, codebook_size=cfg.vocab_size, decay=cfg.decay,
                                 kmeans_init=cfg.kmeans_iters > 0, kmeans_iters=max(cfg.kmeans_iters, 1),
                                 threshold_ema_dead_code=cfg.dead_code, commitment_weight=cfg.commitment,
                                 sync_codebook=False, sync_kmeans=False)

    def _grid(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(B, 3, H, W) -> encoder outputs as (B, g*g, D) and g."""
        z = self.encoder(x)  # (B, D, g, g)
        return z.flatten(2).transpose(1, 2), z.shape[-1]

    def _decode_vectors(self, q: torch.Tensor, g: int) -> torch.Tensor:
        """(B, g*g, D) code vectors -> (B, 3, H, W)."""
        return self.decoder(q.transpose(1, 2).reshape(q.shape[0], -1, g, g))

    def forward(self, x: torch.Tensor) -> VQOutput:
        """(B, 3, H, W) in [-1, 1] -> reconstruction, ids (B, g, g) and the commitment loss."""
        z, g = self._grid(x)
        q, ids, commit = self.vq(z)  # (B, g*g, D), (B, g*g), ()
        return VQOutput(self._decode_vectors(q, g), ids.reshape(-1, g, g), commit)

    @torch.no_grad()
    def encode_ids(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> ids (B, g, g), the nearest code of each encoder output."""
        z, g = self._grid(x)
        _, ids, _ = self.vq(z)
        return ids.reshape(-1, g, g)

    @torch.no_grad()
    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, g, g) -> (B, 3, H, W), the decoder applied to the codebook rows."""
        g = ids.shape[-1]
        q = self.vq.get_output_from_indices(ids.reshape(ids.shape[0], g * g))  # (B, g*g, D)
        return self._decode_vectors(q, g)

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.codebook  # (K, D)
