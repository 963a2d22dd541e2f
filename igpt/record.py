"""What a checkpoint is, and how its model is read: one typed record, written and read here only.

Every checkpoint directory holds ``config.json``, the ``CheckpointRecord`` as JSON. ``Reading`` answers the
one question every command asks of a checkpoint, "how is this model read?", from the objective its
weights were trained with:

| objective | attention, input                                   | loss that scores it      | left to right |
|-----------|----------------------------------------------------|--------------------------|---------------|
| ``ar``    | causal, ``[sos, ids[:-1]] + wpe`` (the SOS shift)  | next-pixel cross-entropy | yes           |
| ``bert``  | bidirectional, masked positions zero-embedded      | masked-pixel loss        | no            |

A fine-tuned checkpoint is read as its trunk was pretrained (its ``objective`` is the base objective), and
``finetuned`` describes its classifier head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from igpt.config import OBJECTIVES, ModelConfig, check_types
from igpt.config.fields import with_new_names

# 3 names the tokenizer's fingerprint ``tokenizer_fingerprint``; 2 called it ``palette_fingerprint``, and
# 1 kept a free-form dict. All three are read.
FORMAT_VERSION = 3
PAPER_MASK_PROB = 0.15  # the paper's BERT mask rate, for BERT weights that do not record theirs


@dataclass(frozen=True)
class Reading:
    """How a model is read (see the module docstring)."""

    objective: str  # "ar" or "bert": the loss that scores the model
    causal: bool  # True: the SOS shift and causal attention; False: bidirectional, with masked inputs
    can_sample: bool  # whether it can be sampled left to right
    mask_prob: float  # BERT: the rate inputs are masked at, as in training


def read_as(objective: str, mask_prob: float | None = None) -> Reading:
    """The reading of weights trained with ``objective`` ("ar" or "bert") at ``mask_prob`` (BERT)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be 'ar' or 'bert', got {objective!r}")
    rate = PAPER_MASK_PROB if mask_prob is None else float(mask_prob)
    return Reading(objective, causal=objective == "ar", can_sample=objective == "ar", mask_prob=rate)


@dataclass(frozen=True)
class Finetuned:
    """The classifier head of a fine-tuned checkpoint (``classifier.safetensors``)."""

    n_classes: int
    classes: tuple[str, ...] | None = None
    val_acc: float | None = None
    base_checkpoint: str | None = None
    head_layer: int | None = None  # whose normed, mean-pooled features the head reads; None: the final norm

    def __post_init__(self) -> None:
        check_types(self, named=lambda name: f"finetuned.{name}")


@dataclass(frozen=True)
class CheckpointRecord:
    """``config.json`` of a checkpoint."""

    model: ModelConfig
    tokenizer_fingerprint: str
    objective: str = "ar"  # what the weights were pretrained with (a fine-tuned model: its trunk's)
    mask_prob: float | None = None  # BERT: the rate the weights were trained with; None when unknown or AR
    step: int | None = None
    finetuned: Finetuned | None = None
    source: dict[str, Any] | None = None  # what the weights were converted from: {"format", "path", ...}
    data: str | None = None  # the --data the weights were trained on
    sharded: bool = False  # the declared kind: weights in sharded/ (torch.distributed.checkpoint)
    saved_by_processes: int = 1

    def __post_init__(self) -> None:
        check_types(self, named=str)  # config.json is read from a file: "step": "10" or "sharded": "no" is refused
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be 'ar' or 'bert', got {self.objective!r}")
        layer = self.finetuned.head_layer if self.finetuned is not None else None
        if layer is not None and not 0 <= layer <= self.model.n_layer:
            raise ValueError(f"finetuned.head_layer {layer} is outside the model's layers 0..{self.model.n_layer}")

    @property
    def n_px(self) -> int:
        return self.model.n_px

    @property
    def reading(self) -> Reading:
        return read_as(self.objective, self.mask_prob)

    @property
    def head_layer(self) -> int:
        """The layer (0..n_layer) whose features a fine-tuned head reads, numbered as ``GPT.layer_features``
        numbers them: l < n_layer is block l's first norm of the stream entering it, n_layer the final norm."""
        layer = self.finetuned.head_layer if self.finetuned is not None else None
        return self.model.n_layer if layer is None else layer

    def replace(self, **changes: Any) -> "CheckpointRecord":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"format": "igpt", "format_version": FORMAT_VERSION, **d, "model": self.model.to_dict()}

    @classmethod
    def from_json(cls, d: Any, where: str) -> "CheckpointRecord":
        """Read ``config.json`` of this version or an earlier one; ``where`` names the file in errors."""
        if not isinstance(d, dict) or d.get("format") != "igpt":
            raise ValueError(f"{where} is not an igpt checkpoint config (no \"format\": \"igpt\")")
        version = d.get("format_version")
        try:
            if version == 1:
                return _from_v1(d)
            if version not in (2, FORMAT_VERSION):
                raise ValueError(f"format_version {version!r}; this igpt reads 1 to {FORMAT_VERSION}")
            body = with_new_names(cls, {k: v for k, v in d.items() if k not in ("format", "format_version")})
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(body) - known)
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            finetuned = body.get("finetuned")
            if finetuned is not None:
                body["finetuned"] = Finetuned(**{**finetuned, "classes": _names(finetuned.get("classes"))})
            return cls(**{**body, "model": ModelConfig.from_dict(body["model"])})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def _names(classes: Any) -> tuple[str, ...] | None:
    return None if classes is None else tuple(str(c) for c in classes)


def _from_v1(d: dict[str, Any]) -> CheckpointRecord:
    """Version 1 kept a free-form dict: {"objective": "ar"|"bert"|"finetune", "base_objective", "n_classes",
    "classes", "consolidated_from", ...}."""
    objective, finetuned = d.get("objective", "ar"), None
    if objective == "finetune":  # a fine-tuned classifier: the trunk keeps its pretraining objective
        objective = d.get("base_objective", "ar")
        finetuned = Finetuned(int(d["n_classes"]), _names(d.get("classes")), d.get("val_acc"),
                              d.get("base_checkpoint"))
    source = d.get("source")
    if source is None and "consolidated_from" in d:
        source = {"format": "igpt-sharded", "path": d["consolidated_from"]}
    return CheckpointRecord(ModelConfig.from_dict(d["model"]), d["palette_fingerprint"], objective, None,
                            d.get("step"), finetuned, source, d.get("data"), bool(d.get("sharded", False)),
                            int(d.get("saved_by_processes", 1)))
