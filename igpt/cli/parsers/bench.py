"""The flags of ``igpt bench sample|train|loader|memory|report`` (handlers: ``igpt.cli.bench``) and, under it,
``igpt bench quality`` (``igpt.cli.parsers.quality``)."""

from __future__ import annotations

from typing import Any

from igpt.cli.args import add_fields, add_overwrite, command
from igpt.cli.parsers import quality
from igpt.config import BenchLoaderConfig, BenchReportConfig, BenchSampleConfig, BenchTrainConfig, BenchMemoryConfig

_COMMANDS = (("sample", BenchSampleConfig, "cmd_bench_sample"), ("train", BenchTrainConfig, "cmd_bench_train"),
             ("loader", BenchLoaderConfig, "cmd_bench_loader"), ("memory", BenchMemoryConfig, "cmd_bench_memory"))


def register(sub: Any) -> None:
    p = command(sub, "bench", help="speed benchmarks and the memory plan")
    bsub = p.add_subparsers(dest="bench_command", required=True, help="what to measure")
    for name, cls, func in _COMMANDS:
        b = command(bsub, name, help=(cls.__doc__ or "").split(": ", 1)[-1].rstrip("."))
        add_fields(b, cls, title=name, required=("data",) if cls is BenchLoaderConfig else ())
        b.add_argument("--json", default=None, help="also write the result to this JSON file")
        add_overwrite(b)
        b.set_defaults(handler=f"igpt.cli.bench:{func}")
    r = command(bsub, "report", help=(BenchReportConfig.__doc__ or "").split(": ", 1)[-1].rstrip("."))
    add_fields(r, BenchReportConfig, title="report", required=("out",))
    add_overwrite(r)
    r.set_defaults(handler="igpt.cli.bench:cmd_bench_report")
    quality.register(bsub)
