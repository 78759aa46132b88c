"""Typed run configuration: YAML supplies values, dotted CLI overrides adjust them, and every
field is checked up front so a bad value fails before any model is loaded."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


def _check(ok: bool, where: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {msg}")


@dataclass
class TinyModelConfig:
    """A small Qwen2 decoder, or Qwen-VL model, built from a config (random init), for CPU tests
    and demos. VL architectures take their patch geometry from the image processor saved in the
    tokenizer directory (`mmopd tokenizer OUT --vision`)."""

    arch: Literal["qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "qwen2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    seed: int = 0
    # vision tower of the VL architectures
    vision_depth: int = 1
    vision_hidden_size: int = 32
    vision_heads: int = 2

    def __post_init__(self) -> None:
        w = "model.tiny"
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "vision_depth", "vision_hidden_size", "vision_heads"):
            _check(getattr(self, name) > 0, f"{w}.{name}", "must be positive")
        _check(self.hidden_size % self.num_heads == 0, f"{w}.hidden_size",
               f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check(self.num_heads % self.num_kv_heads == 0, f"{w}.num_kv_heads",
               f"num_heads={self.num_heads} must be a multiple of num_kv_heads")
        if self.arch != "qwen2":
            _check(self.hidden_size // self.num_heads >= 8, f"{w}.num_heads",
                   "VL models need a head dimension of at least 8 (3-D rope sections)")
            _check(self.vision_hidden_size % self.vision_heads == 0, f"{w}.vision_hidden_size",
                   f"{self.vision_hidden_size} is not divisible by vision_heads")


@dataclass
class LoraSettings:
    """LoRA adapters on the student (peft): the base weights stay frozen and only the adapters
    train (and go to the optimiser). Checkpoints hold the merged full model, loadable by path
    (`mmopd eval`, a vLLM engine, a later run), plus the adapter alone in `adapter/`."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling alpha / r
    # dropout > 0 makes the training forward differ from the (eval-mode) pi_old scoring, so the
    # ratio rho != 1 even on a rollout batch's first step
    dropout: float = 0.0
    # attention and MLP projections of Qwen / Llama-style decoders
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        w = "model.lora"
        _check(self.r > 0, f"{w}.r", f"{self.r} must be positive")
        _check(self.alpha > 0, f"{w}.alpha", f"{self.alpha} must be positive")
        _check(0 <= self.dropout < 1, f"{w}.dropout", f"{self.dropout} is outside [0, 1)")
        _check(bool(self.target_modules), f"{w}.target_modules",
               "needs at least one module name (e.g. [q_proj, v_proj])")


@dataclass
class ModelConfig:
    """Where a model comes from: a hub name or local directory, or a tiny config to build."""

    path: str | None = None
    tokenizer: str | None = None  # defaults to `path`; required with `tiny`
    tiny: TinyModelConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Attention implementation passed to from_pretrained ("sdpa", "eager", "flash_attention_2").
    attn_implementation: str | None = None
    # VLMs: images are resized into [min_pixels, max_pixels] (None: the image processor's own)
    min_pixels: int | None = None
    max_pixels: int | None = None
    # train LoRA adapters instead of every weight (the student only; null: full fine-tuning)
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        _check((self.path is None) != (self.tiny is None), "model",
               "set exactly one of `path` (hub name or directory) or `tiny` (build from config)")
        if self.tiny is not None:
            _check(self.tokenizer is not None, "model.tokenizer",
                   "a tiny model needs a tokenizer directory (`mmopd tokenizer OUT` builds one)")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"model.{name}", "must be positive (or null)")
        if self.min_pixels and self.max_pixels:
            _check(self.min_pixels <= self.max_pixels, "model.min_pixels",
                   f"{self.min_pixels} exceeds max_pixels={self.max_pixels}")


@dataclass
class EnvConfig:
    """Which environment produces episodes, and its held-out twin for evaluation."""

    id: str = "mmopd/MathText-v0"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Overrides applied on top of `kwargs` for the held-out evaluation env.
    eval_kwargs: dict[str, Any] = field(default_factory=lambda: {"split": "test"})
    imports: list[str] = field(default_factory=list)  # user modules that register envs


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (rollout.backend=vllm), colocated with the trainer.

    Its weights follow the student's after every optimiser step; every rollout batch is checked:
    the mean |log-prob| gap between the engine's sampled-token log-probs and the trainer's own
    must stay under `max_logprob_gap`, or training stops (a failed weight sync would otherwise
    train on another model's samples).
    """

    gpu_memory_utilization: float = 0.3  # the engine's share of the GPU; training has the rest
    sleep: bool = False  # GPU: release the engine's memory between rollouts
    max_model_len: int | None = None  # defaults to the checkpoint's
    enforce_eager: bool = False  # skip CUDA graph capture (faster start, slower decode)
    dtype: str = "auto"
    cpu_kv_cache_gb: int = 1  # CPU backend: key-value cache size
    max_logprob_gap: float = 0.1  # mean |log pi_vllm - log pi_trainer| per sampled token

    def __post_init__(self) -> None:
        w = "rollout.vllm"
        _check(0 < self.gpu_memory_utilization <= 1, f"{w}.gpu_memory_utilization",
               "must be in (0, 1]")
        _check(self.max_model_len is None or self.max_model_len > 0, f"{w}.max_model_len",
               "must be positive")
        _check(self.cpu_kv_cache_gb > 0, f"{w}.cpu_kv_cache_gb", "must be positive")
        _check(self.max_logprob_gap > 0, f"{w}.max_logprob_gap", "must be positive")


@dataclass
class RolloutConfig:
    """How student episodes are sampled each rollout batch."""

    backend: Literal["hf", "vllm"] = "hf"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    prompts_per_batch: int = 16
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    batch_size: int = 64  # sequences per generate() call
    minibatches: int = 2  # optimiser steps per rollout batch (so rho != 1 after the first)
    max_turns: int = 8  # bound on assistant turns, tool calls included (single-turn: one)
    max_episode_tokens: int = 0  # bound on a whole episode's length in tokens (0 = none)
    # how tool calls are found in replies: "hermes" (<tool_call>{json}</tool_call>) or "react"
    # (Action: name[input])
    tool_parser: Literal["hermes", "react"] = "hermes"
    # TCOD temporal curriculum: at optimiser step k only the first 1 + k // tcod_c turns are
    # rolled out (and so trained), up to max_turns.
    curriculum: Literal["none", "tcod"] = "none"
    tcod_c: int = 10
    # Prefix OPD: sample (and so train on) only the first prefix_tokens tokens of each reply,
    # growing by prefix_growth tokens per optimiser step, up to max_new_tokens (0 = off)
    prefix_tokens: int = 0
    prefix_growth: float = 0.0

    def __post_init__(self) -> None:
        w = "rollout"
        _check(self.prefix_tokens >= 0, f"{w}.prefix_tokens", "must be >= 0 (0: off)")
        _check(self.prefix_growth >= 0, f"{w}.prefix_growth", "must be >= 0")
        _check(self.prefix_tokens > 0 or self.prefix_growth == 0, f"{w}.prefix_growth",
               "needs rollout.prefix_tokens > 0 (the starting prefix length)")
        for name in ("prompts_per_batch", "samples_per_prompt", "max_new_tokens", "batch_size",
                     "minibatches", "max_turns", "tcod_c"):
            _check(getattr(self, name) > 0, f"{w}.{name}", "must be positive")
        _check(self.max_episode_tokens >= 0, f"{w}.max_episode_tokens", "must be >= 0 (0: none)")
        _check(self.temperature > 0, f"{w}.temperature", "must be > 0 (use eval for greedy)")
        _check(0 < self.top_p <= 1, f"{w}.top_p", "must be in (0, 1]")
        n = self.prompts_per_batch * self.samples_per_prompt
        _check(n % self.minibatches == 0, f"{w}.minibatches",
               f"{n} episodes per batch do not split into {self.minibatches} equal minibatches")


@dataclass
class ServedTeacherConfig:
    """A teacher behind an OpenAI-compatible vLLM server (`vllm serve MODEL`), for teachers on
    other GPUs or nodes. It returns prompt log-probs with top-k, not logits: objectives that need
    the teacher's full distribution are refused at config time."""

    url: str | None = None  # e.g. http://10.0.0.5:8000
    model: str | None = None  # the served model's name (default: the only one served)
    topk: int = 20  # log-probs per position asked for (the entropy estimate uses them)
    batch_size: int = 8  # episodes per request
    concurrency: int = 2  # requests in flight
    timeout_s: float = 300.0  # per request
    max_retries: int = 3  # per request, with exponential backoff (connection errors, 5xx)
    api_key_env: str | None = None  # name of an environment variable holding the API key

    def __post_init__(self) -> None:
        w = "teacher.served"
        _check(self.url is None or self.url.startswith(("http://", "https://")), f"{w}.url",
               f"{self.url!r} is not an http(s) URL")
        for name in ("topk", "batch_size", "concurrency"):
            _check(getattr(self, name) > 0, f"{w}.{name}", "must be positive")
        _check(self.timeout_s > 0, f"{w}.timeout_s", "must be positive")
        _check(self.max_retries >= 0, f"{w}.max_retries", "must be >= 0")


@dataclass
class TeacherConfig:
    """Who scores the student's tokens.

    kind "model": a separate in-process model. kind "self": the student's initial weights, frozen,
    usually with view "privileged" (self-distillation from a prompt that holds the solution).
    kind "ema": an exponential moving average of the student (theta_T <- d * theta_T +
    (1 - d) * theta_S after every optimiser step, d = ema_decay), as in Vision-OPD.
    kind "cache": no live teacher; batches and the teacher's scores come from a cache built by
    `mmopd cache-teacher` (Lightning OPD), directory `cache`.
    kind "served": a teacher behind a vLLM server (`served`): sampled-token log-probs and top-k.
    view "privileged": the teacher reads the env's teacher view (info["teacher_messages"]: a worked
    solution, the question-relevant image crop, ...) instead of the student's prompt.
    """

    kind: Literal["model", "self", "ema", "cache", "served"] = "model"
    model: ModelConfig | None = None
    view: Literal["same", "privileged"] = "same"
    topk: int = 0  # also return the teacher's top-k log-probs (0 = off)
    ema_decay: float = 0.95
    # refuse a teacher whose chat template renders a probe conversation differently
    check_template: bool = True
    cache: str | None = None  # kind "cache": a directory written by `mmopd cache-teacher`
    served: ServedTeacherConfig = field(default_factory=ServedTeacherConfig)

    def __post_init__(self) -> None:
        _check(self.topk >= 0, "teacher.topk", "must be >= 0")
        _check(0 <= self.ema_decay < 1, "teacher.ema_decay", f"{self.ema_decay} is outside [0, 1)")
        _check(self.model is None or self.model.lora is None, "teacher.model.lora",
               "LoRA adapters train the student; a teacher is frozen (remove the setting)")


@dataclass
class ObjectiveConfig:
    """The distillation objective and its hyper-parameters (see ALGORITHMS in the README)."""

    name: str = "reopold"
    lam: float = 0.3  # REOPOLD mixture clip: floor ln(lam)/(1-lam)
    beta: float = 0.2  # REOPOLD: keep the top-beta fraction of tokens by student entropy
    switch_frac: float = 1 / 3  # REOPOLD exploration -> refinement at this fraction of steps
    switch_step: int | None = None  # explicit optimiser step; overrides switch_frac
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
    # [0.8, 1.28] (SOD's 0.2 / 0.28); None = the plain surrogate -rho * A
    ratio_clip: tuple[float, float] | None = None
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
        _check(0 < self.lam < 1, f"{w}.lam", f"{self.lam} is outside (0, 1)")
        _check(0 < self.beta <= 1, f"{w}.beta", f"{self.beta} is outside (0, 1]")
        _check(0 <= self.switch_frac <= 1, f"{w}.switch_frac", "must be in [0, 1]")
        _check(0 <= self.jsd_beta <= 1, f"{w}.jsd_beta", "must be in [0, 1]")
        _check(self.topk >= 0, f"{w}.topk", "must be >= 0")
        if self.ratio_clip is not None:
            low, high = self.ratio_clip
            _check(low >= 0 and high >= 0, f"{w}.ratio_clip",
                   f"{list(self.ratio_clip)} has a negative bound; give [1 - eps_low, "
                   "1 + eps_high] with both bounds >= 0, e.g. [0.8, 1.28]")
            _check(low < high, f"{w}.ratio_clip", f"low {low} must be below high {high}, e.g. "
                   "[0.8, 1.28]")
            _check(low <= 1 <= high, f"{w}.ratio_clip", f"[{low}, {high}] must contain 1 (the "
                   "ratio of the first update), e.g. [0.8, 1.28]")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant or cosine decay."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass
class WarmupConfig:
    """Off-policy warm-up: before on-policy distillation, `steps` optimiser steps on episodes the
    teacher samples itself (one per prompt), to raise the initial teacher-student overlap: "sft"
    (cross-entropy on the teacher's tokens) or "fkl" (forward KL to the teacher's distribution at
    every one of its tokens). Needs a separate teacher model (teacher.kind=model)."""

    steps: int = 0
    kind: Literal["sft", "fkl"] = "fkl"
    prompts_per_batch: int = 16

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "warmup.steps", "must be >= 0 (0: no warm-up)")
        _check(self.prompts_per_batch > 0, "warmup.prompts_per_batch", "must be positive")


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy and pass@k."""

    every: int = 0  # optimiser steps between evals (0 = only at the start and the end)
    num_problems: int = 100
    pass_k: int = 4  # samples per problem for pass@k (0 = greedy only)
    temperature: float = 1.0
    max_new_tokens: int | None = None  # defaults to rollout.max_new_tokens
    at_start: bool = True


@dataclass
class TrainerConfig:
    """The loop: how many optimiser steps, batching, precision, where results go."""

    steps: int = 30  # optimiser steps
    micro_batch_size: int = 16  # sequences per forward/backward (gradient accumulation below it)
    output_dir: str = "runs/default"
    seed: int = 0
    resume: str = "never"  # "never", "auto" (newest complete checkpoint), or a checkpoint dir
    save_every: int = 0  # optimiser steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    bf16: bool = False
    gradient_checkpointing: bool = False
    chunk_size: int = 256  # positions per chunk when turning hidden states into log-probs
    log_every: int = 1
    # teacher-student diagnostics (top-k overlap, teacher mass on the student's top-k, entropy
    # gap, KL) on at most this many tokens per rollout batch (0 = off)
    diagnostics_tokens: int = 2048

    def __post_init__(self) -> None:
        _check(self.steps > 0, "trainer.steps", "must be positive")
        _check(self.micro_batch_size > 0, "trainer.micro_batch_size", "must be positive")
        _check(self.chunk_size > 0, "trainer.chunk_size", "must be positive")
        _check(self.keep_last >= 1, "trainer.keep_last", "must be >= 1")


@dataclass
class TrainConfig:
    """A distillation run: `mmopd train CONFIG.yaml [dotted.key=value ...]`."""

    model: ModelConfig
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
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
        from mmopd.objectives import OBJECTIVES  # late import: objectives import torch

        _check(self.objective.name in OBJECTIVES, "objective.name",
               f"unknown objective {self.objective.name!r}; choose one of {sorted(OBJECTIVES)}"
               + _suggest(self.objective.name, OBJECTIVES))
        obj = OBJECTIVES[self.objective.name]
        needs_teacher = obj.needs_teacher
        if self.objective.outcome_coef and obj.kind != "pg":
            raise ConfigError(f"objective.outcome_coef: the episode advantage is added to "
                              f"policy-gradient objectives; {obj.name!r} is a divergence "
                              "(use opd or reopold, or set outcome_coef=0)")
        if self.objective.ratio_clip is not None and obj.kind != "pg":
            raise ConfigError(f"objective.ratio_clip: clips the importance ratio of "
                              f"policy-gradient objectives; {obj.name!r} is a divergence "
                              "(use opd, reopold or grpo, or drop ratio_clip)")
        if obj.name == "opsd" and (self.teacher.kind != "self"
                                   or self.teacher.view != "privileged"):
            raise ConfigError("objective.name: opsd distils from the frozen initial student "
                              "reading the reference solution; set teacher.kind=self and "
                              "teacher.view=privileged")
        if self.teacher.kind == "served" and needs_teacher:
            _check(self.teacher.served.url is not None, "teacher.served.url",
                   "teacher.kind=served needs the server's URL (http://HOST:PORT)")
        if self.teacher.kind in ("cache", "served") and needs_teacher:
            _check(self.teacher.kind != "cache" or self.teacher.cache is not None,
                   "teacher.cache",
                   "teacher.kind=cache needs the directory `mmopd cache-teacher` wrote")
            held = ("a cache holds log-probs and top-k only" if self.teacher.kind == "cache"
                    else "a served teacher returns log-probs and top-k only")
            from mmopd.losses import needs_teacher_hidden
            from mmopd.objectives import needed_scores

            live = needs_teacher_hidden(obj, self) or bool(
                {"kl", "overlap"} & needed_scores(obj, self.objective))
            live = live or self.objective.episode_gating != "none"
            _check(not live, "teacher.kind",
                   f"objective {obj.name!r} with these options needs the teacher's full "
                   f"distribution (an in-process teacher); {held}: use a sampled-token "
                   "objective (opd, reopold, gopd, eopd) or topk_source=teacher")
        if self.rollout.backend == "vllm" and self.objective.drift_stop:
            raise ConfigError("objective.drift_stop: stopping drifted samples re-scores every "
                              "chunk of a reply in process; it needs rollout.backend=hf")
        if self.objective.drift_stop and (self.teacher.kind in ("cache", "served")
                                          or self.teacher.view != "same"):
            raise ConfigError("objective.drift_stop: stopping drifted samples runs the live "
                              "teacher on the student's own prompt while sampling; it needs "
                              "teacher.view=same and a teacher model")
        if self.warmup.steps and (not needs_teacher or self.teacher.kind != "model"):
            raise ConfigError("warmup.steps: the off-policy warm-up trains on a separate "
                              "teacher's own samples; it needs teacher.kind=model and an "
                              "objective with a teacher")
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
        if needs_teacher and self.teacher.kind == "model" and self.teacher.model is None:
            raise ConfigError(f"teacher.model: objective {self.objective.name!r} needs a teacher; "
                              "set teacher.model.path (or teacher.kind=self)")
        if self.teacher.kind in ("self", "ema") and self.teacher.view == "same":
            raise ConfigError(f"teacher: kind={self.teacher.kind} with view=same scores the "
                              "student against (a copy of) itself: no signal; set "
                              "teacher.view=privileged")


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


# --------------------------------------------------------------------------- loading


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]")
                         for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{prefix}{k}: unknown field" + _suggest(k, fields)
                          + f"; {cls.__name__} takes {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else None)
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                # A partly given section starts from this field's own defaults (SFT's optimiser
                # defaults differ from a bare OptimConfig's), not from the section class's.
                value = {**dataclasses.asdict(default), **value}
            kwargs[name] = _coerce(value, hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required field is missing")
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = node[p]
        node[path[-1]] = value
    return data


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Read YAML (optional), apply dotted overrides, build and validate `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    data = apply_overrides(data, list(overrides))
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (for the run directory's resolved config.yaml)."""
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
