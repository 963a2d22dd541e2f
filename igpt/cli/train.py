"""Training commands: ``igpt pretrain`` (and ``--resume``), ``igpt finetune`` and ``igpt demo``."""

from __future__ import annotations

import argparse
from typing import Any

from igpt.cli.args import build
from igpt.config import FINETUNE_RESUME_CHANGES, PRESETS, DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from igpt.bench.demo import run_demo
from igpt.train import finetune, pretrain, resume, resume_finetune


def _resume_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The settings written beside --resume: each is checked against the run's (see ``igpt.train.resume``)."""
    given = args.given - {"resume", "command", "quiet", "given"}
    if "out" in given:
        raise ValueError("--resume RUN_DIR continues RUN_DIR in place: leave out --out")
    changes = {name: getattr(args, name) for name in given if name != "preset"}
    if "preset" in given:  # the preset's shape, as the flags beside it adjust it
        changes.update(build(ModelConfig, args, PRESETS[args.preset]).to_dict())
        changes.pop("n_vocab", None)  # the tokenizer's size, not a preset's
    return changes


def cmd_pretrain(args: argparse.Namespace) -> None:
    if args.resume:
        result = resume(args.resume, changes=_resume_changes(args))
    else:
        if args.out is None:
            raise ValueError("pretrain needs --out RUN_DIR (or --resume RUN_DIR)")
        model_cfg = build(ModelConfig, args, PRESETS[args.preset])
        result = pretrain(model_cfg, build(TrainConfig, args), build(DataConfig, args), args.out)
    val = result.get("val")
    val_text = f", val {val['loss']:.4f} nats/token ({val['bits']:.4f} bits)" if val else ""
    print(f"train loss {result['train']['loss']:.4f} nats/token{val_text}; checkpoint {result['checkpoint']}")


def cmd_finetune(args: argparse.Namespace) -> None:
    if args.resume:
        given = args.given - {"resume", "command", "quiet", "given"}
        extra = sorted(given - set(FINETUNE_RESUME_CHANGES))
        if extra:  # everything else is read from the fine-tune's own record
            raise ValueError(f"--resume OUT continues OUT as it was started: leave out "
                             f"{', '.join('--' + n.replace('_', '-') for n in extra)}")
        m = resume_finetune(args.resume, changes={name: getattr(args, name) for name in given})
    else:
        missing = [f"--{n}" for n in ("checkpoint", "data", "out") if getattr(args, n) is None]
        if missing:
            raise ValueError(f"finetune needs {', '.join(missing)} (or --resume OUT)")
        m = finetune(args.checkpoint, args.data, args.out, build(FinetuneConfig, args), resize=args.resize)
    print(f"best validation accuracy {m['val_acc']:.4f} at step {m['best_step']} of {m['steps']}"
          f"{' (stopped early)' if m['stopped_early'] else ''}; test accuracy {m['test_acc']:.4f}; "
          f"classifier {m['checkpoint']}")


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(args.out, steps=args.steps, seed=args.seed)
