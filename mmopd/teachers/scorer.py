"""Teachers: score every student token of a batch of episodes.

`HFScorer` runs an in-process model over episodes (no gradients) and returns, flat over the N
student tokens in episode order, log p(sampled token), the entropy and optionally the top-k and the
final hidden states (so full-vocabulary objectives can rebuild logits chunk by chunk later). The
teacher is an `HFScorer` over a separate model, or over a frozen copy of the initial student that
reads a privileged prompt (self-distillation); the trainer also uses one over the student itself to
get log pi_old.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from mmopd.episode import Episode, balanced_parts, collate
from mmopd.logprobs import final_hidden, predicting_positions, projection, token_logprobs
from mmopd.training.sharding import lockstep_count
from mmopd.vision import VisionInputs, forward_kwargs, is_vision_model


@dataclass
class TokenScores:
    """Per-token quantities flat over the N student tokens of a list of episodes."""

    logp_N: torch.Tensor
    entropy_N: torch.Tensor
    topk_ids_NK: torch.Tensor | None = None
    topk_logp_NK: torch.Tensor | None = None
    hidden_NH: torch.Tensor | None = None  # final hidden states, for full-vocab objectives
    # the flat token indices (sorted) whose hidden states hidden_NH holds; None: every token
    hidden_rows_N: torch.Tensor | None = None
    # a cross-tokenizer teacher scores spans of text, not tokens: span_N numbers each token's
    # aligned span (-1: unaligned) and logp_N holds the span's total teacher log-prob on each of
    # its tokens; `spread_spans` (mmopd.teachers.cross) turns them into per-token log-probs
    span_N: torch.Tensor | None = None

    def hidden_at(self, rows_N: torch.Tensor) -> torch.Tensor:
        """The final hidden states of flat tokens `rows_N` (which must be among those kept)."""
        assert self.hidden_NH is not None
        if self.hidden_rows_N is None:
            return self.hidden_NH[rows_N.to(self.hidden_NH.device)]
        at = torch.searchsorted(self.hidden_rows_N, rows_N)
        if not torch.equal(self.hidden_rows_N[at.clamp(max=len(self.hidden_rows_N) - 1)],
                           rows_N):
            raise IndexError("hidden states were kept for other tokens")
        return self.hidden_NH[at.to(self.hidden_NH.device)]


# keep_hidden: False (none), True (every token's) or a sorted LongTensor of flat token indices
# (those tokens' only: a sample for diagnostics need not keep a whole batch's)
KeepHidden = bool | torch.Tensor


class Teacher(Protocol):
    """Anything that scores the student's tokens in the context of the whole episode."""

    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: KeepHidden = False) -> TokenScores:
        ...


def packs(model: Any) -> bool:
    """Whether forwards of `model` run on packed sequences: text models. A VLM's multimodal
    rope positions (3-D, computed from image grids) are computed per padded row."""
    return not is_vision_model(model)


def attention_context(model: Any) -> float | None:
    """The row length at which a token's attention costs as many FLOPs as its linear layers
    (projections and MLP of a decoder layer): packed rows are laid out by it
    (`mmopd.episode.packed_width`). SDPA and eager attend over a whole packed row under a
    block-diagonal mask; a small model's attention is costly next to its linear layers (the
    tiny worlds' students: 512 tokens; Qwen2.5-0.5B: 8,320). None under flash-attention,
    whose variable-length kernels attend within each sequence: one row."""
    config = model.config
    if "flash" in (getattr(config, "_attn_implementation", None) or ""):
        return None
    c = config.get_text_config()
    h, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    mlp = getattr(c, "intermediate_size", None) or 4 * h
    # per token: 2 x (h q + 2 h kv + q h + 3 h mlp) FLOPs; per position attended: 4 q
    return (2 * h * q + 2 * h * kv + 3 * h * mlp) / (2 * q)


class HFScorer:
    """No-grad chunked scoring with an in-process Hugging Face model."""

    def __init__(self, model: PreTrainedModel, pad_id: int, *, view: str = "student",
                 micro_batch_size: int = 16, chunk_size: int = 256,
                 topk_vocab: int | None = None, entropy: bool = True,
                 dtype: torch.dtype | None = None, micro_batch_tokens: int = 0,
                 packed: bool | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.view = view  # which prompt view of each episode the model reads (Episode.view)
        # micro-batches: at most micro_batch_size episodes (and about micro_batch_tokens tokens),
        # token counts balanced; packed without padding between sequences (default: text
        # models; Qwen-VL's 3-D rope positions are computed per padded row), in rows laid out
        # by the attention's cost (`context`; one row under flash-attention)
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.packed = packs(model) if packed is None else packed
        self.context = attention_context(model)
        self.chunk_size = chunk_size
        self.head = projection(model, dtype=dtype)  # dtype: the output layer's compute dtype
        self.topk_vocab = topk_vocab  # top-k ids only among rows the student also has
        self.entropy = entropy  # False: entropy_N is NaN (nothing reads it)

    @torch.no_grad()
    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: KeepHidden = False) -> TokenScores:
        if not episodes:
            raise ValueError("score() needs at least one episode")
        was_training = self.model.training
        kept = keep_hidden if isinstance(keep_hidden, torch.Tensor) else None
        self.model.eval()
        device = self.model.device
        views = [ep.view(self.view) for ep in episodes]
        counts = [sum(1 for m in v[1] if m) for v in views]
        first = [0]
        for c in counts:
            first.append(first[-1] + c)
        parts = balanced_parts([len(v[0]) for v in views], self.micro_batch_size,
                               self.micro_batch_tokens)
        # a sharded model (FSDP2) runs as many forwards on every rank as the busiest rank has
        # micro-batches; the extra ones repeat the first and are dropped
        n_runs = lockstep_count(len(parts), self.model)
        got: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        try:
            for j in range(n_runs):
                part = parts[j] if j < len(parts) else parts[0]
                batch = collate([views[i][0] for i in part], [views[i][1] for i in part],
                                self.pad_id, device, self.packed, self.context)
                if batch.order is not None:  # the sequences as the rows lay them out
                    part = [part[k] for k in batch.order]
                vision = VisionInputs.cat(views[i][2] for i in part)
                hidden = final_hidden(self.model, batch.input_ids, **batch.model_inputs(),
                                      **forward_kwargs(self.model, batch.input_ids, vision))
                rows, cols = predicting_positions(batch.loss_mask)
                h = hidden[rows, cols - 1]
                res = token_logprobs(self.head, h, batch.input_ids[rows, cols], self.chunk_size,
                                     topk, self.topk_vocab, self.entropy)
                if j >= len(parts):
                    continue
                tok = torch.cat([torch.arange(first[i], first[i + 1]) for i in part])
                res = {k: v.cpu() for k, v in res.items()}
                if keep_hidden is True:
                    res["hidden"] = h
                elif kept is not None:  # the kept tokens of this micro-batch only
                    pick = torch.isin(tok, kept)
                    res["hidden"], res["hidden_at"] = h[pick.to(h.device)], tok[pick]
                got.append((tok, res))
        finally:
            self.model.train(was_training)
        out = {k: _in_order(first[-1], [(t, r[k]) for t, r in got])
               for k in got[0][1] if k not in ("hidden", "hidden_at")}
        hidden = None
        if kept is not None:
            at = torch.cat([r["hidden_at"] for _, r in got])
            hidden = torch.cat([r["hidden"] for _, r in got])[torch.argsort(at).to(device)]
        elif keep_hidden is True:
            hidden = _in_order(first[-1], [(t, r["hidden"]) for t, r in got])
        return TokenScores(
            logp_N=out["logp"].float(), entropy_N=out["entropy"].float(),
            topk_ids_NK=out.get("topk_ids"), topk_logp_NK=out.get("topk_logp"),
            hidden_NH=hidden, hidden_rows_N=kept if hidden is not None and kept is not None
            else None)


def _in_order(n: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Rows of each micro-batch's result placed at its flat token indices (episode order)."""
    v0 = parts[0][1]
    out = v0.new_empty((n, *v0.shape[1:]))
    for tok, v in parts:
        out[tok.to(out.device)] = v
    return out
