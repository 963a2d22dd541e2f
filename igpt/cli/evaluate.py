"""Evaluation commands: ``igpt probe`` (linear probes on every layer) and ``igpt finetune``."""

from __future__ import annotations

import argparse
from typing import Any

from igpt.cli.args import add_fields, build
from igpt.eval.features import FeatureConfig
from igpt.train.finetune import FinetuneConfig
from igpt.eval.probe import ProbeConfig


def cmd_probe(args: argparse.Namespace) -> None:
    from igpt.eval.probe import format_table, probe_checkpoint

    cfg = build(ProbeConfig, args)
    metrics = probe_checkpoint(args.checkpoint, args.data, args.out, cfg, build(FeatureConfig, args),
                               resize=args.resize)
    print(format_table(metrics))
    setting = (f"{cfg.labels_per_class} labels per class, mean +- std over {cfg.repeats} subsets"
               if cfg.labels_per_class else f"{metrics['n_train']} training images")
    print(f"\nbest layer {metrics['best_layer']} (by validation accuracy): test accuracy "
          f"{metrics['best_acc']:.4f} ({setting}); outputs in {args.out}/: metrics.json, probe.png, feats-*.npz")


def cmd_finetune(args: argparse.Namespace) -> None:
    from igpt.train.finetune import finetune

    m = finetune(args.checkpoint, args.data, args.out, build(FinetuneConfig, args), resize=args.resize)
    print(f"best validation accuracy {m['val_acc']:.4f} at step {m['best_step']} of {m['steps']}"
          f"{' (stopped early)' if m['stopped_early'] else ''}; test accuracy {m['test_acc']:.4f}; "
          f"classifier {m['checkpoint']}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="a run directory (its newest checkpoint) or one checkpoint directory")
    p.add_argument("--data", required=True, help="labelled dataset, any format 'igpt prepare' accepts, or a "
                   "prepared cache made with the checkpoint's palette")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resize", default="center", choices=("center", "squash"),
                   help="how raw images reach the checkpoint's n_px (default: center)")


def register(sub: Any) -> None:
    p = sub.add_parser("probe", help="linear probe (L-BFGS logistic regression) on every layer's features",
                       description="Features of every layer in one pass (cached in --out), a logistic-regression "
                       "probe per layer with the L2 strength chosen on a validation carve of train, test accuracy, "
                       "metrics.json and probe.png.")
    _common(p)
    add_fields(p, ProbeConfig, title="probe")
    add_fields(p, FeatureConfig, title="features")
    p.set_defaults(func=cmd_probe)

    f = sub.add_parser("finetune", help="fine-tune a checkpoint with a classification head (L_CLF + w * L_GEN)",
                       description="Zero-initialised head on the mean-pooled final norm, Adam at a constant "
                       "learning rate after warm-up, early stopping on validation accuracy; the best checkpoint "
                       "(with classifier.safetensors) goes to --out/checkpoints, metrics to --out/metrics.json.")
    _common(f)
    add_fields(f, FinetuneConfig, title="fine-tuning")
    f.set_defaults(func=cmd_finetune)
