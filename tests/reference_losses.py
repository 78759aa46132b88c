"""The trainer's losses through plain autograd: the reference the fused path (mmopd.training.fused,
the only one the trainer runs) is checked against.

Logits are rebuilt chunk by chunk from hidden states and each chunk is checkpointed, so no
[tokens x vocab] tensor of a whole batch exists here either; backward recomputes each chunk. The
functions have the signatures of the trainer's (mmopd.training.losses), so a test can run the
whole trainer on them (monkeypatch) and compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from mmopd.objectives import full_vocab_divergence, policy_loss_sum, topk_divergence
from mmopd.objectives.divergences import uld_distance
from mmopd.objectives.zoo import teacher_topk_fkl


def chunked_map(fn: Callable[..., tuple[torch.Tensor, ...]], chunk_size: int,
                *tensors_N: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`fn` on row chunks of the [N, ...] tensors, outputs concatenated; under autograd each
    chunk is checkpointed (its [chunk x V] intermediates recomputed in backward)."""
    n = tensors_N[0].shape[0]
    outs: list[tuple[torch.Tensor, ...]] = []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors_N)
    for s in range(0, n, chunk_size):
        parts = [t[s: s + chunk_size] for t in tensors_N]
        outs.append(checkpoint(fn, *parts, use_reentrant=False) if grad else fn(*parts))
    if not outs:
        return tuple(fn(*[t[:0] for t in tensors_N]))
    return tuple(torch.cat(cols) for cols in zip(*outs))


def target_logprobs(head, hidden_NH: torch.Tensor, targets_N: torch.Tensor,
                    chunk_size: int) -> torch.Tensor:
    """log p(target) for N positions, with gradients, chunked."""
    def fn(h, y):
        return (torch.log_softmax(head(h), dim=-1).gather(-1, y[:, None]).squeeze(-1),)
    return chunked_map(fn, chunk_size, hidden_NH, targets_N)[0]


def divergence_sum(kind, k, cfg, heads, h_NH, scores, tok, keep_N, sink=None):
    """`mmopd.training.losses.divergence_sum` through autograd (no `sink`: the sampled tokens'
    log-probs come from the fused path only)."""
    assert sink is None
    beta, chunk = cfg.objective.jsd_beta, cfg.trainer.chunk_size
    s_head, t_head = heads.student, heads.teacher
    dev = h_NH.device
    if kind == "uld":
        t_lp = torch.nan_to_num(scores.topk_logp_NK[tok].to(dev).float(), nan=-math.inf)

        def fn(h, t):
            return (uld_distance(torch.log_softmax(s_head(h), -1).topk(t.shape[1], -1).values,
                                 t),)
        (d,) = chunked_map(fn, chunk, h_NH, t_lp)
    elif k == 0:
        def fn(h, ht):
            return (full_vocab_divergence(kind, s_head(h), t_head(ht), beta),)
        (d,) = chunked_map(fn, chunk, h_NH, scores.hidden_NH[tok])
    elif cfg.objective.topk_source == "student":
        def fn(h, ht):
            s = torch.log_softmax(s_head(h), -1)
            ids = s.detach().topk(k, -1).indices
            t = torch.log_softmax(t_head(ht), -1)
            return (topk_divergence(kind, s.gather(-1, ids), t.gather(-1, ids), beta),)
        (d,) = chunked_map(fn, chunk, h_NH, scores.hidden_NH[tok])
    else:
        def fn(h, ids, tlp):
            s = torch.log_softmax(s_head(h), -1)
            return (topk_divergence(kind, s.gather(-1, ids), tlp, beta),)
        (d,) = chunked_map(fn, chunk, h_NH, scores.topk_ids_NK[tok], scores.topk_logp_NK[tok])
    return (d * keep_N.to(d.device)).sum()


def policy_loss(proj, h, y, logp_old, adv, weight, clip, cfg, reward_grad=False, sink=None):
    """`mmopd.training.losses._fused_policy_loss` through autograd: (loss sum, log-probs);
    `sink` gets the sampled tokens' log-probs and entropies from a no-grad pass."""
    logp = target_logprobs(proj, h, y, cfg.trainer.chunk_size)
    if sink is not None:
        with torch.no_grad():
            for s in range(0, h.shape[0], cfg.trainer.chunk_size):
                sink.take(torch.log_softmax(proj(h[s: s + cfg.trainer.chunk_size]), -1),
                          slice(s, s + cfg.trainer.chunk_size))
    return policy_loss_sum(logp, logp_old, adv, weight, clip, reward_grad), logp.detach()


def aux_sum(objective, cfg, heads, h_NH, teach, tok, aux_N):
    """`mmopd.training.losses.aux_sum` through autograd."""
    sel = (aux_N > 0).nonzero().squeeze(-1)
    if not sel.numel():
        return h_NH.sum() * 0.0
    if objective.aux == "teacher_topk_fkl":
        k = cfg.objective.eopd_topk
        ids, tlp = teach.topk_ids_NK[tok[sel], :k], teach.topk_logp_NK[tok[sel], :k]

        def fn(h, i, t):
            return (teacher_topk_fkl(torch.log_softmax(heads.student(h), -1).gather(-1, i), t),)
        (d,) = chunked_map(fn, cfg.trainer.chunk_size, h_NH[sel], ids, tlp)
        return (d * aux_N[sel]).sum()
    return divergence_sum(cfg.objective.aopd_divergence, 0, cfg, heads, h_NH[sel], teach,
                          tok[sel], aux_N[sel])


def use_autograd(monkeypatch) -> None:
    """Run the trainer's losses through this module's autograd versions."""
    from mmopd.training import losses

    monkeypatch.setattr(losses, "divergence_sum", divergence_sum)
    monkeypatch.setattr(losses, "_fused_policy_loss", policy_loss)
    monkeypatch.setattr(losses, "aux_sum", aux_sum)
