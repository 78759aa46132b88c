"""Training plumbing shared by `train` and `sft`: accelerator, AdamW, learning-rate schedule."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration
from transformers import get_scheduler

from mmopd.config import ConfigError, OptimConfig


def make_accelerator(bf16: bool = False, log_with: list[str] | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator for one run. Its precision state is a process-wide singleton in accelerate;
    it is reset first so that several runs in one process (a notebook, the demo, tests) may use
    different precisions. The distributed state (PartialState) is kept."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no", log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir, os.path.join(project_dir, "tensorboard"))
        if project_dir else None)
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator: Accelerator) -> None:
    """Refuse launches that would silently go wrong.

    torchrun on a machine without GPUs starts several processes, but accelerate treats each as a
    lone process unless ACCELERATE_USE_CPU is set: they would train separately and overwrite one
    run directory. FSDP and DeepSpeed ZeRO-3 shard the student's weights, so every forward of it
    is a collective that all ranks must join in step; the trainer runs forwards that differ per
    rank (HF generate of each rank's own episodes, log pi_old scoring, evaluation and checkpoints
    on rank 0 only), which would deadlock. The losses themselves are FSDP2-ready (see
    tests/test_distributed.py)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"launch: WORLD_SIZE={world} but accelerate sees one process (torchrun without GPUs "
            "needs ACCELERATE_USE_CPU=true); the ranks would train independently and overwrite "
            "one run directory")
    ds = accelerator.state.deepspeed_plugin if accelerator.distributed_type == \
        DistributedType.DEEPSPEED else None
    if accelerator.distributed_type == DistributedType.FSDP or (ds and ds.zero_stage == 3):
        raise ConfigError(
            "launch: FSDP / DeepSpeed ZeRO-3 shard the student, making every forward a "
            "collective, but mmopd runs per-rank forwards (HF generate, log pi_old scoring, "
            "rank-0 evaluation and checkpoints) that would deadlock; use DDP "
            "(configs/accelerate/ddp.yaml), with model.lora or "
            "trainer.gradient_checkpointing=true to save memory")


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then constant / cosine / linear decay (transformers' plain "constant"
    would silently ignore the warm-up)."""
    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    return get_scheduler(name, optimizer, cfg.warmup_steps, total_steps)
