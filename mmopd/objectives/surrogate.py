"""The policy-gradient surrogate: -rho * A summed over kept tokens, optionally PPO-clipped."""

from __future__ import annotations

import torch


def policy_loss_sum(logp_new_N: torch.Tensor, logp_old_N: torch.Tensor,
                    advantage_N: torch.Tensor, keep_N: torch.Tensor,
                    ratio_clip: tuple[float, float] | None = None,
                    reward_grad: bool = False) -> torch.Tensor:
    """sum_t -rho_t * A_t over kept tokens, rho_t = exp(log pi_theta - log pi_old).

    With `ratio_clip` = (low, high), the PPO surrogate
    -min(rho_t * A_t, clip(rho_t, low, high) * A_t): a token whose ratio has already moved past
    the bound in the direction its advantage pushes gets no gradient. With `reward_grad` the
    advantage is a token reward R = log pi_T - log pi_theta that keeps its gradient (no
    stop-gradient): A_t - (log pi_theta - sg(log pi_theta)), equal in value, whose gradient adds
    -rho_t to each token's. The caller divides by the normaliser.
    """
    rho = torch.exp(logp_new_N - logp_old_N.detach())
    adv = advantage_N.detach()
    if reward_grad:
        adv = adv - (logp_new_N - logp_new_N.detach())
    surrogate = rho * adv
    if ratio_clip is not None:
        surrogate = torch.minimum(surrogate, rho.clamp(*ratio_clip) * adv)
    return -(surrogate * keep_N).sum()


def ratio_clipped(logp_new_N: torch.Tensor, logp_old_N: torch.Tensor, advantage_N: torch.Tensor,
                  ratio_clip: tuple[float, float]) -> torch.Tensor:
    """bool: tokens whose clipped term is the smaller one, so they get no gradient."""
    rho = torch.exp(logp_new_N - logp_old_N)
    low, high = ratio_clip
    return ((rho > high) & (advantage_N > 0)) | ((rho < low) & (advantage_N < 0))
