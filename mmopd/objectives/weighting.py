"""Step weighting for multi-turn episodes: SOD (step-wise divergence reweighting).

A step is one assistant turn. For step k of an episode, d_k is the mean over the turn's tokens of
|log pi_old - log pi_T|, and w_k = min((d_1 + eps) / (d_k + eps), 1 + delta) with w_1 = 1 for the
episode's first turn: turns that drifted further from the teacher than the first get smaller
weights, closer ones at most 1 + delta. The weight is detached and multiplies every token reward
of its turn (ALGORITHMS.md section 3).
"""

from __future__ import annotations

import torch


def sod_weights(logp_old_N: torch.Tensor, logp_teacher_N: torch.Tensor, episode_N: torch.Tensor,
                step_N: torch.Tensor, delta: float = 0.2, eps: float = 1e-6,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token SOD weights [N] and per-turn-index statistics of d and w.

    All inputs are flat over N student tokens: log-probs (float), episode and turn index (long).
    """
    n = logp_old_N.numel()
    if n == 0:
        return torch.ones(0), {}
    dev = logp_old_N.device
    gap_N = (logp_old_N.float() - logp_teacher_N.float()).abs()
    # one segment per (episode, turn); inverse maps each token to its segment
    width = int(step_N.max()) + 1
    key_N = episode_N.long() * width + step_N.long()
    keys_S, seg_N = torch.unique(key_N, return_inverse=True)
    zeros_S = torch.zeros(keys_S.numel(), device=dev)
    count_S = zeros_S.index_add(0, seg_N, torch.ones(n, device=dev))
    d_S = zeros_S.index_add(0, seg_N, gap_N) / count_S
    ep_S, turn_S = keys_S // width, keys_S % width
    # keys are sorted, so each episode's first turn is its first segment
    first = torch.ones_like(ep_S, dtype=torch.bool)
    first[1:] = ep_S[1:] != ep_S[:-1]
    d_first_S = d_S[first][torch.cumsum(first.long(), 0) - 1]
    w_S = torch.clamp((d_first_S + eps) / (d_S + eps), max=1.0 + delta)
    w_S[first] = 1.0
    metrics: dict[str, float] = {}
    for k in turn_S.unique().tolist():
        at = turn_S == k
        for name, x in (("d", d_S[at]), ("w", w_S[at])):
            metrics[f"sod/{name}_mean_turn{k}"] = float(x.mean())
            metrics[f"sod/{name}_min_turn{k}"] = float(x.min())
            metrics[f"sod/{name}_max_turn{k}"] = float(x.max())
    return w_S[seg_N].detach(), metrics
