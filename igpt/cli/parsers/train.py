"""The flags of ``igpt pretrain``, ``igpt finetune`` and ``igpt demo`` (handlers: ``igpt.cli.train``)."""

from __future__ import annotations

from typing import Any

from igpt.cli.args import add_fields, add_labelled_inputs, command, integer
from igpt.config import PRESETS, DataConfig, FinetuneConfig, ModelConfig, TrainConfig


def _pretrain_parser(sub: Any) -> None:
    p = command(sub, "pretrain", help="pretrain a model (AR or BERT)")
    p.add_argument("--preset", default="igpt-s", choices=sorted(PRESETS), help="model shape (default: igpt-s)")
    p.add_argument("--out", default=None, help="run directory (checkpoints, metrics.jsonl, tokenizer)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest checkpoint with its saved configs")
    add_fields(p, ModelConfig, title="model (overrides the preset)", preset=True)
    add_fields(p, TrainConfig, title="training")
    add_fields(p, DataConfig, title="data")
    p.set_defaults(handler="igpt.cli.train:cmd_pretrain")


def _finetune_parser(sub: Any) -> None:
    f = command(sub, "finetune", help="fine-tune a checkpoint with a classification head (L_CLF + w * L_GEN)",
                description="Zero-initialised head on the mean-pooled final norm, Adam at a constant learning "
                "rate after warm-up, early stopping on validation accuracy; the best checkpoint (with "
                "classifier.safetensors) goes to --out/checkpoints, metrics to --out/metrics.json.")
    add_labelled_inputs(f, required=False)
    f.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the fine-tune in OUT from its last saved state (OUT/last)")
    add_fields(f, FinetuneConfig, title="fine-tuning")
    f.set_defaults(handler="igpt.cli.train:cmd_finetune")


def _demo_parser(sub: Any) -> None:
    p = command(sub, "demo", help="palette fit -> prepare -> pretrain -> probe -> samples on scikit-learn digits")
    p.add_argument("--out", default="igpt-demo", help="output directory (default: igpt-demo)")
    p.add_argument("--steps", type=integer, default=300, help="pretraining steps (default: 300)")
    p.add_argument("--seed", type=integer, default=0, help="seed (default: 0)")
    p.set_defaults(handler="igpt.cli.train:cmd_demo")


def register(sub: Any) -> None:
    for add in (_pretrain_parser, _finetune_parser, _demo_parser):
        add(sub)
