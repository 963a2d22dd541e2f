"""Training: pretraining (one process, DDP or FSDP under torchrun; exact resume) and fine-tuning (resumable)."""

from igpt.train.finetune import finetune, resume_finetune
from igpt.train.pretrain import pretrain, resume

__all__ = ["finetune", "pretrain", "resume", "resume_finetune"]
