"""Frozen configuration dataclasses, their presets, and every flag the command line has.

Each field carries its help text (and, where it has them, its choices) in ``metadata``; ``igpt.cli.args``
turns the fields into flags, so a default, its help and its choices are written once, here. Every config
first runs ``check_fields``: each field's annotated type (``check_types``: a config read from JSON can hold
anything), choices (from that metadata), no NaN or infinity in any number, seeds and devices; ranges are
then checked by each class's ``__post_init__``. Fields that several commands share (the
device, the seed, the autocast dtype, the resize mode) come from one factory each (``igpt.config.fields``).

- ``model``: ``ModelConfig`` and ``PRESETS``;
- ``train``: ``TrainConfig``, ``DataConfig`` (pretraining) and ``FinetuneConfig``;
- ``evaluation``: ``SampleConfig``, ``EvalDataConfig``, ``ScoreConfig``, ``FeatureConfig``, ``ProbeConfig``,
  ``AttentiveConfig``;
- ``bench``: the ``igpt bench`` commands;
- ``serve``: ``ServeConfig``, the ``igpt serve`` page.
"""

from igpt.config.bench import (BenchLoaderConfig, BenchMemoryConfig, BenchReportConfig, BenchSampleConfig,
                               BenchTrainConfig, QualityConfig)
from igpt.config.evaluation import (DEFAULT_L2_GRID, SCHEDULES, AttentiveConfig, ClassifyConfig, EvalDataConfig,
                                    FeatureConfig, ProbeConfig, SampleConfig, ScoreConfig)
from igpt.config.fields import (DTYPES, N_VOCAB, OBJECTIVES, RESIZE_MODES, SWITCH, arg, check_fields, check_seed,
                                check_types, flag, require_at_least, require_fraction, require_positive)
from igpt.config.model import PRESETS, ModelConfig
from igpt.config.serve import ServeConfig
from igpt.config.train import FINETUNE_RESUME_CHANGES, RESUME_CHANGES, DataConfig, FinetuneConfig, TrainConfig

__all__ = ["AttentiveConfig", "BenchLoaderConfig", "BenchMemoryConfig", "BenchReportConfig", "BenchSampleConfig",
           "BenchTrainConfig",
           "ClassifyConfig", "DEFAULT_L2_GRID", "DTYPES", "DataConfig", "EvalDataConfig", "FINETUNE_RESUME_CHANGES",
           "FeatureConfig", "FinetuneConfig", "ModelConfig", "N_VOCAB", "OBJECTIVES", "PRESETS", "ProbeConfig",
           "QualityConfig", "RESIZE_MODES", "RESUME_CHANGES", "SCHEDULES", "SWITCH", "SampleConfig", "ScoreConfig", "ServeConfig",
           "TrainConfig", "arg", "check_fields", "check_seed", "check_types", "flag", "require_at_least",
           "require_fraction", "require_positive"]
