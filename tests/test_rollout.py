"""The agent loop: exact sampled ids, masks on student tokens only, turn numbering, observations
rendered as token deltas, and failing envs recorded as data."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from mmopd.envs import text_space
from mmopd.rollout.agent_loop import EnvContractError, collect_episodes
from mmopd.rollout.render import ChatRenderer
from mmopd.rollout.sampler import HFSampler, SamplingParams


class TwoTurnEnv(gym.Env):
    """Asks twice; the second observation depends on the first reply."""

    observation_space = action_space = text_space()

    def __init__(self, fail_on_step: int | None = None) -> None:
        self.fail_on_step = fail_on_step

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return "q", {"messages": [{"role": "user", "content": f"q{seed}"}]}

    def step(self, action):
        self.turn += 1
        if self.fail_on_step == self.turn:
            raise RuntimeError("env broke")
        if self.turn == 2:
            return "", 1.0, True, False, {"correct": True}
        return f"you said {len(action)} chars", 0.5, False, False, {"role": "user"}


@pytest.fixture(scope="module")
def model(student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student_dir).eval()


def test_multi_turn_masks_and_rendering(model, tokenizer):
    r = ChatRenderer(tokenizer)
    torch.manual_seed(0)
    eps = collect_episodes([TwoTurnEnv() for _ in range(4)], [{"seed": 1}, {"seed": 2}],
                           HFSampler(model, tokenizer, stop_token_ids=r.stop_token_ids), r,
                           SamplingParams(n=2, max_new_tokens=6))
    assert [e.group for e in eps] == [0, 0, 1, 1]
    for ep in eps:
        assert ep.reward == 1.5 and ep.metadata["correct"]
        turns = sorted({s for s in ep.step_index if s >= 0})
        assert turns == [0, 1]
        student = [t for t, m in zip(ep.input_ids, ep.loss_mask) if m]
        assert len(student) == ep.num_generated == len([lp for lp in ep.sampled_logprobs if lp])
        assert all((m == 1) == (s >= 0) for m, s in zip(ep.loss_mask, ep.step_index))
        # the observation between the turns carries no loss and renders like the template would
        first = [t for t, s in zip(ep.input_ids, ep.step_index) if s == 0]
        reply = tokenizer.decode(first, skip_special_tokens=True)
        obs = f"you said {len(reply)} chars"
        second_start = ep.step_index.index(1)
        expect_mid = r.close_turn(first) + r.continuation([{"role": "user", "content": obs}])
        first_end = max(i for i, s in enumerate(ep.step_index) if s == 0) + 1
        assert ep.input_ids[first_end:second_start] == expect_mid


def test_failing_env_is_a_recorded_episode(model, tokenizer):
    r = ChatRenderer(tokenizer)
    eps = collect_episodes([TwoTurnEnv(fail_on_step=1) for _ in range(2)], [{"seed": 0}],
                           HFSampler(model, tokenizer), r, SamplingParams(n=2, max_new_tokens=4))
    assert all(e.stop_reason == "error" and "env broke" in e.metadata["error"] for e in eps)
    assert all(e.num_generated > 0 for e in eps)


def test_contract_errors(model, tokenizer):
    class NoMessages(TwoTurnEnv):
        def reset(self, *, seed=None, options=None):
            return "q", {}

    r = ChatRenderer(tokenizer)
    with pytest.raises(EnvContractError, match="info\\['messages'\\]"):
        collect_episodes([NoMessages()], [{}], HFSampler(model, tokenizer), r, SamplingParams())
    with pytest.raises(EnvContractError, match="teacher_messages"):
        collect_episodes([TwoTurnEnv()], [{}], HFSampler(model, tokenizer), r, SamplingParams(),
                         teacher_view=True)
