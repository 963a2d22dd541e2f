"""Bookkeeping of a run directory: ``run.json`` (the configs) and ``metrics.jsonl`` (one record per logged
step). See ``igpt.train`` for the whole layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from igpt.config import DataConfig, ModelConfig, TrainConfig

RUN_FILE, METRICS_FILE = "run.json", "metrics.jsonl"


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file holds one consistent curve."""
    path = run_dir / METRICS_FILE
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged train and val records: what a resumed, already finished run reports."""
    last: dict[str, Any] = {}
    path = run_dir / METRICS_FILE
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        last[record.pop("split")] = {k: v for k, v in record.items() if k != "step"}
    return last


def read_run(run_dir: Path) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    path = run_dir / RUN_FILE
    if not path.exists():
        raise ValueError(f"--resume {run_dir}: no {RUN_FILE} there, so it is not an igpt run directory")
    run = json.loads(path.read_text())
    return ModelConfig.from_dict(run["model"]), TrainConfig.from_dict(run["train"]), DataConfig(**run["data"])
