"""Published on-policy-distillation variants as pure tensor functions (ALGORITHMS.md section 5).

Each function turns detached per-token quantities of a rollout batch into what a variant changes
about plain OPD: an advantage (G-OPD / ExOPD, vOPD), a token selection (TIP, entropy top-rho,
EOPD's teacher-entropy gate, AOPD's split), an extra loss term (EOPD's renormalised top-k forward
KL) or a per-token weight (Prune-OPD-style drift control), plus `pair_stats`, the per-position
student/teacher diagnostics that TIP and drift control are fed from.

Conventions: per-token tensors are flat over the N student tokens of a batch (`_N`); the tokens of
one episode are contiguous and in order, and `episode_N` (long) names each token's episode.
Advantages, scores and weights come back detached; `teacher_topk_fkl` is the one loss term and
keeps the autograd graph of its student input. No configs, no models: torch only.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "gopd_advantage", "vopd_advantage", "minmax", "tip_scores", "top_fraction",
    "teacher_topk_fkl", "eopd_mask", "aopd_split", "pair_stats", "drift_weights",
]


# --- advantages -----------------------------------------------------------------------------

def gopd_advantage(logp_teacher_N: torch.Tensor, logp_old_N: torch.Tensor,
                   logp_ref_N: torch.Tensor, lam: float) -> torch.Tensor:
    """G-OPD / ExOPD advantage [N] (arXiv 2602.12125), detached.

    A_t = lam * (log pi_T - log pi_ref) - (log pi_old - log pi_ref), all at the sampled token.
    lam = 1 is plain OPD (R_t = log pi_T - log pi_old, bit for bit: the reference then cancels and
    is not touched, so an infinite log pi_ref cannot turn it into NaN); lam = 1.25 is ExOPD.
    pi_ref is usually the initial student.
    """
    # Same value as the formula above, regrouped as R_t + (lam - 1) * (log pi_T - log pi_ref) so
    # that lam = 1 reproduces plain OPD exactly rather than up to rounding.
    adv = logp_teacher_N - logp_old_N
    if lam != 1.0:
        adv = adv + (lam - 1.0) * (logp_teacher_N - logp_ref_N)
    return adv.detach()


def vopd_advantage(logp_teacher_N: torch.Tensor, logp_old_N: torch.Tensor,
                   kl_N: torch.Tensor) -> torch.Tensor:
    """vOPD advantage [N] (arXiv 2605.07865), detached: A_t = R_t + KL_t.

    R_t = log pi_T(y_t) - log pi_old(y_t); KL_t = KL(pi_old || pi_T) at position t (full
    vocabulary or top-k + tail, the caller's choice). The closed-form value V_t = -KL_t is the
    expectation of R_t under pi_old, so A_t = R_t - V_t is the same reward with a baseline.
    """
    return (logp_teacher_N - logp_old_N + kl_N).detach()


# --- token selection ------------------------------------------------------------------------

def minmax(x_N: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation to [0, 1]: (x - min) / (max - min), [N] -> [N] (float).

    All-equal input carries no ranking information and maps to zeros, as does empty input.
    """
    x = x_N if x_N.is_floating_point() else x_N.float()
    if x.numel() == 0:
        return torch.zeros_like(x)
    lo, hi = x.min(), x.max()
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))  # no 0/0 in the untaken branch
    return torch.where(span > 0, (x - lo) / safe, torch.zeros_like(x))


def tip_scores(entropy_N: torch.Tensor, kl_N: torch.Tensor) -> torch.Tensor:
    """TIP token scores [N] (arXiv 2604.14084), detached, in [0, 1].

    s = h + d - h * d with h = minmax(student entropy) and d = minmax(KL(pi_theta || pi_T)):
    a soft OR, high when either the student is uncertain or it disagrees with the teacher.
    """
    h, d = minmax(entropy_N), minmax(kl_N)
    return (h + d - h * d).detach()


def top_threshold(x: torch.Tensor, frac: float) -> float:
    """The smallest of the top `frac` fraction of x's values: `x >= it` keeps ceil(frac * n) of
    them (more on ties); NaN for an empty x. The order statistic (kthvalue), not
    torch.quantile, which refuses inputs of more than 2^24 elements (1k episodes x 16k tokens);
    it equals torch.quantile(x, 1 - frac) wherever that lands on an element."""
    n = x.numel()
    if n == 0:
        return float("nan")
    x = x.float().flatten()
    k = min(n, max(1, math.ceil(frac * n - 1e-9 * max(1.0, frac * n))))
    return float(x.kthvalue(n - k + 1).values)


def top_fraction(score_N: torch.Tensor, rho: float) -> torch.Tensor:
    """Bool mask [N] of the top `rho` fraction of tokens by score.

    Keeps k = ceil(rho * N) tokens (so at least one when N > 0); rho * N is taken to 1e-9
    relative precision first, so rho = 0.3 of 10 tokens keeps 3, not 4 (0.3 * 10 is
    3.0000000000000004 in floating point). Ties are broken by index, lower index first; NaN
    scores rank below every number. rho must be in (0, 1].
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"top_fraction: rho must be in (0, 1], got {rho}")
    n = score_N.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=score_N.device)
    if n == 0:
        return keep
    x = rho * n
    k = min(n, max(1, math.ceil(x - 1e-9 * max(1.0, x))))
    score = score_N.detach().reshape(-1).float().nan_to_num(nan=-math.inf)
    # a stable descending sort keeps equal scores in index order
    order = torch.sort(score, descending=True, stable=True).indices
    keep[order[:k]] = True
    return keep.reshape(score_N.shape)


def eopd_mask(teacher_entropy_N: torch.Tensor, tau: float = 0.8) -> torch.Tensor:
    """EOPD gate [N] (bool): where the teacher's entropy exceeds tau nats (strictly)."""
    return teacher_entropy_N > tau


def aopd_split(advantage_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AOPD split of the tokens into two bool masks [N] that partition them.

    (pg_N, div_N): pg_N = advantage > 0, the tokens that keep the policy-gradient term;
    div_N = the rest, which minimise a local divergence to the teacher instead. A token with
    advantage exactly 0 (or NaN) goes to the divergence side: it carries no policy-gradient
    signal, so the divergence is the only thing it could contribute.
    """
    pg = advantage_N > 0
    return pg, ~pg


# --- EOPD's extra loss term -----------------------------------------------------------------

def teacher_topk_fkl(student_logp_at_ids_NK: torch.Tensor,
                     teacher_topk_logp_NK: torch.Tensor) -> torch.Tensor:
    """EOPD forward KL [N] over the teacher's top-k ids (arXiv 2603.07079), float32.

    Both inputs hold log-probs (or logits: only differences within a row matter) of the same K
    token ids per position, the teacher's top-k. Both are renormalised over those K ids,
    p_T = softmax(teacher_topk_logp) and p_S = softmax(student_logp_at_ids), and the result is
    KL(p_T || p_S) per position. Differentiable w.r.t. the student input; the teacher input is
    used as given (detach it if it carries a graph you do not want to train). Ids the teacher
    gives zero probability contribute 0.
    """
    t = torch.log_softmax(teacher_topk_logp_NK.float(), dim=-1)
    s = torch.log_softmax(student_logp_at_ids_NK.float(), dim=-1)
    p_t = t.exp()
    return torch.where(p_t > 0, p_t * (t - s), torch.zeros_like(p_t)).sum(-1)


# --- diagnostics ----------------------------------------------------------------------------

def _entropy(logp_nV: torch.Tensor) -> torch.Tensor:
    p = logp_nV.exp()
    return -torch.where(p > 0, p * logp_nV, torch.zeros_like(p)).sum(-1)


@torch.no_grad()
def pair_stats(student_logits_nV: torch.Tensor, teacher_logits_nV: torch.Tensor,
               k: int) -> dict[str, torch.Tensor]:
    """Per-position student/teacher diagnostics of one chunk of n positions, each [n] float32.

    - "kl": KL(pi_S || pi_T) over the full vocabulary
    - "overlap": |top-k ids of pi_S  intersect  top-k ids of pi_T| / k
    - "teacher_mass": teacher probability on the student's top-k ids
    - "entropy_student", "entropy_teacher": full-vocabulary entropies (nats)

    Inputs are raw logits [n, V] (any float dtype; the math is float32). k > V is clamped to V.
    Ties inside a top-k are broken by torch.topk. No autograd graph is built.
    """
    if student_logits_nV.shape != teacher_logits_nV.shape or student_logits_nV.dim() != 2:
        raise ValueError("pair_stats: student and teacher logits must both be [n, V], got "
                         f"{tuple(student_logits_nV.shape)} and {tuple(teacher_logits_nV.shape)}")
    if k < 1:
        raise ValueError(f"pair_stats: k must be >= 1, got {k}")
    n, v = student_logits_nV.shape
    k = min(k, v)
    s = torch.log_softmax(student_logits_nV.float(), dim=-1)
    t = torch.log_softmax(teacher_logits_nV.float(), dim=-1)
    p_s = s.exp()
    kl = torch.where(p_s > 0, p_s * (s - t), torch.zeros_like(p_s)).sum(-1)
    ids_s, ids_t = s.topk(k, dim=-1).indices, t.topk(k, dim=-1).indices
    in_s = torch.zeros(n, v, dtype=torch.bool, device=s.device).scatter_(1, ids_s, True)
    overlap = in_s.gather(1, ids_t).sum(-1).float() / k  # ids within one top-k are distinct
    teacher_mass = t.exp().gather(1, ids_s).sum(-1)
    return {"kl": kl, "overlap": overlap, "teacher_mass": teacher_mass,
            "entropy_student": _entropy(s), "entropy_teacher": _entropy(t)}


# --- drift control --------------------------------------------------------------------------

def drift_weights(overlap_N: torch.Tensor, episode_N: torch.Tensor, threshold: float,
                  patience: int, down_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune-OPD-style drift weights: (w_N [N] float, detached; drift_start_E [E] long).

    A token is "low" when overlap < threshold (strictly). Within each episode, drift starts at
    the first token of the first run of `patience` consecutive low tokens (runs never cross
    episodes; a good token resets the count). From the drift start to the end of its episode
    every token weighs `down_weight`; all other tokens weigh 1. drift_start_E[e] is the drift
    start's 0-based offset inside episode e, or -1 when episode e never drifts or has no tokens.
    E = max(episode_N) + 1 (0 for empty input). Tokens of one episode must be contiguous and in
    order; episodes may come in any order. O(N) apart from one bincount over E.
    """
    if patience < 1:
        raise ValueError(f"drift_weights: patience must be >= 1, got {patience}")
    if overlap_N.shape != episode_N.shape or overlap_N.dim() != 1:
        raise ValueError("drift_weights: overlap_N and episode_N must both be flat [N], got "
                         f"{tuple(overlap_N.shape)} and {tuple(episode_N.shape)}")
    dev = overlap_N.device
    w_dtype = overlap_N.dtype if overlap_N.is_floating_point() else torch.float32
    n = overlap_N.numel()
    if n == 0:
        return (torch.ones(0, dtype=w_dtype, device=dev),
                torch.zeros(0, dtype=torch.long, device=dev))
    ep = episode_N.long()
    if int(ep.min()) < 0:
        raise ValueError("drift_weights: episode ids must be >= 0")
    n_e = int(ep.max()) + 1
    ep_change = ep[1:] != ep[:-1]
    if int(ep_change.sum()) + 1 != int((torch.bincount(ep, minlength=n_e) > 0).sum()):
        raise ValueError("drift_weights: the tokens of each episode must be contiguous")
    low = (overlap_N < threshold).reshape(-1)
    idx = torch.arange(n, device=dev)
    # Runs of equal `low` inside one episode; run r starts at token start_R[r].
    new_run = torch.ones(n, dtype=torch.bool, device=dev)
    new_run[1:] = ep_change | (low[1:] != low[:-1])
    start_R = idx[new_run]
    len_R = torch.diff(start_R, append=torch.tensor([n], device=dev))
    drifting_R = low[start_R] & (len_R >= patience)
    cand = start_R[drifting_R]
    # earliest qualifying run start and first token per episode, as global indices (n = none)
    drift_at_E = torch.full((n_e,), n, dtype=torch.long, device=dev)
    drift_at_E = drift_at_E.scatter_reduce(0, ep[cand], cand, "amin")
    first_E = torch.full((n_e,), n, dtype=torch.long, device=dev)
    first_E = first_E.scatter_reduce(0, ep, idx, "amin")
    drift_start_E = torch.where(drift_at_E < n, drift_at_E - first_E, torch.full_like(first_E, -1))
    down = idx >= drift_at_E[ep]
    w = torch.where(down, torch.full((n,), down_weight, dtype=w_dtype, device=dev),
                    torch.ones(n, dtype=w_dtype, device=dev))
    return w.detach(), drift_start_E


def grpo_advantages(reward_E: torch.Tensor, group_E: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); population std over the group."""
    reward_E = reward_E.float()
    adv = torch.zeros_like(reward_E)
    for g in group_E.unique():
        idx = group_E == g
        r = reward_E[idx]
        adv[idx] = (r - r.mean()) / (r.std(correction=0) + eps)
    return adv
