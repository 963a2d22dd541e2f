"""Training: pretraining (one process, DDP or FSDP under torchrun; exact resume) and fine-tuning."""

from igpt.train.finetune import finetune
from igpt.train.pretrain import pretrain, resume

__all__ = ["finetune", "pretrain", "resume"]
