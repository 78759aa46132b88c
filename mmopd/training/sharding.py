"""Fully sharded students (FSDP2 through accelerate): what runs sharded, what runs gathered.

Under FSDP2 every forward of a sharded module all-gathers that module's weights, a collective
that all ranks must join in the same order. The trainer keeps to two rules:

- The training forward and backward run sharded, in lock-step: every rank runs the same number
  of micro-batches (`lockstep_count`; a rank with fewer repeats its first one at zero weight,
  so the same modules, a VLM's vision tower included, gather in the same order).
- Everything that differs per rank (generating its own episodes, scoring log pi_old on them,
  evaluating its share of the held-out problems) runs inside `full_weights`. It gathers the
  student once on every rank and keeps it gathered, so the forwards inside are local (no
  collective, any number per rank). It frees the gathered weights on leaving. A rollout engine
  holds full weights the same way.

Checkpoints stay `save_pretrained` folders: `full_state_dict` gathers the weights to rank 0,
which writes them. The optimiser state is written sharded by every rank with
torch.distributed.checkpoint (`optimizer/` in the checkpoint) and read back sharded on resume.
An in-process teacher is replicated on every rank, frozen, in its dtype, unless `teacher.shard`
shards it too (`shard_frozen`; its scoring forwards then run in lock-step).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmopd.config import ConfigError, TrainConfig


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 sharded in `model` (empty: not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model))


@contextlib.contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside: `model`'s parameters are whole on this rank and stay so across forwards, which are
    then local computations. Entering is a collective (every rank must enter, in the same order);
    leaving frees the gathered copies. A model that is not sharded passes through unchanged."""
    mods = fsdp_modules(model)
    if not mods:
        yield
        return
    # FSDP2 takes the first module to run forward as its root; a VLM's generate may call the
    # vision tower alone first, so the outermost module is made the root before anything runs
    mods[0]._get_fsdp_state()._lazy_init()
    # each module's own setting, to restore (the root's differs: FSDP2 keeps it unsharded)
    was = [any(g.post_forward_mesh_info is not None
               for g in m._get_fsdp_state()._fsdp_param_groups) for m in mods]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m, reshard in zip(mods, was):
            m.set_reshard_after_forward(reshard, recurse=False)
            m.reshard()


def lockstep_count(n: int, model: torch.nn.Module) -> int:
    """How many forwards of a sharded `model` every rank runs when this rank has `n` to run:
    the largest over ranks (a collective); `n` when the model is not sharded, or is gathered
    (inside `full_weights`, where its forwards are local)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return n
    t = torch.tensor(n, device=next(model.parameters()).device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def shard_frozen(model: torch.nn.Module, device: torch.device) -> None:
    """Shard a frozen in-process teacher over all ranks (`teacher.shard`): each block of its
    `_no_split_modules` classes and the root, as accelerate shards the student. Its blocks are
    gathered for each forward and freed after; the root (embeddings, final norm, output layer)
    stays gathered after the first forward, so the losses can apply the output layer.

    Rank 0 holds the weights on the CPU; the other ranks may hold the structure only (meta
    device: they read no checkpoint). Sharding moves one block at a time to the device, and
    rank 0 then sends every rank its shards (`broadcast_from_rank0`), so no device ever holds
    the whole teacher and only rank 0's host memory holds it once."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    if not blocks:
        raise ConfigError(f"teacher.shard: {type(model).__name__} names no blocks to shard "
                          "(_no_split_modules); set teacher.shard=false")
    rank0 = dist.get_rank() == 0
    full = model.state_dict() if rank0 else {}  # kept on the CPU, sent shard by shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for m in list(model.modules()):
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model.to_empty(device=device)  # storage for the shards rank 0 sends
    set_model_state_dict(model, full, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    for buf in model.buffers():  # not in a state dict (rotary frequencies): rank 0's
        dist.broadcast(buf, src=0)
    model._get_fsdp_state()._lazy_init()  # the root, before a block could claim it


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (CPU; empty on other ranks). Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    # a tied weight (lm_head = embed_tokens) gathers as a copy of its own; save_pretrained
    # writes it once when it is the same tensor, as from an unsharded model
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state


def staged_optimizer(root: Path, step: int, accelerator: Any) -> Path:
    """An empty directory beside the checkpoints for step `step`'s optimiser shards; the
    checkpoint writer moves it into the checkpoint (rank 0 makes it, every rank gets its path)."""
    path = root / f".optimizer-step-{step}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob(".optimizer-step-*.tmp"):  # left by a run that was killed
            shutil.rmtree(stale, ignore_errors=True)
        path.mkdir(parents=True)
    accelerator.wait_for_everyone()
    return path


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its shard of the optimiser state under `path` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper: the torch one
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank reads its shard of the optimiser state written by `save_optimizer`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper: the torch one
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def check_sharded_run(cfg: TrainConfig) -> None:
    """Refuse, before any model loads, what does not run with a sharded student."""
    refused = []
    if cfg.model.lora is not None:
        refused.append("model.lora (a sharded peft model trains, but generating on its "
                       "gathered weights fails inside peft's LoRA layers; LoRA students train "
                       "under DDP, where their frozen base needs no optimiser state)")
    if any(t.kind == "ema" for t in cfg.teacher_list):
        refused.append("teacher.kind=ema (the EMA copy tracks unsharded weights; use "
                       "teacher.kind=self for a frozen copy of the initial student)")
    if cfg.warmup.steps:
        refused.append("warmup.steps > 0 (the off-policy warm-up's micro-batches are not run "
                       "in lock-step)")
    if cfg.objective.drift_stop:
        refused.append("objective.drift_stop (Prune-OPD's stop scores the student outside "
                       "the gathered rollout)")
    if refused:
        raise ConfigError("FSDP: this run shards the student (FSDP2), which does not support: "
                          + "; ".join(refused))


def fsdp_requested() -> bool:
    """Did the launcher ask for FSDP (`accelerate launch` with an FSDP config, or the
    environment it sets)?"""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
