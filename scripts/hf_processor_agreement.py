"""How often Hugging Face's ImageGPTImageProcessor, loaded from an igpt export, gives igpt's ids on real photos.

Fits a palette to scikit-learn's two bundled photographs (china.jpg, flower.jpg; 427 x 640), exports a
tiny model with it (``igpt.weights.hf.save_hf``, whose processor uses PIL's box filter), and compares the
processor's ids with ``igpt.encode_images`` three ways: the photo as it is against igpt's ``--resize center``
and ``--resize squash``, and the photo cut to its centred square against ``center``. ``--resample 2``
rewrites the exported processor to bilinear, what igpt exported before, for comparison. Needs
``transformers``; a few seconds to a minute on a CPU (the palette fit dominates)::

    python scripts/hf_processor_agreement.py --n-px 32 --k 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from sklearn.datasets import load_sample_image

import igpt
from igpt.config import ModelConfig
from igpt.model import GPT
from igpt.record import CheckpointRecord
from igpt.weights.hf import HF_PROCESSOR, save_hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-px", type=int, default=32, help="image side the ids are made at (default: 32)")
    p.add_argument("--k", type=int, default=512, help="palette colours (default: 512)")
    p.add_argument("--resample", type=int, default=None,
                   help="override the exported processor's PIL filter (2 bilinear, 4 box; default: as exported)")
    args = p.parse_args()
    photos = {name: load_sample_image(name) for name in ("china.jpg", "flower.jpg")}
    palette = igpt.Palette.fit(np.concatenate([x.reshape(-1, 3) for x in photos.values()]), k=args.k, iters=10,
                               seed=0, device="cpu")
    cfg = ModelConfig(n_layer=1, n_embd=8, n_head=1, n_px=args.n_px, n_vocab=args.k)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_hf(GPT(cfg), palette, Path(tmp) / "hf", CheckpointRecord(cfg, palette.fingerprint()))
        if args.resample is not None:
            spec = json.loads((out / HF_PROCESSOR).read_text())
            (out / HF_PROCESSOR).write_text(json.dumps({**spec, "resample": args.resample}))
        processor = transformers.AutoImageProcessor.from_pretrained(out)
        resample = json.loads((out / HF_PROCESSOR).read_text())["resample"]
    print(f"processor {type(processor).__name__}, resample {resample}, n_px {args.n_px}, {args.k} colours")
    for name, px in photos.items():
        side = min(px.shape[:2])
        top, left = (px.shape[0] - side) // 2, (px.shape[1] - side) // 2
        square = px[top:top + side, left:left + side]

        def hf(img: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(processor(Image.fromarray(img), return_tensors="pt")["input_ids"]))

        center = igpt.encode_images(px, palette, args.n_px)
        squash = igpt.encode_images(px, palette, args.n_px, resize="squash")
        agree = {"uncut vs center": hf(px) == center, "uncut vs squash": hf(px) == squash,
                 "cut to centred square vs center": hf(square) == center}
        print(f"{name}: " + ", ".join(f"{k} {v.float().mean().item():.1%}" for k, v in agree.items()))


if __name__ == "__main__":
    main()
