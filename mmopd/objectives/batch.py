"""The plan's data: `TokenBatch`, the detached per-token quantities of a rollout batch an
objective plans from, and `Plan`, which tokens an optimiser step trains on and with what
advantage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Detached per-token quantities of one rollout batch, flat over its N student tokens."""

    episode_N: torch.Tensor  # long: which episode each token belongs to
    logp_old_N: torch.Tensor  # log pi_old(y_t): the weights that sampled the episode
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

    def gathered(self, x_N: torch.Tensor) -> torch.Tensor:
        """x_N over the whole batch, every rank's tokens (for statistics of the batch)."""
        return x_N if self.gather is None else self.gather(x_N)

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
