"""Generation: the KV-cached sampler, BERT infilling, and samples and completions written as images."""

from igpt.generate.complete import complete, sample_images
from igpt.generate.infill import infill
from igpt.generate.sample import Sampler, make_generator, sample, sample_rows

__all__ = ["Sampler", "complete", "infill", "make_generator", "sample", "sample_images", "sample_rows"]
