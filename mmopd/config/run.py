"""The two run configs, `TrainConfig` (mmopd train) and `SFTConfig` (mmopd sft), and the
checks that span sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import ConfigError, _check, _suggest
from .model import ModelConfig
from .objective import ObjectiveConfig
from .rollout import EnvConfig, RolloutConfig
from .teacher import SCORES_ONLY, RoutingConfig, TeacherConfig
from .trainer import EvalConfig, OptimConfig, TrainerConfig, WarmupConfig


@dataclass
class TrainConfig:
    """A distillation run: `mmopd train CONFIG.yaml [dotted.key=value ...]`."""

    model: ModelConfig
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)  # several, with `routing`
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)

    def __post_init__(self) -> None:
        _check(self.trainer.steps % self.rollout.minibatches == 0, "trainer.steps",
               f"{self.trainer.steps} is not a multiple of rollout.minibatches="
               f"{self.rollout.minibatches} (each rollout batch gives that many optimiser steps)")
        iters = self.trainer.steps // self.rollout.minibatches
        sw = self.objective.switch_step
        _check(sw is None or 0 <= sw <= iters, "objective.switch_step",
               f"{sw} is beyond the run's {iters} rollout iterations (trainer.steps "
               f"{self.trainer.steps} / rollout.minibatches {self.rollout.minibatches}); it "
               "counts rollout iterations, as the paper's T_switch does")
        from mmopd.objectives import OBJECTIVES  # late import: objectives import torch

        if self.objective.name not in OBJECTIVES and self.env.imports:
            from mmopd.envs import import_env_modules  # user modules may register objectives

            try:
                import_env_modules(self.env.imports)
            except (ImportError, ValueError) as e:  # named module missing, or a bad name
                raise ConfigError(str(e)) from None

        _check(self.objective.name in OBJECTIVES, "objective.name",
               f"unknown objective {self.objective.name!r}; choose one of {sorted(OBJECTIVES)}"
               + _suggest(self.objective.name, OBJECTIVES))
        obj = OBJECTIVES[self.objective.name]
        needs_teacher = obj.needs_teacher
        if self.objective.outcome_coef and obj.kind != "pg":
            raise ConfigError(f"objective.outcome_coef: the episode advantage is added to "
                              f"policy-gradient objectives; {obj.name!r} is a divergence "
                              "(use opd or reopold, or set outcome_coef=0)")
        if self.objective.ratio_clip not in (None, "auto") and obj.kind != "pg":
            raise ConfigError(f"objective.ratio_clip: clips the importance ratio of "
                              f"policy-gradient objectives; {obj.name!r} is a divergence "
                              "(use opd, reopold or grpo, or drop ratio_clip)")
        if (self.objective.form.reward_at == "current" and obj.kind == "pg"
                and not obj.token_local):
            raise ConfigError(f"objective.reward_at: current makes the plan again on each "
                              f"micro-batch's tokens; {obj.name!r} does not declare its plan "
                              "token-local (Objective.token_local); use reward_at: rollout")
        if obj.divergence == "uld" and self.objective.topk == 0:
            self.objective.topk = 32  # ULD compares top-k probabilities; the resolved config says
        if self.teachers:
            self._check_routing(obj.name)
        for i, t in enumerate(self.teacher_list):
            self._check_teacher(t, f"teachers[{i}]" if self.teachers else "teacher", obj)
        if obj.name == "opsd" and (self.teacher.kind != "self"
                                   or self.teacher.view != "privileged"):
            raise ConfigError("objective.name: opsd distils from the frozen initial student "
                              "reading the reference solution; set teacher.kind=self and "
                              "teacher.view=privileged")
        if self.rollout.backend == "vllm" and self.objective.drift_stop:
            raise ConfigError("objective.drift_stop: stopping drifted samples re-scores every "
                              "chunk of a reply in process; it needs rollout.backend=hf")
        if self.objective.drift_stop and (self.teacher.kind in SCORES_ONLY
                                          or self.teacher.view != "same"
                                          or self.teacher.cross_tokenizer):
            raise ConfigError("objective.drift_stop: stopping drifted samples runs the live "
                              "teacher on the student's own prompt while sampling; it needs "
                              "teacher.view=same and a teacher model with the student's "
                              "tokenizer")
        if self.warmup.steps and (not needs_teacher or self.teacher.kind != "model"
                                  or self.teacher.cross_tokenizer):
            raise ConfigError("warmup.steps: the off-policy warm-up trains on a separate "
                              "teacher's own samples; it needs teacher.kind=model (with the "
                              "student's tokenizer) and an objective with a teacher")
        if self.objective.reward_scale is not None and obj.name not in ("gopd", "exopd"):
            raise ConfigError(f"objective.reward_scale: the G-OPD reward scale applies to gopd "
                              f"and exopd, not {obj.name!r}")
        if self.objective.token_selection == "tip" and not needs_teacher:
            raise ConfigError("objective.token_selection: TIP scores tokens by their divergence "
                              f"from a teacher; {obj.name!r} has none (use 'entropy')")
        if self.objective.drift_threshold > 0 and not needs_teacher:
            raise ConfigError("objective.drift_threshold: drift is measured against a teacher; "
                              f"{obj.name!r} has none")
        if self.objective.episode_gating == "vzero" and not needs_teacher:
            raise ConfigError(f"objective.episode_gating: V-Zero compares the teacher's views; "
                              f"{obj.name!r} has no teacher")
        if self.objective.step_weighting == "sod" and not needs_teacher:
            raise ConfigError(f"objective.step_weighting: SOD weighs turns by their divergence "
                              f"from a teacher; {obj.name!r} has none")

    @property
    def teacher_list(self) -> list[TeacherConfig]:
        """The run's teachers: `teachers:` when given, else the one `teacher:`."""
        return self.teachers or [self.teacher]

    def _check_teacher(self, t: TeacherConfig, w: str, obj: Any) -> None:
        """The checks of one teacher against the objective (`w`: where it is in the config)."""
        from mmopd.objectives import needed_scores

        needs_teacher, o = obj.needs_teacher, self.objective
        if t.kind == "served" and needs_teacher:
            _check(t.served.url is not None, f"{w}.served.url",
                   "teacher.kind=served needs the server's URL (http://HOST:PORT)")
        live = _rebuilds_teacher_logits(obj, o) or o.episode_gating != "none"
        if t.kind in SCORES_ONLY and needs_teacher:
            _check(t.kind != "cache" or t.cache is not None, f"{w}.cache",
                   "teacher.kind=cache needs the directory `mmopd cache-teacher` wrote")
            held = ("a cache holds log-probs and top-k only" if t.kind == "cache"
                    else f"a {t.kind} teacher returns log-probs and top-k only")
            _check(not live, f"{w}.kind",
                   f"objective {obj.name!r} with these options needs the teacher's full "
                   f"distribution (an in-process teacher); {held}: use a sampled-token "
                   "objective (opd, reopold, gopd, eopd) or topk_source=teacher")
        if t.cross_tokenizer and needs_teacher:
            shared = (live or (obj.kind != "pg" and obj.divergence != "uld")
                      or "teacher_topk" in needed_scores(obj, o))
            _check(not shared, f"{w}.cross_tokenizer",
                   f"objective {obj.name!r} with these options compares the two models on "
                   "shared token ids (full-vocabulary or top-k divergences, vOPD, EOPD, AOPD, "
                   "TIP, drift, V-Zero); a teacher with another tokenizer scores the student's "
                   "text span by span: use opd, reopold, gopd or exopd (SOD weighting works), or "
                   "uld (sorted probabilities)")
            _check(t.topk == 0, f"{w}.topk", "a cross-tokenizer teacher's top-k ids are in "
                   "another vocabulary; set it to 0")
        if needs_teacher and t.kind == "model" and t.model is None:
            raise ConfigError(f"{w}.model: objective {o.name!r} needs a teacher; "
                              f"set {w}.model.path (or {w}.kind=self)")
        if t.kind in ("self", "ema") and t.view == "same":
            raise ConfigError(f"{w}: kind={t.kind} with view=same scores the "
                              "student against (a copy of) itself: no signal; set "
                              f"{w}.view=privileged")

    def _check_routing(self, objective: str) -> None:
        """Several teachers: unique names, routes that name them, and only what a router can
        serve (per-token log-probs of whichever teacher scored each episode)."""
        names = [t.name for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, "teachers", f"two teachers are named {dup[0]!r}; names must be unique"
               if dup else "")
        _check(self.teacher == TeacherConfig(), "teacher",
               "set either `teacher:` (one teacher) or `teachers:` (several), not both")
        r = self.routing
        for value, name in [*r.routes.items(), *([("default", r.default)] if r.default else [])]:
            _check(name in names, f"routing.routes.{value}" if value != "default" else
                   "routing.default", f"names no teacher: {name!r}; teachers: {names}"
                   + _suggest(str(name), names))
        _check(bool(r.routes) or r.default is not None, "routing.routes",
               "several teachers need routes (value -> teacher name) or a routing.default")
        kinds = [t.kind for t in self.teachers]
        _check("cache" not in kinds, "teachers", "a teacher cache replays its own fixed "
               "episodes; it cannot share a run with other teachers")
        _check(kinds.count("ema") <= 1, "teachers", "at most one EMA teacher per run")
        _check(not any(t.shard for t in self.teachers), "teachers",
               "routed teachers are not sharded (each rank may route no episode to one of "
               "them, and a sharded teacher's forwards run on all ranks together): set "
               "shard: false")
        o = self.objective
        from mmopd.objectives import OBJECTIVES

        _check(not _rebuilds_teacher_logits(OBJECTIVES[objective], o), "teachers",
               f"objective {objective!r} with these options rebuilds one teacher's "
               "logits; routed teachers give per-token log-probs (and top-k): use a "
               "sampled-token objective (opd, reopold, gopd, eopd) or topk_source=teacher")
        _check(not (o.drift_stop or o.episode_gating != "none" or self.warmup.steps
                    or objective == "opsd"), "teachers",
               "drift stop, V-Zero gating, the off-policy warm-up and OPSD use one teacher; "
               "with several, use a sampled-token objective (opd, reopold, gopd, exopd)")


def _rebuilds_teacher_logits(obj: Any, o: ObjectiveConfig) -> bool:
    """Does the objective with these options need one live teacher's logits (full-vocabulary
    or student-id top-k divergences, AOPD, the per-token KL or top-k overlap)?"""
    from mmopd.objectives import needed_scores, needs_teacher_hidden

    return needs_teacher_hidden(obj, o) or bool({"kl", "overlap"} & needed_scores(obj, o))


@dataclass
class SFTDataConfig:
    """Supervised examples: prompts and worked solutions drawn from an environment."""

    env: EnvConfig = field(default_factory=EnvConfig)
    num_examples: int = 2000
    # Fraction of examples shown in the env's teacher view (info["teacher_messages"]: e.g. the
    # image crop), so a self-teacher model can read that view (Vision-OPD).
    teacher_view_frac: float = 0.0

    def __post_init__(self) -> None:
        _check(0 <= self.teacher_view_frac <= 1, "data.teacher_view_frac",
               f"{self.teacher_view_frac} is outside [0, 1]")


@dataclass
class SFTConfig:
    """Supervised fine-tuning on an env's worked solutions: `mmopd sft CONFIG.yaml`."""

    model: ModelConfig
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20,
                                                                   schedule="cosine"))
    epochs: int = 3
    batch_size: int = 32
    output_dir: str = "runs/sft"
    seed: int = 0
    eval_problems: int = 100
    max_new_tokens: int = 64
    max_turns: int = 8  # multi-turn demonstrations and evaluation

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs", "must be positive")
        _check(self.max_turns > 0, "max_turns", "must be positive")
        _check(self.data.num_examples > 0, "data.num_examples", "must be positive")
        _check(self.model.lora is None, "model.lora",
               "`mmopd sft` trains every weight; LoRA students are for `mmopd train`")
