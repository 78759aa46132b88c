"""Objectives: registered by name, pure functions of per-token tensors.

An objective's `plan` reads detached per-token quantities (`TokenBatch`, flat over the N student
tokens of a rollout batch) and decides which tokens count (`keep`) and, for policy-gradient
objectives, each token's advantage. The loss itself is then either the policy-gradient surrogate
`-rho * advantage` or a per-token divergence to the teacher, summed over kept tokens and divided
by the kept tokens of each query (`objective.normaliser: query`, averaged over the minibatch's
queries) or of the whole minibatch (`batch`).

A plan is made on the whole rollout batch at pi_old (its metrics; the tokens and advantages of a
reward taken at the rollout). A token-local plan (`Objective.token_local`: each token decided
from its own entries and statistics of the whole batch read through `TokenBatch.of_batch`) is
also made again on each micro-batch's tokens with the log-probs of the training forward: the
reward at the parameters being updated (`objective.reward_at: current`, REOPOLD's Eq. 4-5), and
log pi_old itself when one optimiser step trains the rollout batch (mmopd.training.old_policy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mmopd.objectives.batch import Plan, TokenBatch
from mmopd.objectives.divergences import (
    KINDS,
    divergence_from_logp,
    full_vocab_divergence,
    topk_divergence,
    with_tail,
)
from mmopd.objectives.needs import needed_scores, needs_teacher_hidden
from mmopd.objectives.surrogate import policy_loss_sum, ratio_clipped
from mmopd.objectives.weighting import sod_weights, vzero_weights
from mmopd.objectives.zoo import (
    aopd_split,
    drift_weights,
    eopd_mask,
    gopd_advantage,
    grpo_advantages,
    tip_scores,
    top_fraction,
    top_threshold,
    vopd_advantage,
)

if TYPE_CHECKING:  # the config imports the registry to validate names
    from mmopd.config import ObjectiveConfig

__all__ = [
    "OBJECTIVES", "Objective", "Plan", "TokenBatch", "register_objective", "policy_loss_sum",
    "ratio_clipped",
    "reopold_floor", "grpo_advantages", "full_vocab_divergence", "topk_divergence",
    "divergence_from_logp", "with_tail", "masked_mean", "make_plan", "sod_weights",
    "vzero_weights", "needed_scores", "needs_teacher_hidden",
]


# (tokens, rollout iteration, the run's rollout iterations, options) -> plan
PlanFn = Callable[[TokenBatch, int, int, "ObjectiveConfig"], Plan]


@dataclass(frozen=True)
class Objective:
    """A named objective: its plan and the form of its per-token loss."""

    name: str
    kind: Literal["pg", "divergence"]
    plan: PlanFn
    needs_teacher: bool = True
    # For kind "divergence": rkl, fkl or jsd (full vocabulary, or top-k + tail per config).
    divergence: str | None = None
    doc: str = ""
    # Per-token scores the plan reads beyond the defaults: "ref" (log pi_ref), "kl" (full
    # KL(pi_old || pi_T)), "teacher_topk" (the teacher's top eopd_topk log-probs),
    # "teacher_entropy" (TokenBatch.teacher_entropy_N; NaN from in-process teachers otherwise)
    needs: frozenset[str] = frozenset()
    # An auxiliary divergence added to a policy-gradient loss where plan.aux_N > 0:
    # "teacher_topk_fkl" (EOPD) or "divergence" (AOPD: objective.aopd_divergence)
    aux: str | None = None
    # The plan decides each token from that token's entries of the TokenBatch and statistics
    # of the whole batch (TokenBatch.of_batch): it can be made on part of the batch, at the
    # current policy. A plan that is not (the default for registered ones) is made on the whole
    # batch at pi_old only.
    token_local: bool = False
    # The whole batch's statistics the plan reads at a rollout iteration, for the reason
    # given (None: none): a plan that reads them is not made from the training forward's
    # log pi_old (those statistics come before the loss)
    batch_stats: Callable[[int, int, ObjectiveConfig], str | None] | None = None
    # False: the reward R = log pi_T - log pi_theta keeps its gradient (the paper's plain RKL
    # baseline, whose expected gradient equals the stop-gradient one's, with more variance)
    stop_gradient: bool = True


OBJECTIVES: dict[str, Objective] = {}


def register_objective(obj: Objective) -> Objective:
    """Make an objective selectable as `objective.name` in configs."""
    if obj.kind == "divergence" and obj.divergence not in (*KINDS, "uld"):
        raise ValueError(f"objective {obj.name}: divergence must be one of {(*KINDS, 'uld')}")
    OBJECTIVES[obj.name] = obj
    return obj


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        x = x[mask]
    return float(x.float().mean()) if x.numel() else 0.0


def reopold_floor(lam: float) -> float:
    """Mixture-clip floor f(lambda) = ln(lambda) / (1 - lambda)  (lambda = 0.3 -> -1.72;
    lambda = 0: no floor, -inf)."""
    return math.log(lam) / (1.0 - lam) if lam > 0 else -math.inf


def reopold_switch_step(cfg: ObjectiveConfig, total: int) -> int:
    """REOPOLD's T_switch in rollout iterations (plans are made with the rollout iteration and
    the run's number of them)."""
    if cfg.switch_step is not None:
        return cfg.switch_step
    return round(cfg.switch_frac * total)


def _common_metrics(tb: TokenBatch) -> dict[str, float]:
    r = tb.logp_teacher_N - tb.logp_old_N  # unweighted: comparable with and without SOD
    return {
        "distill_reward": masked_mean(r),
        "kl_estimate": masked_mean(-r),  # sampled-token estimate of KL(pi_old || pi_T)
        "student_entropy": masked_mean(tb.entropy_N),
    }


def _opd_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    keep = torch.ones_like(tb.logp_old_N, dtype=torch.bool)
    return Plan(keep, tb.token_reward_N, {**_common_metrics(tb), "kept_frac": 1.0})


def _reopold_refines(step: int, total: int, cfg: ObjectiveConfig) -> str | None:
    if step >= reopold_switch_step(cfg, total):
        return "REOPOLD's refinement ranks the batch's student entropy"
    return None


def _reopold_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    """Exploration: drop tokens below the floor (from the sum and the normaliser). Refinement:
    the tokens whose student entropy under pi_old is in the top beta of the rollout batch,
    rewards clipped at the floor."""
    r = tb.token_reward_N
    floor = reopold_floor(cfg.lam)
    below = r < floor
    refine = step >= reopold_switch_step(cfg, total)
    tau = float("nan")
    if not refine:
        adv, keep = r, ~below
    else:
        tau = tb.of_batch(f"entropy_threshold:{cfg.beta}",
                          lambda b: top_threshold(b.gathered(b.entropy_N.float()), cfg.beta))
        h = tb.entropy_N.float()
        keep = h >= tau if h.numel() else torch.zeros_like(below)
        adv = r.clamp(min=floor)
    n = max(r.numel(), 1)
    metrics = {
        **_common_metrics(tb),
        "kept_frac": float(keep.sum()) / n,
        "floor_frac": float(below.sum()) / n,
        "entropy_threshold": tau,
        "phase": float(refine),  # 0 = exploration, 1 = refinement
    }
    return Plan(keep, adv, metrics)


def _grpo_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    adv_E = grpo_advantages(tb.reward_E, tb.group_E, cfg.grpo_eps)
    keep = torch.ones_like(tb.logp_old_N, dtype=torch.bool)
    return Plan(keep, adv_E[tb.episode_N], {**_common_metrics(tb), "kept_frac": 1.0})


def _all_tokens_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    """Every position where the teacher gave a distribution; reads no log pi_old."""
    keep = (torch.ones_like(tb.logp_old_N, dtype=torch.bool) if tb.dist_mask_N is None
            else tb.dist_mask_N.bool())
    return Plan(keep, torch.zeros_like(tb.logp_old_N),
                {**_common_metrics(tb), "kept_frac": masked_mean(keep.float())})


def _gopd_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig,
               lam: float = 1.0) -> Plan:
    if tb.logp_ref_N is None:
        raise ValueError("G-OPD needs log pi_ref of the frozen initial student")
    scale = lam if cfg.reward_scale is None else cfg.reward_scale
    adv = gopd_advantage(tb.logp_teacher_N, tb.logp_old_N, tb.logp_ref_N, scale)
    if tb.weight_N is not None:
        adv = adv * tb.weight_N
    keep = torch.ones_like(adv, dtype=torch.bool)
    return Plan(keep, adv, {**_common_metrics(tb), "kept_frac": 1.0, "reward_scale": scale,
                            "ref_gap": masked_mean(tb.logp_old_N - tb.logp_ref_N)})


def _exopd_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    return _gopd_plan(tb, step, total, cfg, lam=1.25)


def _vopd_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    if tb.kl_N is None:
        raise ValueError("vOPD needs the per-token KL(pi_old || pi_T)")
    adv = vopd_advantage(tb.logp_teacher_N, tb.logp_old_N, tb.kl_N)
    if tb.weight_N is not None:
        adv = adv * tb.weight_N
    keep = torch.ones_like(adv, dtype=torch.bool)
    return Plan(keep, adv, {**_common_metrics(tb), "kept_frac": 1.0,
                            "value_mean": masked_mean(-tb.kl_N)})


def _eopd_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    if tb.teacher_entropy_N is None:
        raise ValueError("EOPD needs the teacher's entropy at each position")
    plan = _opd_plan(tb, step, total, cfg)
    high = eopd_mask(tb.teacher_entropy_N, cfg.eopd_tau)
    plan.aux_N = high.float() * cfg.eopd_coef
    plan.metrics["eopd_frac"] = masked_mean(high.float())
    return plan


def _aopd_plan(tb: TokenBatch, step: int, total: int, cfg: ObjectiveConfig) -> Plan:
    adv = tb.token_reward_N
    pg, div = aopd_split(adv)
    w = div.float() if tb.weight_N is None else div.float() * tb.weight_N
    return Plan(pg, adv, {**_common_metrics(tb), "kept_frac": masked_mean(pg.float()),
                          "aopd_divergence_frac": masked_mean(div.float())}, aux_N=w)


register_objective(Objective(
    "opd", "pg", _opd_plan, token_local=True,
    doc="sampled-token reverse KL as a dense reward: L = -mean(rho * sg(R))"))
register_objective(Objective(
    "token_rkl", "pg", _opd_plan, token_local=True, stop_gradient=False,
    doc="sampled-token reverse KL without stop-gradient: L = -mean(rho * R(theta)), the "
        "baseline of REOPOLD's ablation (opd adds the stop-gradient)"))
register_objective(Objective(
    "reopold", "pg", _reopold_plan, token_local=True, batch_stats=_reopold_refines,
    doc="REOPOLD: mixture reward clip, entropy top-beta selection, exploration->refinement"))
register_objective(Objective(
    "grpo", "pg", _grpo_plan, needs_teacher=False, token_local=True,
    doc="outcome-reward baseline: group-normalised env reward on every token"))
register_objective(Objective(
    "rkl", "divergence", _all_tokens_plan, token_local=True, divergence="rkl",
    doc="reverse KL(student || teacher) per position, full vocabulary or top-k + tail"))
register_objective(Objective(
    "fkl", "divergence", _all_tokens_plan, token_local=True, divergence="fkl",
    doc="forward KL(teacher || student) per position, full vocabulary or top-k + tail"))
register_objective(Objective(
    "jsd", "divergence", _all_tokens_plan, token_local=True, divergence="jsd",
    doc="generalised JSD_beta per position (beta=0: forward KL, beta=1: reverse KL)"))
register_objective(Objective(
    "uld", "divergence", _all_tokens_plan, token_local=True, divergence="uld",
    doc="ULD: L1 distance of the sorted top-k probabilities (+ tail), no shared vocabulary"))
register_objective(Objective(
    "opsd", "divergence", _all_tokens_plan, token_local=True, divergence="fkl",
    doc="OPSD: forward KL to the frozen initial student reading the reference solution "
        "(teacher.kind=self, teacher.view=privileged)"))
register_objective(Objective(
    "gopd", "pg", _gopd_plan, needs=frozenset({"ref"}), token_local=True,
    doc="G-OPD: A = lam*(log pi_T - log pi_ref) - (log pi_old - log pi_ref), lam = reward_scale"))
register_objective(Objective(
    "exopd", "pg", _exopd_plan, needs=frozenset({"ref"}), token_local=True,
    doc="ExOPD: G-OPD with reward_scale 1.25 (extrapolating past the teacher)"))
register_objective(Objective(
    "vopd", "pg", _vopd_plan, needs=frozenset({"kl"}), token_local=True,
    doc="vOPD: OPD reward plus the detached closed-form value baseline, A = R + KL(pi_old||pi_T)"))
register_objective(Objective(
    "eopd", "pg", _eopd_plan, needs=frozenset({"teacher_topk", "teacher_entropy"}),
    token_local=True,
    aux="teacher_topk_fkl",
    doc="EOPD: OPD plus forward KL over the teacher's top-k where teacher entropy > eopd_tau"))
register_objective(Objective(
    "aopd", "pg", _aopd_plan, aux="divergence", token_local=True,
    doc="AOPD: policy gradient on positive-advantage tokens, a divergence to the teacher on "
        "the rest"))


def reward_weights(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[TokenBatch, dict[str, float]]:
    """`tb` with the composable reward weights set (SOD step weighting, V-Zero episode gating,
    drift control; their product) and their metrics; once per batch (at pi_old: SOD averages
    each turn), the batch's parts read them."""
    extra: dict[str, float] = {}
    if tb.weighted:
        return tb, tb.stats.get("reward_weight_metrics", {})
    if cfg.step_weighting == "sod":
        if tb.step_N is None:
            raise ValueError("step_weighting=sod needs TokenBatch.step_N (turn indices)")
        w_N, extra = sod_weights(tb.logp_old_N, tb.logp_teacher_N, tb.episode_N, tb.step_N,
                                 cfg.sod_delta, cfg.sod_eps)
        tb = dataclasses.replace(tb, weight_N=w_N)
    if cfg.episode_gating == "vzero":
        if tb.logp_negative_N is None:
            raise ValueError("episode_gating=vzero needs the teacher's negative-view log-probs")
        w_E, gate = vzero_weights(tb.logp_teacher_N, tb.logp_negative_N, tb.episode_N,
                                  tb.group_E, cfg.vzero_gamma, cfg.vzero_alpha)
        w_N = w_E[tb.episode_N]
        tb = dataclasses.replace(tb, weight_N=w_N if tb.weight_N is None else tb.weight_N * w_N)
        extra = {**extra, **gate}
    if cfg.drift_threshold > 0:
        if tb.overlap_N is None:
            raise ValueError("drift control needs the teacher-student top-k overlap")
        w_N, start_E = drift_weights(tb.overlap_N, tb.episode_N, cfg.drift_threshold,
                                     cfg.drift_patience, cfg.drift_weight)
        tb = dataclasses.replace(tb, weight_N=w_N if tb.weight_N is None else tb.weight_N * w_N)
        drifted = start_E >= 0
        extra = {**extra, "drift/episodes_frac": masked_mean(drifted.float()),
                 "drift/start_mean": masked_mean(start_E.float(), drifted),
                 "drift/tokens_down_frac": masked_mean((w_N < 1).float())}
    tb = dataclasses.replace(tb, weighted=True)
    tb.stats["reward_weight_metrics"] = extra
    return tb, extra


def outcome_advantages(tb: TokenBatch, cfg: ObjectiveConfig) -> torch.Tensor | None:
    """`objective.outcome_coef` times the GRPO advantage of each episode (None when off)."""
    if not cfg.outcome_coef:
        return None
    return cfg.outcome_coef * grpo_advantages(tb.reward_E, tb.group_E, cfg.grpo_eps)


def _selected(tb: TokenBatch, cfg: ObjectiveConfig) -> torch.Tensor:
    """Token selection's mask over the whole batch: the top select_rho by score under pi_old."""
    if cfg.token_selection == "tip":
        if tb.kl_N is None:
            raise ValueError("TIP token selection needs the per-token KL(pi_old || pi_T)")
        score = tip_scores(tb.entropy_N, tb.kl_N)
    else:
        score = tb.entropy_N.float()
    return top_fraction(score, cfg.select_rho)


def make_plan(obj: Objective, tb: TokenBatch, step: int, total: int,
              cfg: ObjectiveConfig) -> Plan:
    """The objective's plan at rollout iteration `step` of `total`, with the composable options
    applied: step weighting (SOD) and episode gating (V-Zero) scale the token rewards (and
    divergence losses) before the objective sees them, token selection narrows its keep mask,
    and an optional episode-level GRPO advantage is added to policy-gradient advantages."""
    tb, extra = reward_weights(tb, cfg)
    plan = obj.plan(tb, step, total, cfg)
    if cfg.token_selection != "none":
        chosen = tb.mine(tb.of_batch(f"selected:{cfg.token_selection}:{cfg.select_rho}",
                                     lambda b: _selected(b, cfg)))
        plan.keep_N = plan.keep_N & chosen
        if plan.aux_N is not None:
            plan.aux_N = plan.aux_N * chosen
        plan.metrics["selected_frac"] = masked_mean(chosen.float())
    outcome_E = outcome_advantages(tb, cfg)
    if outcome_E is not None:
        plan.advantage_N = plan.advantage_N + outcome_E[tb.episode_N]
    plan.weight_N = tb.weight_N
    plan.metrics.update(extra)
    return plan
