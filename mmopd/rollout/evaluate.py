"""Held-out evaluation: greedy accuracy and pass@k on the first problems of an eval env."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmopd.episode import Episode
from mmopd.rollout.agent_loop import collect_episodes
from mmopd.rollout.render import ChatRenderer
from mmopd.rollout.sampler import HFSampler, Sampler, SamplingParams
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
                        temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
                        batch_size: int = 64,
                        seed: int = 0, stop: list[str] | None = None, max_turns: int = 8,
                        max_episode_tokens: int = 0, env_id: str = "env",
                        vision: VisionProcessor | None = None, env_timeout_s: float = 0.0,
                        share: tuple[int, int] = (0, 1), sampler: Sampler | None = None,
                        ) -> tuple[list[Episode], list[Episode]]:
    """The episodes `evaluate` scores: one greedy episode for each of problems
    0..num_problems-1 (fewer when the env has fewer), and with pass_k > 0 also pass_k sampled
    ones per problem, in problem order. Sampling uses its own RNG stream, so an evaluation never
    changes the training run's random state. `share` (rank, ranks): only the problems whose
    index is rank modulo ranks (each rank's part of an evaluation split across processes; its
    sampling stream is seeded per rank). `sampler`: the one that samples (the run's own, vLLM
    included); None: HF generate on `model`."""
    probe = pool.take(1)[0].unwrapped
    total = num_problems
    if getattr(probe, "num_problems", None) is not None:
        total = min(total, probe.num_problems)
    rank, ranks = share
    indices = list(range(rank, total, ranks))
    num = len(indices)
    if not num:
        return [], []
    renderer = ChatRenderer(tokenizer, vision)
    sampler = sampler or HFSampler(model, tokenizer, batch_size=batch_size,
                                   stop_token_ids=renderer.stop_token_ids,
                                   suppress_token_ids=vision.special_ids if vision else None)
    starts = [{"options": {"index": i}} for i in indices]
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
            torch.manual_seed(seed + 7919 * rank)
            sampled = collect_episodes(
                pool.take(num * pass_k), starts, sampler, renderer,
                SamplingParams(pass_k, temperature, top_p, max_new_tokens, stop),
                desc=f"eval pass@{pass_k}", **limits)
    return greedy, sampled


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pool: EnvPool, *,
             num_problems: int, pass_k: int = 0, **kwargs: Any) -> dict[str, float]:
    """Greedy accuracy over problems 0..num_problems-1; with pass_k > 0 also pass@k (any of k
    samples correct), maj@k (the most frequent parsed answer of the k samples is right) and the
    mean per-sample accuracy. `kwargs`: the sampling and episode settings of
    `evaluation_episodes` (temperature, max_new_tokens, seed, vision, ...). Problems whose
    episode failed to start (a corrupt image) count as wrong."""
    greedy, sampled = evaluation_episodes(model, tokenizer, pool, num_problems=num_problems,
                                          pass_k=pass_k, **kwargs)
    return summarise(greedy, sampled, pass_k)


def majority(samples: list[Episode]) -> tuple[str | None, bool]:
    """The most frequent parsed answer of the samples (ties: the first seen) and whether it is
    right; samples without a parsed answer do not vote."""
    votes = Counter(str(e.metadata["pred"]) for e in samples if e.metadata.get("pred") is not None)
    if not votes:
        return None, False
    top = max(votes.values())
    answer = next(a for a in votes if votes[a] == top)  # Counter keeps first-seen order
    return answer, next(is_correct(e) for e in samples if str(e.metadata.get("pred")) == answer)


def outcomes(greedy: list[Episode], sampled: list[Episode], pass_k: int) -> list[dict[str, Any]]:
    """What `summarise` needs of each problem, small enough to gather across processes: the
    greedy episode's correctness and length, and the samples' correctness and majority vote."""
    rows = []
    for i, ep in enumerate(greedy):
        row: dict[str, Any] = {"correct": is_correct(ep), "tokens": ep.num_generated}
        if "env" in ep.metadata:  # an env of a mixture (mmopd/Mixture-v0)
            row["env"] = str(ep.metadata["env"])
        if pass_k:
            group = sampled[i * pass_k:(i + 1) * pass_k]
            row["hits"] = [is_correct(e) for e in group]
            row["majority"] = majority(group)[1]
        rows.append(row)
    return rows


def summarise(greedy: list[Episode], sampled: list[Episode], pass_k: int) -> dict[str, float]:
    return summarise_outcomes(outcomes(greedy, sampled, pass_k), pass_k)


def summarise_outcomes(rows: list[dict[str, Any]], pass_k: int) -> dict[str, float]:
    num = len(rows)
    out = {"accuracy": sum(r["correct"] for r in rows) / max(num, 1), "num_problems": float(num),
           "mean_response_tokens": sum(r["tokens"] for r in rows) / max(num, 1)}
    if pass_k:
        out[f"pass@{pass_k}"] = sum(any(r["hits"]) for r in rows) / max(num, 1)
        out[f"maj@{pass_k}"] = sum(r["majority"] for r in rows) / max(num, 1)
        out["sample_accuracy"] = sum(sum(r["hits"]) for r in rows) / max(num * pass_k, 1)
    envs = sorted({r["env"] for r in rows if "env" in r})
    if len(envs) > 1:  # a mixture: each env's own accuracy (and pass@k) beside the overall one
        for env in envs:
            mine = [r for r in rows if r.get("env") == env]
            out[f"accuracy/{env}"] = sum(r["correct"] for r in mine) / len(mine)
            if pass_k:
                out[f"pass@{pass_k}/{env}"] = sum(any(r["hits"]) for r in mine) / len(mine)
    return out


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    """The last user message as text (images as <image>)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                return "".join(it.get("text", "") if it.get("type") == "text" else "<image>"
                               for it in content)
            return str(content)
    return ""


def _generation(ep: Episode) -> dict[str, Any]:
    turns = ep.metadata.get("completions", [])
    return {"reply": "\n\n".join(turns), **({"turns": turns} if len(turns) > 1 else {}),
            "pred": ep.metadata.get("pred"), "correct": is_correct(ep),
            "stop_reason": ep.stop_reason,
            **({"error": ep.metadata["error"]} if "error" in ep.metadata else {})}


def records(greedy: list[Episode], sampled: list[Episode], pass_k: int) -> list[dict[str, Any]]:
    """One row per problem: the prompt, the gold answer, the greedy generation (reply, parsed
    answer, correct) and, with pass_k, every sample and the majority answer."""
    rows = []
    for i, ep in enumerate(greedy):
        meta = ep.metadata
        row = {"index": i, "problem_id": meta.get("problem_id", str(i)),
               "prompt": _prompt_text(meta.get("messages", [])),
               "answer": meta.get("answer"), **_generation(ep)}
        if pass_k:
            group = sampled[i * pass_k:(i + 1) * pass_k]
            row["samples"] = [_generation(e) for e in group]
            row["maj_answer"], row["maj_correct"] = majority(group)
        rows.append(row)
    return rows
