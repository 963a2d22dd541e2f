"""The flags of ``igpt serve`` (handler: ``igpt.cli.serve``)."""

from __future__ import annotations

from typing import Any

from igpt.cli.args import add_checkpoint, add_eval_data, add_fields, command
from igpt.config import SampleConfig, ServeConfig

INSTALL_HINT = "pip install 'igpt[serve]'"


def register(sub: Any) -> None:
    p = command(sub, "serve", help="a local web page to complete, infill and sample images with a checkpoint "
                f"(needs {INSTALL_HINT})")
    add_checkpoint(p)
    add_eval_data(p, required=False)
    add_fields(p, ServeConfig, title="page")
    add_fields(p, SampleConfig, title="sampling (the page's defaults)",
               only=("temperature", "top_k", "top_p", "seed", "device", "dtype", "window", "cuda_graph"))
    p.set_defaults(handler="igpt.cli.serve:cmd_serve")
