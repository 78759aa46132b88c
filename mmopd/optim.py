"""Training plumbing shared by `train` and `sft`: accelerator, AdamW, learning-rate schedule."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import get_scheduler

from mmopd.config import OptimConfig


def make_accelerator(bf16: bool = False) -> Accelerator:
    """An Accelerator for one run. Its precision state is a process-wide singleton in accelerate;
    it is reset first so that several runs in one process (a notebook, the demo, tests) may use
    different precisions. The distributed state (PartialState) is kept."""
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision="bf16" if bf16 else "no")


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then constant / cosine / linear decay (transformers' plain "constant"
    would silently ignore the warm-up)."""
    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    return get_scheduler(name, optimizer, cfg.warmup_steps, total_steps)
