"""Training plumbing shared by `train` and `sft`: accelerator, AdamW, learning-rate schedule."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration
from transformers import get_scheduler

from mmopd.config import ConfigError, OptimConfig
from mmopd.training.sharding import fsdp_requested


def make_accelerator(bf16: bool = False, log_with: list[str] | None = None,
                     project_dir: str | None = None) -> Accelerator:
    """An Accelerator for one run. Its precision state is a process-wide singleton in accelerate;
    it is reset first so that several runs in one process (a notebook, the demo, tests) may use
    different precisions. The distributed state (PartialState) is kept."""
    AcceleratorState._reset_state()
    if torch.cuda.is_available():  # TF32 for the float32 matmuls that remain (optimiser, norms)
        torch.set_float32_matmul_precision("high")
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no", log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir, os.path.join(project_dir, "tensorboard"))
        if project_dir else None)
    if fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        shard_on_cpu(accelerator)
    check_launch(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        reduce_in_fp32(accelerator.state.fsdp_plugin)
    return accelerator


def reduce_in_fp32(plugin: FullyShardedDataParallelPlugin) -> None:
    """FSDP2 under bf16 mixed precision: gradients are reduce-scattered in float32. accelerate's
    policy reduces in the compute dtype, bf16, where a sum over ranks of small gradient entries
    loses its low bits; the parameters stay float32 and the forward computes in bf16."""
    mp = plugin.mixed_precision_policy
    if mp is None or getattr(plugin, "fsdp_version", 1) != 2 or mp.param_dtype is None:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=mp.param_dtype, reduce_dtype=torch.float32, output_dtype=mp.output_dtype,
        cast_forward_inputs=mp.cast_forward_inputs)


def shard_on_cpu(accelerator: Accelerator) -> None:
    """accelerate takes FSDP only on accelerators and ignores it on CPU processes (gloo). Set the
    state it would have there, with the plugin read from the same environment (FSDP_VERSION,
    FSDP_TRANSFORMER_CLS_TO_WRAP, ...), so that `prepare` shards the student with accelerate's
    own FSDP2 code: the sharded run is testable on CPU."""
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def check_launch(accelerator: Accelerator) -> None:
    """Refuse launches that would silently go wrong.

    torchrun on a machine without GPUs starts several processes, but accelerate treats each as a
    lone process unless ACCELERATE_USE_CPU is set: they would train separately and overwrite one
    run directory. The student may be sharded with FSDP2 (mmopd.training.sharding runs every
    per-rank forward on gathered weights); FSDP1 and DeepSpeed ZeRO-3 shard it too but have no
    such path, and every per-rank forward would deadlock."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"launch: WORLD_SIZE={world} but accelerate sees one process (torchrun without GPUs "
            "needs ACCELERATE_USE_CPU=true); the ranks would train independently and overwrite "
            "one run directory")
    ds = accelerator.state.deepspeed_plugin if accelerator.distributed_type == \
        DistributedType.DEEPSPEED else None
    if ds and ds.zero_stage == 3:
        raise ConfigError(
            "launch: DeepSpeed ZeRO-3 shards the student, making every forward a collective, but "
            "mmopd runs per-rank forwards (HF generate, log pi_old scoring, evaluation) "
            "on gathered weights only under FSDP2; use configs/accelerate/fsdp.yaml (FSDP2), or "
            "DDP with model.lora or trainer.gradient_checkpointing=true")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "launch: FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate "
            "config (configs/accelerate/fsdp.yaml)")


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up, then constant / cosine / linear decay (transformers' plain "constant"
    would silently ignore the warm-up)."""
    name = {"constant": "constant_with_warmup"}.get(cfg.schedule, cfg.schedule)
    return get_scheduler(name, optimizer, cfg.warmup_steps, total_steps)
