"""The EMA teacher (`teacher.kind=ema`): a float32 copy of the initial student that tracks it."""

from __future__ import annotations

import torch

from mmopd.models import is_lora, merged_state_dict


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta_T <- decay * theta_T + (1 - decay) * theta_S, parameter by parameter (a LoRA
    student: its merged weights, by name)."""
    if is_lora(model):
        merged = merged_state_dict(model)
        for name, p_t in ema.named_parameters():
            p_t.mul_(decay).add_(merged[name].to(p_t.dtype), alpha=1 - decay)
        return
    for p_t, p_s in zip(ema.parameters(), model.parameters(), strict=True):
        p_t.mul_(decay).add_(p_s.detach().to(p_t.dtype), alpha=1 - decay)
