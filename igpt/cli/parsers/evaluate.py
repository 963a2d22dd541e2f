"""The flags of ``igpt probe``, ``igpt score`` and ``igpt classify`` (handlers: ``igpt.cli.evaluate``)."""

from __future__ import annotations

from typing import Any

from igpt.cli.args import add_checkpoint, add_eval_data, add_fields, add_labelled_inputs, add_overwrite, command
from igpt.config import AttentiveConfig, ClassifyConfig, EvalDataConfig, FeatureConfig, ProbeConfig, ScoreConfig


def _probe_parser(sub: Any) -> None:
    p = command(sub, "probe", help="linear probe (logistic regression) on every layer's features",
                description="Features of the chosen layers in one pass, streamed to memory-mapped files in "
                "--out (reused, or continued after an interruption, by later runs), a logistic-regression "
                "probe per layer (L-BFGS or minibatch SGD) with the L2 strength chosen on a validation carve "
                "of train, the layer chosen on validation and its test accuracy, metrics.json and probe.png.")
    add_labelled_inputs(p)
    add_fields(p, EvalDataConfig, title="tokenizer check", only=("any_palette",))
    add_fields(p, ProbeConfig, title="probe")
    add_fields(p, FeatureConfig, title="features")
    add_fields(p, AttentiveConfig, title="attentive probe")
    p.add_argument("--all-checkpoints", action="store_true",
                   help="--checkpoint is a run directory: score (validation loss) and probe each of its kept "
                   "checkpoints (pretrain --keep-every N), and write sweep.json, sweep.csv and sweep.png (best-layer "
                   "accuracy against validation loss) to --out; a rerun skips the checkpoints already done")
    add_overwrite(p)
    p.set_defaults(handler="igpt.cli.evaluate:cmd_probe")


def _score_parser(sub: Any) -> None:
    p = command(sub, "score", help="mean negative log-likelihood of a split (nats and bits per token)")
    add_checkpoint(p)
    add_eval_data(p, required=True)
    add_fields(p, ScoreConfig, title="scoring")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--out", default=None, help="also write the result to OUT/score.json")
    add_overwrite(p)
    p.set_defaults(handler="igpt.cli.evaluate:cmd_score")


def _classify_parser(sub: Any) -> None:
    p = command(sub, "classify", help="top classes of a fine-tuned checkpoint for image files",
                description="Each image is resized as the fine-tune resized its data, quantized with the "
                "checkpoint's tokenizer and classified by its head; prints the top classes and their "
                "probabilities, one line per image.")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files (any format Pillow reads)")
    add_checkpoint(p, "a fine-tuned checkpoint (igpt finetune --out OUT: OUT or OUT/checkpoints/step-N)")
    add_fields(p, ClassifyConfig, title="classify")
    p.set_defaults(handler="igpt.cli.evaluate:cmd_classify")


def register(sub: Any) -> None:
    _probe_parser(sub)
    _score_parser(sub)
    _classify_parser(sub)
