"""The `env:` and `rollout:` sections: which environment, and how episodes are sampled (HF
generate or a colocated vLLM engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .base import _check


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
    # wall-clock bound on each env reset() / step() in seconds (0 = none): a call past it ends
    # its episode with stop reason "env_timeout" and the batch goes on without it
    env_timeout_s: float = 60.0
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
        _check(self.env_timeout_s >= 0, f"{w}.env_timeout_s", "must be >= 0 (0: none)")
        _check(self.temperature > 0, f"{w}.temperature", "must be > 0 (use eval for greedy)")
        _check(0 < self.top_p <= 1, f"{w}.top_p", "must be in (0, 1]")
        n = self.prompts_per_batch * self.samples_per_prompt
        _check(n % self.minibatches == 0, f"{w}.minibatches",
               f"{n} episodes per batch do not split into {self.minibatches} equal minibatches")
