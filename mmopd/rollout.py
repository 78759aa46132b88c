"""The agent loop: drives a batch of environments with a Sampler, turn by turn, into Episodes.

Single-turn envs (math) terminate after the first reply; multi-turn envs return an observation that
is appended as a new message, rendered as a token delta. Sampled tokens are appended exactly as the
sampler returned them. An env that raises ends its episode with stop reason "error"; it never
crashes the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

from mmopd.episode import STOP_ENV, STOP_ERROR, STOP_MAX_TURNS, Episode
from mmopd.render import ChatRenderer
from mmopd.sampler import Sampler, SamplingParams


class EnvContractError(ValueError):
    """An environment's reset() does not provide what the agent loop needs."""


def _reset(env: gym.Env, start: dict[str, Any], env_id: str) -> dict[str, Any]:
    _, info = env.reset(**start)
    if not isinstance(info, dict) or "messages" not in info:
        raise EnvContractError(
            f"{env_id}: reset() must return info['messages'] (the chat messages of the prompt)")
    return info


def collect_episodes(
    envs: list[gym.Env],
    starts: list[dict[str, Any]],
    sampler: Sampler,
    renderer: ChatRenderer,
    params: SamplingParams,
    *,
    teacher_view: bool = False,
    max_turns: int = 8,
    env_id: str = "env",
    decode: Callable[[list[int]], str] | None = None,
    desc: str = "rollout",
) -> list[Episode]:
    """One episode per (start, sample): `params.n` samples of each start, grouped by start index.

    `starts` are reset() keyword arguments (e.g. {"seed": 3} or {"options": {"index": 0}});
    `envs` needs len(starts) * params.n instances (one per concurrent episode).
    """
    n = params.n
    if len(envs) < len(starts) * n:
        raise ValueError(f"need {len(starts) * n} env instances, got {len(envs)}")
    decode = decode or (lambda ids: renderer.tokenizer.decode(ids, skip_special_tokens=True))
    episodes: list[Episode] = []
    for g, start in enumerate(starts):
        for j in range(n):
            info = _reset(envs[g * n + j], start, env_id)
            prompt = renderer.prompt(info["messages"])
            teacher_prompt = None
            if teacher_view:
                if "teacher_messages" not in info:
                    raise EnvContractError(
                        f"{env_id}: teacher.view=privileged needs info['teacher_messages'] from "
                        "reset(); this env/problem provides none (e.g. no worked solution)")
                teacher_prompt = renderer.prompt(info["teacher_messages"])
            meta = {k: v for k, v in info.items() if k not in ("messages", "teacher_messages")}
            meta["messages"] = list(info["messages"])
            episodes.append(Episode(
                input_ids=list(prompt), loss_mask=[0] * len(prompt), step_index=[-1] * len(prompt),
                sampled_logprobs=[0.0] * len(prompt), prompt_len=len(prompt), group=g,
                teacher_prompt_ids=teacher_prompt, metadata=meta))

    active = list(range(len(episodes)))
    one = SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                         max_new_tokens=params.max_new_tokens, stop=params.stop)
    for turn in range(max_turns):
        if not active:
            break
        samples = sampler.generate([episodes[i].input_ids for i in active], one, desc=desc)
        still = []
        for i, (sample,) in zip(active, samples):
            ep, env = episodes[i], envs[i]
            ep.append(sample.token_ids, student=True, step=turn, logprobs=sample.logprobs)
            ep.stop_reason = sample.stop_reason
            text = decode(sample.token_ids)
            ep.metadata.setdefault("completions", []).append(text)
            try:
                obs, reward, terminated, truncated, info = env.step(text)
            except Exception as e:  # a failing env is data: record it and move on
                ep.stop_reason = STOP_ERROR
                ep.metadata["error"] = f"{type(e).__name__}: {e}"
                continue
            ep.reward += float(reward)
            ep.metadata.update({k: v for k, v in info.items() if k != "messages"})
            if terminated or truncated:
                if truncated:
                    ep.stop_reason = STOP_ENV
                continue
            role = info.get("role", "user")
            ep.append(renderer.close_turn(sample.token_ids)
                      + renderer.continuation([{"role": role, "content": str(obs)}]),
                      student=False)
            still.append(i)
        active = still
    for i in active:  # ran out of turns
        episodes[i].stop_reason = STOP_MAX_TURNS
    return episodes
