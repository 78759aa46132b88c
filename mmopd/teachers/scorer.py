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
from typing import Protocol

import torch
from transformers import PreTrainedModel

from mmopd.episode import Episode, pad_right
from mmopd.logprobs import final_hidden, predicting_positions, projection, token_logprobs
from mmopd.training.sharding import lockstep_count
from mmopd.vision import VisionInputs, forward_kwargs


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


class HFScorer:
    """No-grad chunked scoring with an in-process Hugging Face model."""

    def __init__(self, model: PreTrainedModel, pad_id: int, *, view: str = "student",
                 micro_batch_size: int = 16, chunk_size: int = 256,
                 topk_vocab: int | None = None, entropy: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.view = view  # which prompt view of each episode the model reads (Episode.view)
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size
        self.head = projection(model, dtype=dtype)  # dtype: the output layer's compute dtype
        self.topk_vocab = topk_vocab  # top-k ids only among rows the student also has
        self.entropy = entropy  # False: entropy_N is NaN (nothing reads it)

    @torch.no_grad()
    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: KeepHidden = False) -> TokenScores:
        was_training = self.model.training
        kept = keep_hidden if isinstance(keep_hidden, torch.Tensor) else None
        offset = 0  # flat index of the micro-batch's first token
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        device = self.model.device
        starts = list(range(0, len(episodes), self.micro_batch_size))
        # a sharded model (FSDP2) runs as many forwards on every rank as the busiest rank has
        # micro-batches; the extra ones repeat the first and are dropped
        n_runs = lockstep_count(len(starts), self.model) if starts else 0
        try:
            for j in range(n_runs):
                repeat = j >= len(starts)
                s = starts[0] if repeat else starts[j]
                views = [ep.view(self.view) for ep in episodes[s: s + self.micro_batch_size]]
                batch = pad_right([v[0] for v in views], [v[1] for v in views], self.pad_id,
                                  device)
                vision = VisionInputs.cat(v[2] for v in views)
                hidden = final_hidden(self.model, batch.input_ids, batch.attention_mask,
                                      **forward_kwargs(self.model, batch.input_ids, vision))
                rows, cols = predicting_positions(batch.loss_mask)
                h = hidden[rows, cols - 1]
                res = token_logprobs(self.head, h, batch.input_ids[rows, cols], self.chunk_size,
                                     topk, self.topk_vocab, self.entropy)
                if repeat:
                    continue
                if kept is not None:  # the kept tokens of this micro-batch only
                    lo, hi = torch.searchsorted(kept, torch.tensor([offset, offset + len(h)]))
                    res["hidden"] = h[(kept[lo:hi] - offset).to(h.device)]
                elif keep_hidden:
                    res["hidden"] = h
                offset += len(h)
                for k, v in res.items():
                    parts.setdefault(k, []).append(v.cpu() if k != "hidden" else v)
        finally:
            self.model.train(was_training)
        if not parts:
            raise ValueError("score() needs at least one episode")
        cat = {k: torch.cat(v) for k, v in parts.items()}
        return TokenScores(
            logp_N=cat["logp"].float(), entropy_N=cat["entropy"].float(),
            topk_ids_NK=cat.get("topk_ids"), topk_logp_NK=cat.get("topk_logp"),
            hidden_NH=cat.get("hidden"), hidden_rows_N=kept if "hidden" in cat else None,
        )
