"""Training commands: ``igpt pretrain`` (and ``--resume``), ``igpt finetune`` and ``igpt demo``."""

from __future__ import annotations

import argparse
from typing import Any

from igpt.cli.args import add_fields, add_labelled_inputs, build, command, integer
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


def _pretrain_parser(sub: Any) -> None:
    p = command(sub, "pretrain", help="pretrain a model (AR or BERT)")
    p.add_argument("--preset", default="igpt-s", choices=sorted(PRESETS), help="model shape (default: igpt-s)")
    p.add_argument("--out", default=None, help="run directory (checkpoints, metrics.jsonl, tokenizer)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest checkpoint with its saved configs")
    add_fields(p, ModelConfig, title="model (overrides the preset)", preset=True)
    add_fields(p, TrainConfig, title="training")
    add_fields(p, DataConfig, title="data")
    p.set_defaults(func=cmd_pretrain)


def _finetune_parser(sub: Any) -> None:
    f = command(sub, "finetune", help="fine-tune a checkpoint with a classification head (L_CLF + w * L_GEN)",
                description="Zero-initialised head on the mean-pooled final norm, Adam at a constant learning "
                "rate after warm-up, early stopping on validation accuracy; the best checkpoint (with "
                "classifier.safetensors) goes to --out/checkpoints, metrics to --out/metrics.json.")
    add_labelled_inputs(f, required=False)
    f.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the fine-tune in OUT from its last saved state (OUT/last)")
    add_fields(f, FinetuneConfig, title="fine-tuning")
    f.set_defaults(func=cmd_finetune)


def _demo_parser(sub: Any) -> None:
    p = command(sub, "demo", help="palette fit -> prepare -> pretrain -> probe -> samples on scikit-learn digits")
    p.add_argument("--out", default="igpt-demo", help="output directory (default: igpt-demo)")
    p.add_argument("--steps", type=integer, default=300, help="pretraining steps (default: 300)")
    p.add_argument("--seed", type=integer, default=0, help="seed (default: 0)")
    p.set_defaults(func=cmd_demo)


def register(sub: Any) -> None:
    for add in (_pretrain_parser, _finetune_parser, _demo_parser):
        add(sub)
