"""Plans made token by token inside the loss, from the training forward's own log pi_old.

When one optimiser step trains a rollout batch (rho = 1), the student's weights at that step are
the rollout's: the training forward's log-probs of the sampled tokens, detached, are log pi_old,
and a separate no-grad pass of the student over the batch only computes them a second time. An
objective whose plan reads pi_old token by token (`Objective.tokens`: OPD, REOPOLD before its
switch step, G-OPD, ExOPD) is then planned inside the loss's chunks: each chunk's advantages and
keep mask come from its own log-probs. The token-mean divisor (REOPOLD's kept count depends on
pi_old) is applied to the gradients after accumulation, and the whole batch's plan, for its
metrics, is made afterwards from the same numbers. Divergence objectives (rkl, fkl, jsd, ULD,
OPSD) read no pi_old in their plans: they are planned before the loss as usual, and their
chunks hand back the sampled tokens' log-probs and the entropies for the metrics.

Plans that need the whole batch's pi_old before the first token's gradient (an entropy quantile:
REOPOLD's refinement, token selection; SOD's per-step means; drift, vOPD and TIP, which need the
student's whole distribution next to the teacher's) keep the separate pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mmopd.objectives import (
    Objective,
    TokenBatch,
    needed_scores,
    outcome_advantages,
    reward_weights,
)

if TYPE_CHECKING:
    from mmopd.config import ObjectiveConfig

# (flat token indices, their log pi_old) -> (advantage, keep) of those tokens
TokenPlanner = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def plannable(obj: Objective, step: int, total: int, cfg: ObjectiveConfig) -> str | None:
    """Why the plan at optimiser step `step` cannot be made token by token, or None if it can."""
    if obj.tokens is None:
        return f"objective {obj.name} has no token-by-token plan"
    if obj.aux is not None:
        return f"objective {obj.name} adds an auxiliary divergence"
    if cfg.step_weighting != "none":
        return "step weighting averages pi_old over each turn"
    if cfg.token_selection != "none":
        return "token selection ranks the whole batch"
    if cfg.drift_threshold > 0 or needed_scores(obj, cfg) & {"kl", "overlap"}:
        return "the plan reads the student's whole distribution next to the teacher's"
    if obj.tokens(_empty(), step, total, cfg) is None:
        return f"objective {obj.name} reads the whole batch at step {step}"
    return None


def token_planner(obj: Objective, tb: TokenBatch, step: int, total: int,
                  cfg: ObjectiveConfig, device: torch.device) -> TokenPlanner:
    """The plan of step `step` token by token: for some of `tb`'s tokens and their log pi_old,
    their advantages and keep mask, equal to `make_plan`'s on the whole batch. `tb`'s own
    log pi_old is not read. Only for a policy-gradient plan that `plannable` accepts (a
    divergence objective's plan reads no log pi_old: it is made before the loss)."""
    why = "a divergence objective is planned before the loss" if obj.kind != "pg" else \
        plannable(obj, step, total, cfg)
    if why is not None:
        raise ValueError(f"the plan cannot be made token by token: {why}")
    tb, _ = reward_weights(tb, cfg)  # V-Zero's episode weights: teacher scores only
    episode = tb.episode_N.to(device)
    teacher = tb.logp_teacher_N.to(device)
    weight = tb.weight_N.to(device) if tb.weight_N is not None else None
    ref = tb.logp_ref_N.to(device) if tb.logp_ref_N is not None else None
    outcome = outcome_advantages(tb, cfg)
    outcome = outcome.to(device) if outcome is not None else None

    def plan(idx: torch.Tensor, logp_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sub = TokenBatch(
            episode_N=episode[idx], logp_old_N=logp_old, logp_teacher_N=teacher[idx],
            entropy_N=torch.full_like(logp_old, float("nan")), reward_E=tb.reward_E,
            group_E=tb.group_E, weight_N=weight[idx] if weight is not None else None,
            logp_ref_N=ref[idx] if ref is not None else None)
        got = obj.tokens(sub, step, total, cfg)  # type: ignore[misc]
        assert got is not None
        adv, keep = got
        if outcome is not None:
            adv = adv + outcome[sub.episode_N]
        return adv, keep

    return plan


def _empty() -> TokenBatch:
    """A batch of no tokens, to ask an objective whether it plans token by token at a step."""
    f, i = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return TokenBatch(episode_N=i, logp_old_N=f, logp_teacher_N=f, entropy_N=f,
                      reward_E=f, group_E=i, step_N=i, logp_ref_N=f, logp_negative_N=f)
