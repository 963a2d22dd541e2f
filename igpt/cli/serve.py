"""``igpt serve``: the interactive page (complete, infill, sample) on a local port.

    igpt serve --checkpoint igpt-demo/run                   # http://127.0.0.1:7860
    igpt serve --checkpoint igpt-s --data cifar10.npz       # also pick images from a dataset
"""

from __future__ import annotations

import argparse
import importlib.util

from igpt.cli.args import build
from igpt.cli.parsers.serve import INSTALL_HINT
from igpt.config import EvalDataConfig, SampleConfig, ServeConfig
from igpt.serve import Engine, check_address, launch


def cmd_serve(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("gradio") is None:  # before the checkpoint is read
        raise ValueError(f"the page needs Gradio, which is not installed: {INSTALL_HINT}")
    cfg, sampling, data = build(ServeConfig, args), build(SampleConfig, args), build(EvalDataConfig, args)
    check_address(cfg.host, cfg.port)  # before the checkpoint is read: a busy port is a second's error
    engine = Engine(args.checkpoint, cfg, sampling, data)
    print(f"igpt serve: {engine.where} on http://{cfg.host}:{cfg.port} (Ctrl-C stops)", flush=True)
    launch(engine)
    print("igpt serve: stopped; its temporary files are removed", flush=True)
