"""Evaluation: per-layer features streamed to disk, linear probes (L-BFGS or minibatch SGD logistic
regression), probe plots, and the likelihood of a split."""

from igpt.eval.features import cached_extract, extract, feature_plan
from igpt.eval.probe import probe_features
from igpt.eval.probe_run import probe_checkpoint
from igpt.eval.score import score

__all__ = ["cached_extract", "extract", "feature_plan", "probe_checkpoint", "probe_features", "score"]
