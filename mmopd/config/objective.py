"""The `objective:` section: which objective and its options (ALGORITHMS.md has the
formulas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import _check

# REOPOLD (arXiv 2603.11137, Eq. 4-5) trains with the clipped PPO ratio of verl, the reward at
# the parameters being updated and the kept tokens of each query as the normaliser; its RKL
# baseline (token_rkl, Eq. 3) in the same form. "auto" takes these for them, and mmopd's own
# choices (no clip, the reward of the rollout, the minibatch's kept tokens) for the rest.
_PAPER = {"ratio_clip": (0.8, 1.2), "reward_at": "current", "normaliser": "query"}
PAPER_FORM: dict[str, dict[str, object]] = {"reopold": _PAPER, "token_rkl": _PAPER}
OWN_FORM: dict[str, object] = {"ratio_clip": None, "reward_at": "rollout", "normaliser": "batch"}


@dataclass(frozen=True)
class Form:
    """How a policy-gradient objective is trained (ObjectiveConfig.form)."""

    ratio_clip: tuple[float, float] | None
    reward_at: Literal["current", "rollout"]
    normaliser: Literal["query", "batch"]


@dataclass
class ObjectiveConfig:
    """The distillation objective and its hyper-parameters (see ALGORITHMS in the README)."""

    name: str = "reopold"
    lam: float = 0.3  # REOPOLD mixture clip: floor ln(lam)/(1-lam); 0 = no floor
    beta: float = 0.2  # REOPOLD: keep the top-beta fraction of tokens by student entropy
    # REOPOLD exploration -> refinement at this fraction of the run's rollout iterations, or at
    # rollout iteration switch_step (the paper's T_switch: math 1.5B 100 of 300)
    switch_frac: float = 1 / 3
    switch_step: int | None = None
    jsd_beta: float = 0.5  # generalised JSD mixture weight
    topk: int = 0  # distribution-level objectives: 0 = full vocabulary, k > 0 = top-k + tail
    topk_source: Literal["student", "teacher"] = "student"
    grpo_eps: float = 1e-6
    # SOD: reweight each assistant turn's rewards by its drift from the teacher (multi-turn)
    step_weighting: Literal["none", "sod"] = "none"
    sod_delta: float = 0.2  # w_k <= 1 + delta
    sod_eps: float = 1e-6
    outcome_coef: float = 0.0  # add coef * GRPO episode advantage to policy-gradient objectives
    # PPO-style clipped ratio for policy-gradient objectives: [1 - eps_low, 1 + eps_high], e.g.
    # [0.8, 1.28] (SOD's 0.2 / 0.28); None = the plain surrogate -rho * A. "auto" (here and
    # below): PAPER_FORM for reopold and token_rkl, OWN_FORM otherwise
    ratio_clip: tuple[float, float] | None | Literal["auto"] = "auto"
    # the token reward R = log pi_T - log pi: "current" at the parameters being updated (plans
    # made again on every micro-batch from the training forward), "rollout" at pi_old
    reward_at: Literal["auto", "current", "rollout"] = "auto"
    # the token mean's divisor: "query" the kept tokens of each query's responses (the loss
    # averages the queries of the minibatch), "batch" the kept tokens of the whole minibatch
    normaliser: Literal["auto", "query", "batch"] = "auto"
    # V-Zero: weigh each episode by its teacher's positive-vs-negative view preference
    episode_gating: Literal["none", "vzero"] = "none"
    vzero_gamma: float = 1.0
    vzero_alpha: float = 0.5
    # G-OPD / ExOPD: reward scale lambda against the frozen initial student (None: the
    # objective's default, 1.0 for gopd, 1.25 for exopd)
    reward_scale: float | None = None
    # EOPD: forward KL over the teacher's top-k where the teacher's entropy exceeds tau
    eopd_tau: float = 0.8
    eopd_topk: int = 16
    eopd_coef: float = 1.0
    # AOPD: the divergence that tokens with a non-positive advantage minimise (full vocabulary)
    aopd_divergence: Literal["rkl", "fkl", "jsd"] = "rkl"
    # token selection for any objective: TIP (entropy OR divergence) or student entropy only
    token_selection: Literal["none", "tip", "entropy"] = "none"
    select_rho: float = 0.5
    # teacher-student top-k overlap (diagnostics, drift control)
    overlap_topk: int = 10
    # Prune-OPD drift control: once a sample's overlap stays below the threshold for `patience`
    # tokens, its later rewards are scaled by drift_weight (threshold 0 = off)
    drift_threshold: float = 0.0
    drift_patience: int = 8
    drift_weight: float = 0.0
    # also stop sampling a reply once it drifts, checked every drift_chunk tokens
    drift_stop: bool = False
    drift_chunk: int = 16

    def __post_init__(self) -> None:
        w = "objective"
        _check(self.eopd_tau >= 0, f"{w}.eopd_tau", "must be >= 0")
        _check(self.eopd_topk > 0, f"{w}.eopd_topk", "must be positive")
        _check(self.eopd_coef >= 0, f"{w}.eopd_coef", "must be >= 0")
        _check(0 < self.select_rho <= 1, f"{w}.select_rho", f"{self.select_rho} is outside (0, 1]")
        _check(self.overlap_topk > 0, f"{w}.overlap_topk", "must be positive")
        _check(0 <= self.drift_threshold <= 1, f"{w}.drift_threshold", "must be in [0, 1]")
        _check(self.drift_patience > 0, f"{w}.drift_patience", "must be positive")
        _check(0 <= self.drift_weight <= 1, f"{w}.drift_weight", "must be in [0, 1]")
        _check(self.drift_chunk > 0, f"{w}.drift_chunk", "must be positive")
        _check(not self.drift_stop or self.drift_threshold > 0, f"{w}.drift_stop",
               "needs objective.drift_threshold > 0")
        _check(self.sod_delta >= 0, f"{w}.sod_delta", "must be >= 0")
        _check(self.sod_eps > 0, f"{w}.sod_eps", "must be > 0")
        _check(self.vzero_gamma >= 0, f"{w}.vzero_gamma", "must be >= 0")
        _check(self.vzero_alpha >= 0, f"{w}.vzero_alpha", "must be >= 0")
        _check(0 <= self.lam < 1, f"{w}.lam", f"{self.lam} is outside [0, 1)")
        _check(0 < self.beta <= 1, f"{w}.beta", f"{self.beta} is outside (0, 1]")
        _check(0 <= self.switch_frac <= 1, f"{w}.switch_frac", "must be in [0, 1]")
        _check(0 <= self.jsd_beta <= 1, f"{w}.jsd_beta", "must be in [0, 1]")
        _check(self.topk >= 0, f"{w}.topk", "must be >= 0")
        _check(self.switch_step is None or self.switch_step >= 0, f"{w}.switch_step",
               f"{self.switch_step} must be >= 0 (a rollout iteration)")
        if self.ratio_clip is not None and self.ratio_clip != "auto":
            low, high = self.ratio_clip
            _check(low >= 0 and high >= 0, f"{w}.ratio_clip",
                   f"{list(self.ratio_clip)} has a negative bound; give [1 - eps_low, "
                   "1 + eps_high] with both bounds >= 0, e.g. [0.8, 1.28]")
            _check(low < high, f"{w}.ratio_clip", f"low {low} must be below high {high}, e.g. "
                   "[0.8, 1.28]")
            _check(low <= 1 <= high, f"{w}.ratio_clip", f"[{low}, {high}] must contain 1 (the "
                   "ratio of the first update), e.g. [0.8, 1.28]")

    @property
    def form(self) -> Form:
        """ratio_clip, reward_at and normaliser with "auto" replaced by the objective's form
        (PAPER_FORM for reopold and token_rkl, OWN_FORM for the rest). The fields keep "auto",
        so a config derived with another objective.name takes that objective's form."""
        own = PAPER_FORM.get(self.name, OWN_FORM)
        return Form(*(own[k] if getattr(self, k) == "auto" else getattr(self, k)
                      for k in ("ratio_clip", "reward_at", "normaliser")))
