"""Reward weighting: SOD step weights for multi-turn episodes, V-Zero episode gating.

A step is one assistant turn. For step k of an episode, d_k is the mean over the turn's tokens of
|log pi_old - log pi_T|, and w_k = min((d_1 + eps) / (d_k + eps), 1 + delta) with w_1 = 1 for the
episode's first turn: turns that drifted further from the teacher than the first get smaller
weights, closer ones at most 1 + delta. The weight is detached and multiplies every token reward
of its turn (ALGORITHMS.md section 3).

V-Zero gating (ALGORITHMS.md section 4) weighs whole episodes by how much the teacher's positive
view (the relevant crop) explains the student's tokens better than a negative view does.
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


def vzero_weights(logp_pos_N: torch.Tensor, logp_neg_N: torch.Tensor, episode_N: torch.Tensor,
                  group_E: torch.Tensor, gamma: float = 1.0, alpha: float = 0.5,
                  eps: float = 1e-6) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-episode V-Zero weights [E] and their statistics.

    delta_t = log pi_T(y_t | c+) - log pi_T(y_t | c-); s_t = relu(delta_t) - gamma * relu(-delta_t);
    S = mean_t s_t over each episode's tokens; A = (S - mean_group S) / (std_group S + eps) over
    the samples of one prompt; w = clip(1 + alpha * A, 0, 2), detached. Episodes without tokens
    get S = 0.
    """
    n_e = group_E.numel()
    delta_N = logp_pos_N.float() - logp_neg_N.float()
    s_N = torch.relu(delta_N) - gamma * torch.relu(-delta_N)
    ep = episode_N.long()
    count_E = torch.zeros(n_e).index_add(0, ep, torch.ones_like(s_N))
    S_E = torch.zeros(n_e).index_add(0, ep, s_N) / count_E.clamp(min=1)
    adv_E = torch.zeros(n_e)
    for g in group_E.unique():
        idx = group_E == g
        adv_E[idx] = (S_E[idx] - S_E[idx].mean()) / (S_E[idx].std(correction=0) + eps)
    w_E = torch.clamp(1.0 + alpha * adv_E, 0.0, 2.0).detach()
    metrics = {"vzero/score_mean": float(S_E.mean()) if n_e else 0.0,
               "vzero/delta_mean": float(delta_N.mean()) if delta_N.numel() else 0.0,
               "vzero/w_min": float(w_E.min()) if n_e else 1.0,
               "vzero/w_max": float(w_E.max()) if n_e else 1.0}
    return w_E, metrics
