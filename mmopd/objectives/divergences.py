"""Distribution-level divergences between student and teacher next-token distributions.

Pure functions of logits / log-probs with shapes in their names; N = token positions, V = vocab,
K = top-k. Every result is per position [N] so callers choose the masking and normalisation.
"""

from __future__ import annotations

import math

import torch

KINDS = ("rkl", "fkl", "jsd")


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) along the last dim from log-probs; 0 * log 0 terms count as 0."""
    p_a = logp_a.exp()
    return torch.where(p_a > 0, p_a * (logp_a - logp_b), torch.zeros_like(p_a)).sum(-1)


def divergence_from_logp(kind: str, s_logp: torch.Tensor, t_logp: torch.Tensor,
                         beta: float = 0.5) -> torch.Tensor:
    """Divergence between two normalised distributions given as log-probs [..., V] -> [...].

    rkl = KL(student || teacher); fkl = KL(teacher || student);
    jsd = beta * KL(teacher || M) + (1 - beta) * KL(student || M), M = beta*p_T + (1-beta)*p_S.
    JSD at beta = 0 or 1 vanishes identically, so those ends fall back to the KL that
    JSD_beta / beta (resp. / (1 - beta)) tends to: forward KL at beta = 0, reverse KL at beta = 1.
    """
    if kind == "rkl":
        return _kl(s_logp, t_logp)
    if kind == "fkl":
        return _kl(t_logp, s_logp)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}; choose one of {KINDS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(t_logp, s_logp)
    if beta == 1.0:
        return _kl(s_logp, t_logp)
    m_logp = torch.logsumexp(
        torch.stack([t_logp + math.log(beta), s_logp + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(t_logp, m_logp) + (1.0 - beta) * _kl(s_logp, m_logp)


def full_vocab_divergence(kind: str, s_logits_NV: torch.Tensor, t_logits_NV: torch.Tensor,
                          beta: float = 0.5) -> torch.Tensor:
    """Divergence over the whole vocabulary, from raw logits [N, V] -> [N] (float32 math)."""
    s = torch.log_softmax(s_logits_NV.float(), dim=-1)
    t = torch.log_softmax(t_logits_NV.float(), dim=-1)
    return divergence_from_logp(kind, s, t, beta)


def with_tail(logp_NK: torch.Tensor) -> torch.Tensor:
    """Append the mass outside the K tokens as one bucket: [N, K] -> [N, K + 1], sums to one."""
    mass = logp_NK.exp().sum(-1)
    tail = torch.log1p(-mass.clamp(max=1.0 - 1e-7))  # finite even when the K ids hold all mass
    return torch.cat([logp_NK, tail[:, None]], dim=-1)


def topk_divergence(kind: str, s_logp_NK: torch.Tensor, t_logp_NK: torch.Tensor,
                    beta: float = 0.5) -> torch.Tensor:
    """Divergence over K shared token ids plus a tail bucket.

    Inputs are full-vocabulary log-probs of the same K ids under each model (the ids come from
    the student's or the teacher's top-k); the rest of each distribution is one tail bucket.
    """
    return divergence_from_logp(kind, with_tail(s_logp_NK.float()), with_tail(t_logp_NK.float()),
                                beta)


def uld_distance(s_logp_NK: torch.Tensor, t_logp_NK: torch.Tensor) -> torch.Tensor:
    """ULD's cross-vocabulary distance (Boizard et al., 2024): the L1 distance between the two
    distributions' probabilities sorted in decreasing order, which needs no shared token ids.
    Inputs are each model's top-K log-probs in decreasing order (-inf pads a teacher with fewer);
    the mass outside the top K is one more sorted entry on each side: [N, K] -> [N]."""
    s, t = s_logp_NK.float().exp(), t_logp_NK.float().exp()
    tails = (s.sum(-1) - t.sum(-1)).abs()  # |(1 - sum s) - (1 - sum t)|
    return (s - t).abs().sum(-1) + tails
