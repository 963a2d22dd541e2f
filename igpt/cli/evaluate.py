"""Evaluation commands: ``igpt probe`` (linear probes on every layer), ``igpt score`` (the validation
loss: mean NLL of a split) and ``igpt classify`` (the top classes of a fine-tuned checkpoint for images)."""

from __future__ import annotations

import argparse
from pathlib import Path

from igpt.atomic import check_output, write_json
from igpt.cli.args import build
from igpt.config import AttentiveConfig, ClassifyConfig, EvalDataConfig, FeatureConfig, ProbeConfig, ScoreConfig
from igpt.eval.attentive import attentive_checkpoint, format_attentive
from igpt.eval.classify import classify
from igpt.eval.probe import format_table
from igpt.eval.probe_run import LINEAR, LINEAR_INIT, probe_checkpoint
from igpt.eval.score import score
from igpt.eval.sweep import format_sweep, sweep_checkpoints


def cmd_probe(args: argparse.Namespace) -> None:
    cfg, attentive = build(ProbeConfig, args), build(AttentiveConfig, args)  # both checked before any work
    if args.all_checkpoints:
        if attentive.attentive:
            raise ValueError("--attentive probes one checkpoint; leave it out of --all-checkpoints")
        result = sweep_checkpoints(args.checkpoint, args.data, args.out, cfg, build(FeatureConfig, args),
                                   resize=args.resize, any_palette=args.any_palette, overwrite=args.overwrite)
        print(format_sweep(result))
        reused = f"; {len(result['skipped'])} read back from an earlier sweep" if result["skipped"] else ""
        print(f"\n{len(result['rows'])} checkpoints, validation loss on the {result['split']} split{reused}; outputs "
              f"in {args.out}/: sweep.json, sweep.csv, sweep.png, step-*/")
        return
    metrics = probe_checkpoint(args.checkpoint, args.data, args.out, cfg, build(FeatureConfig, args),
                               resize=args.resize, overwrite=args.overwrite, any_palette=args.any_palette)
    probes = metrics["probes"]
    print(format_table(probes[LINEAR], baseline=probes.get(LINEAR_INIT)))
    setting = (f"{cfg.labels_per_class} labels per class, mean +- std over {cfg.repeats} subsets"
               if cfg.labels_per_class else f"{metrics['n_train']} training images")
    for name, result in probes.items():
        print(f"\n{name}: layer {result['best_layer']} chosen on validation (val accuracy "
              f"{_fraction(result['best_val_acc'])}): test accuracy {result['best_test_acc']:.4f} ({setting})")
    print(f"outputs in {args.out}/: metrics.json, probe.png, feats-*/ (features, reused by later runs)")
    if attentive.attentive:
        _attentive(args, cfg, attentive)


def _attentive(args: argparse.Namespace, cfg: ProbeConfig, attentive: AttentiveConfig) -> None:
    metrics = attentive_checkpoint(args.checkpoint, args.data, args.out, attentive, cfg, build(FeatureConfig, args),
                                   resize=args.resize, any_palette=args.any_palette)
    print("\nattentive probe (frozen trunk, learned-query cross-attention + linear, AdamW):")
    print(format_attentive(metrics))
    for layer, r in metrics["probes"]["attentive"]["layers"].items():
        print(f"attentive probe on layer {layer}: test accuracy {r['test_acc']:.4f} (lr {r['lr']:.0e} and epoch "
              f"{r['epoch']} chosen on validation, val acc {r['val_acc']:.4f}); in {args.out}/metrics.json")


def _fraction(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def cmd_score(args: argparse.Namespace) -> None:
    if args.json:  # checked before the images are scored
        check_output(args.json, "--json", overwrite=args.overwrite, is_dir=False)
    if args.out:
        check_output(Path(args.out) / "score.json", "--out", overwrite=args.overwrite, is_dir=False)
    report = score(args.checkpoint, build(EvalDataConfig, args), build(ScoreConfig, args))
    head = (f"{report['objective'].upper()} score of {args.checkpoint} on {args.data} ({report['split']}, "
            f"{report['images']} images)")
    nats, bits = report["nats_per_token"], report["bits_per_token"]
    if report["objective"] == "ar" and "bits_per_subpixel_equivalent" not in report:  # VQ-VAE codes
        print(f"{head}:\n  {nats:.4f} nats/token  {bits:.4f} bits/token (tokens are VQ-VAE codes, not pixels)")
    elif report["objective"] == "ar":
        print(f"{head}:\n  {nats:.4f} nats/token  {bits:.4f} bits/token  {bits / 3:.4f} bits per "
              "sub-pixel-equivalent (bits/3; not 8-bit bits/dim)")
    else:
        print(f"{head}:\n  masked-pixel loss {nats:.4f} nats/token  {bits:.4f} bits/token (mask_prob "
              f"{report['mask_prob']}, seed {report['seed']})")
    for path in ([Path(args.json)] if args.json else []) + ([Path(args.out) / "score.json"] if args.out else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)
        print(f"-> {path}")


def cmd_classify(args: argparse.Namespace) -> None:
    results = classify(args.checkpoint, args.images, build(ClassifyConfig, args))
    for path, preds in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{p.label} {p.prob:.4f}" for p in preds))
