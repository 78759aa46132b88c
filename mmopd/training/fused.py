"""Fused chunked losses over the output layer: loss and gradients in one pass over the logits,
the only loss path the trainer runs.

Autograd through chunked logits (tests/reference_losses.py keeps it, as the reference these
are checked against) builds each chunk's [n x V] logits, runs log_softmax and the divergence
under autograd, and checkpoints the chunk, so backward computes the chunk a second time and
materialises a [V x H] output-layer gradient per chunk. Here every per-token weight is known
before a chunk runs, so each chunk computes its loss and the gradient of that loss with respect
to its logits in closed form (softmax statistics kept, no autograd through log_softmax), and
turns it at once into the gradient for the hidden states (g_z @ W) and into one float32 [V x H]
buffer for the output layer (W += g_z^T @ h). Backward only hands those gradients on (scaled by
the incoming gradient): nothing is recomputed. The three GEMMs run in the compute dtype
(`Projection.dtype`, bf16 under trainer.bf16) with float32 accumulation; logits, softmax
statistics and the output layer's gradient stay float32.

Closed forms, with s = log softmax(z), p = exp(s), t the teacher's log-probs, q = exp(t):

- rkl = sum p (s - t):                     dz = p * ((s - t) - rkl)
- fkl = sum q (t - s):                     dz = p - q
- jsd_beta (0 < beta < 1), m = beta q + (1 - beta) p, a = (1 - beta)(s - log m):
                                            dz = p * (a - sum p a)
  (beta = 0 is fkl and beta = 1 rkl, as in `divergence_from_logp`)
- any loss f of the log-probs of K gathered ids per token (the sampled token's log-prob for
  policy-gradient objectives, top-k + tail divergences, EOPD's renormalised top-k): g = df/ds_K
  from autograd on the small [n, K] tensor, then dz = scatter(g at ids) - p * sum g.

Soft-capped and scaled logits (Gemma-style) are chained through elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mmopd.logprobs import Projection, addmm_fp32_, entropy_of, log_softmax_, mm_fp32, projection
from mmopd.objectives.divergences import KINDS

__all__ = ["ChunkGrad", "Projection", "SampledScores", "divergence_grad", "full_divergence_chunks",
           "fused_loss", "gathered_chunks", "nll_sum", "projection"]

# (logits [n, V] float32, rows of this chunk) -> (sum of the chunk's weighted losses, d/dlogits)
ChunkGrad = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


class _FusedChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h_NH: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                proj: Projection, chunk_grad: ChunkGrad, chunk: int) -> torch.Tensor:
        rows = proj.rows
        w, b = proj.operands()  # the compute dtype, cast once for every chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h_NH) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h_NH.device)
        for s in range(0, h_NH.shape[0], chunk):
            sl = slice(s, s + chunk)
            h = h_NH[sl].to(w.dtype)
            z, th = proj.logits(h, w, b)
            loss, g_z = chunk_grad(z, sl)
            total += loss
            g_x = proj.chain(g_z, th)
            del z, th, g_z
            if grad_b is not None:
                grad_b[:rows] += g_x.sum(0)
            g_x = g_x.to(w.dtype)  # the GEMMs below in the compute dtype, accumulating in fp32
            if grad_h is not None:
                grad_h[sl] = mm_fp32(g_x, w).to(grad_h.dtype)
            if grad_w is not None:
                addmm_fp32_(grad_w[:rows], g_x.T, h)
            del g_x  # before the next chunk's logits: one [chunk x V] gradient alive, not two
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # the buffers go to autograd (AccumulateGrad may keep them as .grad)
        scale = None if bool(grad_out == 1) else grad_out
        out = []
        for g, dtype in ((grad_h, None), (grad_w, ctx.dtypes[0]), (grad_b, ctx.dtypes[1])):
            if g is None:
                out.append(None)
                continue
            if scale is not None:
                g = g.mul_(scale.to(g.dtype))
            out.append(g if dtype is None or g.dtype == dtype else g.to(dtype))
        return (*out, None, None, None)


def nll_sum(proj: Projection, h_NH: torch.Tensor, targets_N: torch.Tensor,
            chunk: int) -> torch.Tensor:
    """-sum log p(target) over N positions (supervised fine-tuning), fused."""
    return fused_loss(proj, h_NH, gathered_chunks(lambda s, sl: targets_N[sl, None],
                                                  lambda lp, sl: -lp.sum()), chunk)


def fused_loss(proj: Projection, h_NH: torch.Tensor, chunk_grad: ChunkGrad,
               chunk: int) -> torch.Tensor:
    """Scalar sum of the chunks' losses, differentiable with respect to `h_NH` and the output
    layer's weight and bias; `chunk_grad` gives each chunk's loss and d/dlogits."""
    return _FusedChunks.apply(h_NH, proj.weight, proj.bias, proj, chunk_grad, chunk)


# ----------------------------------------------------------------------------- chunk gradients


def divergence_grad(kind: str, s: torch.Tensor, t: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token divergence [n], d/dlogits [n, V]) from student log-probs `s` and fixed teacher
    log-probs `t`. Works in place on `t` (the chunk's teacher log-probs are not needed
    afterwards), so few [n, V] tensors are alive at once."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {KINDS}")
    if kind == "jsd" and beta == 0.0:
        kind = "fkl"
    elif kind == "jsd" and beta == 1.0:
        kind = "rkl"
    p = s.exp()
    if kind == "rkl":
        terms = t.neg_().add_(s).mul_(p).masked_fill_(p == 0, 0.0)  # p (s - t), 0 where p = 0
        d = terms.sum(-1)
        return d, terms.sub_(p.mul_(d[:, None]))
    q = t.exp()
    if kind == "fkl":
        d = (t - s).mul_(q).masked_fill_(q == 0, 0.0).sum(-1)
        return d, p.sub_(q)
    m = torch.logaddexp(t + math.log(beta), s + math.log(1.0 - beta))
    d = t.sub_(m).mul_(q).masked_fill_(q == 0, 0.0).sum(-1).mul_(beta)  # beta KL(q || m)
    del q
    pa = m.neg_().add_(s).mul_(p).mul_(1.0 - beta).masked_fill_(p == 0, 0.0)  # (1-b) p (s-m)
    total = pa.sum(-1, keepdim=True)
    return d.add_(total.squeeze(-1)), pa.sub_(p.mul_(total))


def full_divergence_chunks(kind: str, beta: float, teacher_logp: Callable[[slice], torch.Tensor],
                           weight_N: torch.Tensor, sink: SampledScores | None = None
                           ) -> ChunkGrad:
    """Chunk gradients of sum_i weight_i * D(student_i, teacher_i) over the whole vocabulary;
    `teacher_logp(rows)` gives the teacher's log-probs [n, V] of those rows as a new tensor
    (it is overwritten). `sink` receives the sampled tokens' log-probs and the entropies."""
    def fn(z: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        s = log_softmax_(z)
        if sink is not None:
            sink.take(s, sl)
        with torch.no_grad():
            t = teacher_logp(sl)
        d, g = divergence_grad(kind, s, t, beta)
        del s, t
        w = weight_N[sl].to(g.dtype)
        return (d * w).sum(), g.mul_(w[:, None])
    return fn


class SampledScores:
    """Collects, chunk by chunk, each position's log-prob of its sampled token and the entropy
    of the student's distribution there: with one optimiser step per rollout batch, the
    training forward's log pi_old and entropy (mmopd.training.old_policy)."""

    def __init__(self, sampled_N: torch.Tensor) -> None:
        self.sampled_N = sampled_N
        self.logp: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []

    def take(self, s: torch.Tensor, sl: slice) -> None:
        """From a chunk's student log-probs `s` [n, V] (rows `sl`)."""
        with torch.no_grad():
            self.logp.append(s.gather(-1, self.sampled_N[sl, None]).squeeze(-1))
            self.entropy.append(entropy_of(s))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.logp:
            empty = self.sampled_N.new_zeros(0, dtype=torch.float32)
            return empty, empty.clone()
        return torch.cat(self.logp), torch.cat(self.entropy)


def gathered_chunks(ids_NK: Callable[[torch.Tensor, slice], torch.Tensor],
                    loss: Callable[[torch.Tensor, slice], torch.Tensor],
                    keep: list[torch.Tensor] | None = None,
                    sink: SampledScores | None = None) -> ChunkGrad:
    """Chunk gradients of sum over tokens of `loss(logp_nK, rows)`, a function of the student's
    log-probs at K ids per token (`ids_NK(student_logp, rows)` picks them, e.g. the sampled
    token or a top-k). `keep`, when given, receives each chunk's detached log-probs, and
    `sink` the sampled tokens' log-probs and the entropies."""
    def fn(z: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        s = log_softmax_(z)
        if sink is not None:
            sink.take(s, sl)
        ids = ids_NK(s, sl)
        with torch.enable_grad():
            lp = s.gather(-1, ids).detach().requires_grad_(True)
            value = loss(lp, sl)
            (g,) = torch.autograd.grad(value, lp)
        if keep is not None:
            keep.append(lp.detach())
        g_z = s.exp_().mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids, g)  # s is spent
        return value.detach(), g_z
    return fn
