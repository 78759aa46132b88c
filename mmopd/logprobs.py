"""Per-token quantities from a causal LM, computed in chunks from final hidden states.

Only positions that predict a student token are projected through the LM head, `chunk_size` rows
at a time, so no [tokens x vocab] float32 tensor exists for more than one chunk. With gradients
on, each chunk runs under activation checkpointing: its logits are recomputed in backward instead
of being kept alive for the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden [n, H] -> float32 logits [n, V]


def lm_head_fn(model: PreTrainedModel, vocab: int | None = None) -> Head:
    """The model's output layer as a function, with its final logit soft-capping if any.

    `vocab` trims padded output rows so two models with different padding compare equal ids.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)
    project = _fsdp_projection(head) or head

    def fn(h: torch.Tensor) -> torch.Tensor:
        # hidden states come back in float32 from a forward under autocast, while the weights
        # may be bf16; outside autocast the matmul needs one dtype
        logits = project(h.to(head.weight.dtype)).float()
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits[..., :vocab] if vocab is not None else logits

    return fn


def _fsdp_projection(head: torch.nn.Module) -> Head | None:
    """For an output layer sharded by FSDP2: the same matmul without the module's FSDP hooks.

    The losses call the head on final hidden states after the model's forward. FSDP2 keeps the
    output layer gathered from the forward until backward (it is in the root's or accelerate's
    tail group, neither resharded after forward), but a second *module call* re-enters its
    forward/backward hooks and crashes backward (a segfault with torch 2.13 on gloo). A plain
    F.linear on the gathered weight gives the same gradient, which FSDP reduce-scatters with the
    rest. Any other head (plain, DDP, peft) is called as a module, unchanged."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without FSDP2
        return None
    if not (isinstance(head, FSDPModule) and isinstance(head, torch.nn.Linear)):
        return None

    def fn(h: torch.Tensor) -> torch.Tensor:
        weight = head.weight
        if isinstance(weight, DTensor):
            raise RuntimeError("FSDP: the output layer is still sharded; run the model's forward "
                               "before projecting its hidden states")
        return torch.nn.functional.linear(h, weight, head.bias)

    return fn


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H], in the forward's compute dtype; the forward skips
    the full-sequence logits. `extra`: further model inputs (a VLM's pixel_values, ...).

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


def chunked_map(fn: Callable[..., tuple[torch.Tensor, ...]], chunk_size: int,
                *tensors_N: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply `fn` to row chunks of the [N, ...] tensors and concatenate its outputs.

    Under autograd, each chunk is checkpointed so its [chunk x V] intermediates are recomputed in
    backward rather than stored.
    """
    n = tensors_N[0].shape[0]
    outs: list[tuple[torch.Tensor, ...]] = []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors_N)
    for s in range(0, n, chunk_size):
        parts = [t[s: s + chunk_size] for t in tensors_N]
        if grad:
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    if not outs:
        probe = fn(*[t[:0] for t in tensors_N])
        return tuple(p for p in probe)
    return tuple(torch.cat(cols) for cols in zip(*outs))


def target_logprobs(head: Head, hidden_NH: torch.Tensor, targets_N: torch.Tensor,
                    chunk_size: int) -> torch.Tensor:
    """log p(target) for N positions, with gradients, chunked (the training-time path)."""

    def fn(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.log_softmax(head(h), dim=-1).gather(-1, y[:, None]).squeeze(-1),)

    return chunked_map(fn, chunk_size, hidden_NH, targets_N)[0]


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


def token_logprobs(head: Head, hidden_NH: torch.Tensor, targets_N: torch.Tensor,
                   chunk_size: int, topk: int = 0, topk_vocab: int | None = None,
                   entropy: bool = True) -> dict[str, torch.Tensor]:
    """log p(target), entropy (NaN with `entropy` false: it costs a third of a chunk's time at
    a real vocabulary) and optionally top-k (ids, log-probs) for N positions.

    `logp` carries gradients when `hidden_NH` does; entropy and top-k are always detached.
    Top-k ids are drawn from the first `topk_vocab` rows (log-probs stay full-vocabulary).
    """

    def fn(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = head(h)
        # without gradients (scoring) in place: two [chunk x V] tensors at most, not four
        logp_all = (torch.log_softmax(logits, dim=-1) if torch.is_grad_enabled()
                    else log_softmax_(logits))
        logp = logp_all.gather(-1, y[:, None]).squeeze(-1)
        with torch.no_grad():
            ent = (entropy_of(logp_all) if entropy
                   else torch.full_like(logp.detach(), float("nan")))
            if topk:
                tv, ti = logp_all[:, :topk_vocab].topk(topk, dim=-1)
                return logp, ent, tv, ti
        return logp, ent

    outs = chunked_map(fn, chunk_size, hidden_NH, targets_N)
    res = {"logp": outs[0], "entropy": outs[1].detach()}
    if topk:
        res["topk_logp"], res["topk_ids"] = outs[2].detach(), outs[3]
    return res
