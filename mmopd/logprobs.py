"""Per-token quantities from a causal LM, computed in chunks from final hidden states.

Only positions that predict a student token are projected through the output layer
(`Projection`: in the compute dtype, float32 accumulation and logits), `chunk_size` rows at a
time, so no [tokens x vocab] float32 tensor exists for more than one chunk. The losses, with
their gradients, are in mmopd.training.fused; here the no-gradient scoring and the forward that
gives the final hidden states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in the inputs' (compute) dtype with float32 accumulation and a float32 result. On
    CUDA one bf16 / fp16 GEMM writing float32 (logits are not rounded to bf16); elsewhere the
    same arithmetic on upcast inputs."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32, a and b in the compute dtype (float32 accumulation)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    acc.addmm_(a.float(), b.float())


@dataclasses.dataclass(frozen=True)
class Projection:
    """A model's output layer: the linear layer (its weight read at each use, so a layer FSDP2
    has gathered for the forward is seen gathered; called as a plain matmul, not as a module,
    which would re-enter FSDP2's hooks), logit scale and soft-cap, the rows kept (`vocab`, to
    compare two models with differently padded output layers), and the compute dtype (`dtype`,
    None: the weight's). The GEMMs run in the compute dtype with float32 accumulation and
    float32 logits; a float32 master weight is cast once per call, not per chunk.

    Calling it on hidden states [n, H] gives float32 logits [n, rows] (a `Head`)."""

    layer: torch.nn.Linear  # weight [V_full, H]
    scale: float | None = None
    cap: float | None = None
    vocab: int | None = None
    dtype: torch.dtype | None = None

    @property
    def weight(self) -> torch.Tensor:
        w = self.layer.weight
        if type(w).__name__ == "DTensor":
            raise RuntimeError("FSDP: the output layer is still sharded; run the model's forward "
                               "before projecting its hidden states")
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    @property
    def rows(self) -> int:
        return self.weight.shape[0] if self.vocab is None else self.vocab

    def operands(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight rows [rows, H], bias) in the compute dtype, for one call's chunks."""
        w, b = self.weight[: self.rows], self.bias
        dt = self.dtype or w.dtype
        return w.to(dt), (b[: self.rows].to(dt) if b is not None else None)

    def logits(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(final float32 logits, tanh of the capped pre-activation or None) of a chunk, from
        `operands()`."""
        z = mm_fp32(h.to(w.dtype), w.T)
        if b is not None:
            z = z + b.float()
        if self.scale is not None:
            z = z * self.scale
        if self.cap:
            th = torch.tanh(z / self.cap)
            return th * self.cap, th
        return z, None

    def chain(self, g_z: torch.Tensor, th: torch.Tensor | None) -> torch.Tensor:
        """d/d(pre-activation logits) from d/d(final logits)."""
        if th is not None:
            g_z = g_z * (1.0 - th * th)
        if self.scale is not None:
            g_z = g_z * self.scale
        return g_z

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h, *self.operands())[0]


Head = Callable[[torch.Tensor], torch.Tensor]  # hidden [n, H] -> float32 logits [n, V]


def projection(model: Any, vocab: int | None = None,
               dtype: torch.dtype | None = None) -> Projection:
    """The output layer of `model` as a `Projection` (see there for `vocab` and `dtype`)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output layer is a {type(head).__name__}, "
                         "not a linear layer; mmopd's losses project hidden states through a "
                         "linear output layer (LoRA adapters belong on the decoder's layers)")
    cfg = model.config
    return Projection(head, getattr(cfg, "logit_scale", None),
                      getattr(cfg, "final_logit_softcapping", None) or None, vocab, dtype)


def lm_head_fn(model: Any, vocab: int | None = None,
               dtype: torch.dtype | None = None) -> Projection:
    """The model's output layer as a function of hidden states: `projection`."""
    return projection(model, vocab, dtype)


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, **extra: torch.Tensor | None
                 ) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H], in the forward's compute dtype; the forward skips
    the full-sequence logits. `extra`: further model inputs (position_ids of packed sequences,
    a VLM's pixel_values, ...).

    They are taken from the decoder's output by a hook while the whole model runs (its wrappers'
    hooks, FSDP2's and accelerate's, run as usual), not with output_hidden_states=True: that
    keeps every layer's hidden states, which accelerate's mixed-precision wrapper then copies to
    float32, (layers + 1) x [B, T, H] for the one needed."""
    got: list[torch.Tensor] = []

    def take(module: torch.nn.Module, args: Any, out: Any) -> None:
        got.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    inner = model
    while not hasattr(inner, "get_decoder") and isinstance(getattr(inner, "module", None),
                                                           torch.nn.Module):
        inner = inner.module  # DDP's wrapper
    handle = inner.get_decoder().register_forward_hook(take)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
              use_cache=False, **extra)
    finally:
        handle.remove()
    if len(got) != 1:
        raise RuntimeError(f"{type(model).__name__}: its decoder ran {len(got)} times in one "
                           "forward; expected once")
    return got[0]


def predicting_positions(loss_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every loss token, row-major; the hidden state at position-1 predicts
    it."""
    rows, cols = loss_mask_BT.nonzero(as_tuple=True)
    if (cols == 0).any():
        raise ValueError("a loss token at position 0 has no context to be predicted from")
    return rows, cols


ROWS = 32  # rows per step of the in-place passes below: their temporaries stay [32 x V]


def log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """log_softmax in place, ROWS rows at a time (logsumexp's [rows x V] temporary stays
    small); for logits that are not needed afterwards."""
    for r in range(0, z.shape[0], ROWS):
        block = z[r: r + ROWS]
        block.sub_(torch.logsumexp(block, -1, keepdim=True))
    return z


def entropy_of(s: torch.Tensor) -> torch.Tensor:
    """-sum p log p of each row of log-probs `s`, ROWS rows at a time."""
    return torch.cat([torch.mul(b.exp(), b).sum(-1).neg_() for b in s.split(ROWS)]) \
        if s.shape[0] else s.new_zeros(0)


@torch.no_grad()
def token_logprobs(head: Projection, hidden_NH: torch.Tensor, targets_N: torch.Tensor,
                   chunk_size: int, topk: int = 0, topk_vocab: int | None = None,
                   entropy: bool = True) -> dict[str, torch.Tensor]:
    """log p(target), entropy (NaN with `entropy` false: it costs a third of a chunk's time at
    a real vocabulary) and optionally top-k (ids, log-probs) for N positions, without
    gradients (scoring; the losses are in mmopd.training.fused), `chunk_size` rows at a time,
    each chunk's log-softmax in place. Top-k ids are drawn from the first `topk_vocab` rows
    (log-probs stay full-vocabulary)."""
    w, b = head.operands()
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, hidden_NH.shape[0], chunk_size):
        logp_all = log_softmax_(head.logits(hidden_NH[s: s + chunk_size], w, b)[0])
        y = targets_N[s: s + chunk_size]
        parts.setdefault("logp", []).append(logp_all.gather(-1, y[:, None]).squeeze(-1))
        parts.setdefault("entropy", []).append(
            entropy_of(logp_all) if entropy else torch.full_like(y, float("nan"),
                                                                 dtype=torch.float32))
        if topk:
            tv, ti = logp_all[:, :topk_vocab].topk(topk, dim=-1)
            parts.setdefault("topk_logp", []).append(tv)
            parts.setdefault("topk_ids", []).append(ti)
        del logp_all
    if not parts:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        parts = {"logp": [empty], "entropy": [empty]}
        if topk:
            parts["topk_logp"] = [hidden_NH.new_zeros(0, topk, dtype=torch.float32)]
            parts["topk_ids"] = [targets_N.new_zeros(0, topk)]
    return {k: torch.cat(v) for k, v in parts.items()}
