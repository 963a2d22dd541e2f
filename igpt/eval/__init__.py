"""Evaluation: per-layer features, linear probes (L-BFGS logistic regression, and the demo's ridge probe),
and the likelihood of a split."""

from igpt.eval.features import cached_extract, extract
from igpt.eval.probe import probe_checkpoint, probe_features
from igpt.eval.score import score

__all__ = ["cached_extract", "extract", "probe_checkpoint", "probe_features", "score"]
