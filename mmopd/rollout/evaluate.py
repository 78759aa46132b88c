"""Held-out evaluation: greedy accuracy and pass@k on the first problems of an eval env."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmopd.episode import Episode
from mmopd.rollout.agent_loop import collect_episodes
from mmopd.rollout.render import ChatRenderer
from mmopd.rollout.sampler import HFSampler, SamplingParams
from mmopd.vision import VisionProcessor


def is_correct(ep: Episode) -> bool:
    return bool(ep.metadata.get("correct", ep.reward > 0))


class EnvPool:
    """Env instances reused across batches (envs are configs until made; make them once)."""

    def __init__(self, make: Callable[[], gym.Env]) -> None:
        self.make = make
        self.envs: list[gym.Env] = []

    def take(self, n: int) -> list[gym.Env]:
        while len(self.envs) < n:
            self.envs.append(self.make())
        return self.envs[:n]


def evaluation_episodes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        pool: EnvPool, *, num_problems: int, pass_k: int = 0,
                        temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 64,
                        seed: int = 0, stop: list[str] | None = None, max_turns: int = 8,
                        max_episode_tokens: int = 0, env_id: str = "env",
                        vision: VisionProcessor | None = None, env_timeout_s: float = 0.0,
                        ) -> tuple[list[Episode], list[Episode]]:
    """The episodes `evaluate` scores: one greedy episode for each of problems
    0..num_problems-1 (fewer when the env has fewer), and with pass_k > 0 also pass_k sampled
    ones per problem, in problem order. Sampling uses its own RNG stream, so an evaluation never
    changes the training run's random state."""
    num = num_problems
    probe = pool.take(1)[0].unwrapped
    if getattr(probe, "num_problems", None) is not None:
        num = min(num, probe.num_problems)
    renderer = ChatRenderer(tokenizer, vision)
    sampler = HFSampler(model, tokenizer, batch_size=batch_size,
                        stop_token_ids=renderer.stop_token_ids,
                        suppress_token_ids=vision.special_ids if vision else None)
    starts = [{"options": {"index": i}} for i in range(num)]
    stop = stop or []
    limits = {"max_turns": max_turns, "max_episode_tokens": max_episode_tokens, "env_id": env_id,
              "env_timeout_s": env_timeout_s}
    greedy = collect_episodes(pool.take(num), starts, sampler, renderer,
                              SamplingParams(1, 0.0, 1.0, max_new_tokens, stop),
                              desc="eval greedy", **limits)
    sampled: list[Episode] = []
    if pass_k:
        cuda = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            sampled = collect_episodes(
                pool.take(num * pass_k), starts, sampler, renderer,
                SamplingParams(pass_k, temperature, 1.0, max_new_tokens, stop),
                desc=f"eval pass@{pass_k}", **limits)
    return greedy, sampled


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pool: EnvPool, *,
             num_problems: int, pass_k: int = 0, **kwargs: Any) -> dict[str, float]:
    """Greedy accuracy over problems 0..num_problems-1; with pass_k > 0 also pass@k (any of k
    samples correct) and the mean per-sample accuracy. `kwargs`: the sampling and episode
    settings of `evaluation_episodes` (temperature, max_new_tokens, seed, vision, ...).
    Problems whose episode failed to start (a corrupt image) count as wrong."""
    greedy, sampled = evaluation_episodes(model, tokenizer, pool, num_problems=num_problems,
                                          pass_k=pass_k, **kwargs)
    num = len(greedy)
    out = {"accuracy": sum(map(is_correct, greedy)) / max(num, 1), "num_problems": float(num),
           "mean_response_tokens": sum(e.num_generated for e in greedy) / max(num, 1)}
    if pass_k:
        hits = [[is_correct(e) for e in sampled[i * pass_k:(i + 1) * pass_k]] for i in range(num)]
        out[f"pass@{pass_k}"] = sum(any(h) for h in hits) / max(num, 1)
        out["sample_accuracy"] = sum(sum(h) for h in hits) / max(num * pass_k, 1)
    return out
