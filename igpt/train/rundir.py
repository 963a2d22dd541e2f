"""Bookkeeping of a run directory: ``run.json`` (the configs) and ``metrics.jsonl`` (one record per logged
step). See ``igpt.train.pretrain`` for the whole layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from igpt.atomic import read_json, write_text
from igpt.config import DataConfig, ModelConfig, TrainConfig

RUN_FILE, METRICS_FILE = "run.json", "metrics.jsonl"


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every line of metrics.jsonl; a one-line ValueError naming it when one is not a record."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable text: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}: line {n} is not JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "split" not in record:
            raise ValueError(f"{path}: line {n} is not a metrics record (step, split, ...)")
        out.append((line, record))
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file holds one consistent curve."""
    path = run_dir / METRICS_FILE
    if path.exists():
        lines = [line for line, record in _records(path) if record["step"] <= step]
        write_text(path, "".join(l + "\n" for l in lines))


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged train and val records: what a resumed, already finished run reports."""
    last: dict[str, Any] = {}
    for _, record in _records(run_dir / METRICS_FILE):
        last[record.pop("split")] = {k: v for k, v in record.items() if k != "step"}
    return last


def read_run(run_dir: Path) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    path = run_dir / RUN_FILE
    if not path.exists():
        raise ValueError(f"--resume {run_dir}: no {RUN_FILE} there, so it is not an igpt run directory")
    run = read_json(path)
    train = dict(run["train"])
    if run["model"].get("grad_checkpoint"):  # run.json files of earlier versions kept it with the model
        train["grad_checkpoint"] = True
    return ModelConfig.from_dict(run["model"]), TrainConfig.from_dict(train), DataConfig(**run["data"])


class MetricsLog:
    """Appends records to metrics.jsonl and, with ``tensorboard=True``, mirrors every number to TensorBoard
    under ``RUN/tensorboard`` as ``{split}/{name}`` against the step."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.run_dir, self.writer = run_dir, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        append_metrics(self.run_dir, record)
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("step", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
