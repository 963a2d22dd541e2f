"""Tokenizers: what turns pixels into the ids a model reads, and back (the paper's section 3.2).

- ``Palette`` (``palette``, fitted by ``kmeans``): 512 k-means colours, one id per pixel, at 32, 48 or 64 px.
- ``VQTokenizer`` (``vq``, the network in ``vqvae``): a VQ-VAE's codes, one id per patch, for inputs too
  large for a palette's sequence.
- ``load_tokenizer`` (``files``): the one door to either kind of file, and where a checkpoint, run or cache
  keeps its tokenizer (``save_in``, ``stored_in``, ``load_from``).
- ``reconstruction`` (``metrics``): how much of the images a tokenizer keeps.

This package sits between the core (config, model, ...) and the stages that read data and weights.
"""

from igpt.tokenizers.files import (PALETTE_FILE, VQ_FILE, AnyTokenizer, file_name, load_from,
                                   load_tokenizer, recorded_fingerprint, require_palette, save_in, stored_in)
from igpt.tokenizers.metrics import psnr, reconstruction, usage
from igpt.tokenizers.palette import Palette
from igpt.tokenizers.vq import VQ_EXTENSION, VQTokenizer, to_pixels
from igpt.tokenizers.vqvae import VQVAE

__all__ = ["PALETTE_FILE", "VQ_EXTENSION", "VQ_FILE", "VQVAE", "AnyTokenizer", "Palette",
           "VQTokenizer", "file_name", "load_from", "load_tokenizer", "psnr", "reconstruction",
           "recorded_fingerprint", "require_palette", "save_in", "stored_in", "to_pixels", "usage"]
