"""Bookkeeping of a run directory: who may write it (``claim_run``), ``run.json`` (the configs and the
identity of the inputs, ``run_record``; what a resume may change, ``read_run``), ``metrics.jsonl`` (one
record per logged step) and ``curves.png`` (``write_curves``). See ``igpt.train.pretrain`` for the whole layout.

The metrics schema, shared by pretraining and fine-tuning (docs/training.md): every record holds ``split``
("train" or "val"), ``step`` (optimizer steps done) and, when it was computed, ``loss`` (nats: pretraining's
per-token objective; fine-tuning's L_CLF + w * L_GEN). Other numbers are optional and named once:
``bits``, ``lr``, ``grad_norm``, ``img_per_s``, ``images``, ``clf_loss``, ``gen_loss``, ``acc``.
Fine-tuning's metrics.jsonl of earlier versions (one "val" line per evaluation holding the training losses
as ``loss``/``clf``/``gen`` and ``val_acc``) is read as the train and val records it stands for."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from igpt.atomic import read_json, write_text
from igpt.config import RESUME_CHANGES, DataConfig, ModelConfig, TrainConfig, flag
from igpt.config.fields import with_new_names
from igpt.lock import DirLock, claim_new
from igpt.viz import curves_plot, save_png

log = logging.getLogger(__name__)
RUN_FILE, METRICS_FILE, CURVES_FILE = "run.json", "metrics.jsonl", "curves.png"


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _record(line: str) -> dict[str, Any] | None:
    """The metrics record a line holds, or None when it holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("split"), str)
    return record if ok else None


def _upgrade(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A record in the current schema: an earlier fine-tuning line (training losses and ``val_acc`` in one
    "val" record) becomes its train and val records; anything else is already current."""
    if record["split"] != "val" or "val_acc" not in record:
        return [record]
    step = record["step"]
    train = {"split": "train", "step": step, "loss": record.get("loss"), "clf_loss": record.get("clf"),
             "gen_loss": record.get("gen"), "lr": record.get("lr")}
    val = {"split": "val", "step": step, "acc": record["val_acc"]}
    return [{k: v for k, v in train.items() if v is not None}, val]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, in order, in the current schema. A process killed while appending leaves a
    partial last line: it is dropped with a warning, as a log-structured store drops a torn tail (the steps it
    held are logged again after the resume). A bad line before the last cannot come from that; it is an
    error naming the file and the line."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()  # garbage bytes become a bad line, not a decode error
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(numbered):
        record = _record(line)
        if record is not None:
            records.extend(_upgrade(record))
        elif i == len(numbered) - 1:
            log.warning("%s: dropped its partial last line %d (%d characters), left by a run that stopped while "
                        "writing it", path, n, len(line))
        else:
            raise ValueError(f"{path}: line {n} is not a metrics record (a JSON object with step and split); "
                             "repair or delete that line")
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file holds one consistent curve."""
    path = run_dir / METRICS_FILE
    if path.exists():
        records = [r for r in read_metrics(run_dir) if r["step"] <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged train and val records: what a resumed, already finished run reports."""
    last: dict[str, Any] = {}
    for record in read_metrics(run_dir):
        last[record.pop("split")] = {k: v for k, v in record.items() if k != "step"}
    return last


def read_run_file(run_dir: Path) -> dict[str, Any]:
    """run.json as written: the configs, and the identity of the data and tokenizer a resume checks."""
    return read_json(run_dir / RUN_FILE)


def read_run(run_dir: Path, changes: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """The configs of the run in ``run_dir``, with ``changes`` (flag name -> value) applied before they are
    built: those in RESUME_CHANGES are applied and logged (so a run recorded on ``--device cuda:3`` can
    resume with ``--device cuda:0`` elsewhere); any other that differs from the run's is refused, naming them
    all."""
    path = run_dir / RUN_FILE
    if not path.exists():
        raise ValueError(f"--resume {run_dir}: no {RUN_FILE} there, so it is not an igpt run directory")
    run = read_json(path)  # a truncated or garbled file is an error naming it
    try:
        model, train, data = dict(run["model"]), dict(run["train"]), with_new_names(DataConfig, dict(run["data"]))
    except KeyError as e:
        raise ValueError(f"{path}: has no {e.args[0]!r} section; it was not written by igpt pretrain") from None
    except (TypeError, ValueError) as e:  # a section that is not an object
        raise ValueError(f"{path}: {e}") from None
    if model.pop("grad_checkpoint", False):  # run.json files of earlier versions kept it with the model
        train["grad_checkpoint"] = True
    _apply_changes(run_dir, {"model": (ModelConfig, model), "train": (TrainConfig, train), "data": (DataConfig, data)},
                   changes or {})
    try:
        return ModelConfig.from_dict(model), TrainConfig.from_dict(train), DataConfig(**data)
    except (TypeError, AttributeError, ValueError) as e:  # a wrong type or value, e.g. edited by hand
        raise ValueError(f"{path}: {e}") from None


def _apply_changes(run_dir: Path, sections: dict[str, tuple[type, dict[str, Any]]], changes: dict[str, Any]) -> None:
    fixed = []
    for name, value in changes.items():
        owner = next((s for s, (cls, _) in sections.items() if name in {f.name for f in dataclasses.fields(cls)}),
                     None)
        if owner is None:
            raise ValueError(f"--resume {run_dir}: {flag(name)} is not a setting of a run")
        cls, recorded = sections[owner]
        old = recorded.get(name, cls.__dataclass_fields__[name].default)
        if value == old:
            continue
        if owner == "train" and name in RESUME_CHANGES:
            log.info("--resume %s: %s %s (was %s)", run_dir, flag(name), value, old)
            recorded[name] = value
        else:
            fixed.append(f"{flag(name)} {value} (the run's is {old})")
    if fixed:
        raise ValueError(f"--resume {run_dir}: {'; '.join(fixed)}: fixed for the life of a run; leave "
                         f"{'it' if len(fixed) == 1 else 'them'} out, or start a new run with --out. A resume may "
                         f"change {', '.join(flag(n) for n in RESUME_CHANGES)}")


def write_curves(run_dir: Path, title: str, loss_label: str = "loss (nats)") -> Path | None:
    """``curves.png``: the loss of each split (and fine-tuning's validation accuracy) against the step, drawn
    from metrics.jsonl; None when nothing is logged yet."""
    records = read_metrics(run_dir)
    return save_png(curves_plot(records, title, loss_label), run_dir / CURVES_FILE) if records else None


def require_tensorboard() -> type:
    """TensorBoard's SummaryWriter, or the one-line error that says how to install it (checked before a run
    starts, so a missing package never costs the setup)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'igpt[tensorboard]' "
                         "(or pip install tensorboard)") from None
    return SummaryWriter


class MetricsLog:
    """Appends records to metrics.jsonl and, with ``tensorboard=True``, mirrors every number to TensorBoard
    under ``RUN/tensorboard`` as ``{split}/{name}`` against the step, and images as ``image``."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.run_dir, self.writer = run_dir, None
        if tensorboard:
            self.writer = require_tensorboard()(str(run_dir / "tensorboard"))

    def image(self, tag: str, pixels: Any, step: int) -> None:
        """An image (H, W, 3) uint8 to TensorBoard (nothing without it; the PNG is the file of record)."""
        if self.writer is not None:
            self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def write(self, record: dict[str, Any]) -> None:
        append_metrics(self.run_dir, record)
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("step", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def claim_run(run_dir: Path, resuming: bool) -> DirLock:
    """Rank 0's hold on the run directory: a new run needs one that is absent or empty, a resumed one its
    run.json; either way no other process may be writing it."""
    if resuming:
        if not (run_dir / RUN_FILE).is_file():  # resume() has read it; a one-line error for other callers
            raise ValueError(f"--resume {run_dir}: no {RUN_FILE} there, so it is not an igpt run directory")
        return DirLock(run_dir, "--resume").acquire()
    return claim_new(run_dir, marker=RUN_FILE, what="a run")


def run_record(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig,
              data_identity: dict[str, Any], tokenizer: str | None) -> dict[str, Any]:
    """run.json: the configs, and the identity of the run's inputs that a resume checks."""
    return {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "data": data_cfg.to_dict(),
            "data_identity": data_identity, "tokenizer_fingerprint": tokenizer}
