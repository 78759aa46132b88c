"""The plan's data: `TokenBatch`, the detached per-token quantities of a rollout batch an
objective plans from, and `Plan`, which tokens an optimiser step trains on and with what
advantage."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TokenBatch:
    """Detached per-token quantities of one rollout batch, flat over its N student tokens, or
    of some of its tokens (`part`): a plan at the current policy is made on each micro-batch's
    tokens with the training forward's log-probs."""

    episode_N: torch.Tensor  # long: which episode each token belongs to
    # log pi(y_t) of the policy the plan is made at: pi_old, the weights that sampled the
    # episode, or in a part made at the current policy, log pi_theta
    logp_old_N: torch.Tensor
    logp_teacher_N: torch.Tensor  # log pi_T(y_t) under the teacher's view
    entropy_N: torch.Tensor  # student entropy H_t under pi_old
    reward_E: torch.Tensor  # environment reward per episode [E]
    group_E: torch.Tensor  # long: prompt group per episode [E] (GRPO)
    step_N: torch.Tensor | None = None  # long: assistant turn of each token (multi-turn)
    weight_N: torch.Tensor | None = None  # detached reward weights (SOD, V-Zero); None = all 1
    logp_negative_N: torch.Tensor | None = None  # log pi_T(y_t) under a negative view (V-Zero)
    logp_ref_N: torch.Tensor | None = None  # log pi_ref(y_t), the frozen initial student (G-OPD)
    kl_N: torch.Tensor | None = None  # KL(pi_old || pi_T) at each position, full vocabulary
    overlap_N: torch.Tensor | None = None  # |top-k student ∩ top-k teacher| / k at each position
    teacher_entropy_N: torch.Tensor | None = None  # teacher entropy at each position
    # positions where the teacher gave a distribution (its top-k; a cross-tokenizer teacher: the
    # first token of each aligned span); None = every position
    dist_mask_N: torch.Tensor | None = None
    # the batch may be split over ranks: concatenates a per-token tensor over every rank's share
    # (a collective: all ranks plan together); None = this process holds the whole batch
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    weighted: bool = False  # weight_N holds the reward weights already (reward_weights ran)
    # a part's tokens in the whole batch (None: this is the whole batch) and the whole batch's
    # statistics, shared by its parts (`of_batch`)
    index_N: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    root: TokenBatch | None = field(default=None, repr=False)

    def gathered(self, x_N: torch.Tensor) -> torch.Tensor:
        """x_N over the whole batch, every rank's tokens (for statistics of the batch)."""
        return x_N if self.gather is None else self.gather(x_N)

    def of_batch(self, name: str, fn: Callable[[TokenBatch], Any]) -> Any:
        """A statistic of the whole rollout batch at pi_old (an entropy threshold, a selection
        mask over its tokens), computed once, on the whole batch, and read by its parts; a
        per-token result is indexed by `mine`."""
        if name not in self.stats:
            if self.root is not None and self.root is not self:
                raise RuntimeError(f"the batch statistic {name!r} was not computed on the whole "
                                   "batch before a plan on part of it read it")
            self.stats[name] = fn(self)
        return self.stats[name]

    def mine(self, x_N: torch.Tensor) -> torch.Tensor:
        """This part's entries of a tensor over the whole batch's tokens."""
        return x_N if self.index_N is None else x_N[self.index_N.to(x_N.device)]

    def part(self, idx_N: torch.Tensor, logp_N: torch.Tensor) -> TokenBatch:
        """Tokens `idx_N` of this (whole) batch with the plan's log-probs `logp_N` (the
        training forward's, detached), on the batch's device: a plan made on it at the current
        policy reads the whole batch's statistics. Per-token tensors are indexed; episode ones
        are whole."""
        idx_N = idx_N.to(self.episode_N.device)
        take = {f.name: getattr(self, f.name)[idx_N] for f in dataclasses.fields(self)
                if f.name.endswith("_N") and f.name not in ("logp_old_N", "index_N")
                and getattr(self, f.name) is not None}
        return dataclasses.replace(self, **take, logp_old_N=logp_N.to(self.logp_old_N.device),
                                   gather=None, index_N=idx_N, stats=self.stats, root=self)

    @property
    def token_reward_N(self) -> torch.Tensor:
        """R_t = w_t * (log pi_T(y_t) - log pi_old(y_t)), w_t = 1 without step weighting."""
        r = self.logp_teacher_N - self.logp_old_N
        return r if self.weight_N is None else self.weight_N * r


@dataclass
class Plan:
    """Which tokens an optimiser step trains on, and with what advantage."""

    keep_N: torch.Tensor  # bool
    advantage_N: torch.Tensor  # detached; unused by divergence objectives
    metrics: dict[str, float]
    weight_N: torch.Tensor | None = None  # per-token loss weight of divergence objectives (SOD)
    aux_N: torch.Tensor | None = None  # weight of an objective's auxiliary divergence term

    @property
    def counted_N(self) -> torch.Tensor:
        """Tokens in the loss's token mean: kept ones and those with an auxiliary term."""
        return self.keep_N if self.aux_N is None else self.keep_N | (self.aux_N > 0)
