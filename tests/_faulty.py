"""Faults injected into real runs for tests/test_faults.py: a teacher whose scores turn NaN or
-inf on the calls a test names, and a math env whose reset() hangs or raises and whose step()
spins forever on a fixed share of episodes. Tests set the module-level plans before training."""

from __future__ import annotations

import math
import time

import gymnasium as gym

from mmopd.envs import make_env, register_env, text_space
from mmopd.models import load_model, load_tokenizer
from mmopd.teachers.scorer import HFScorer, TokenScores

# score() call index -> "nan_one" (NaN on the batch's first token), "nan_all", "neginf_one"
# (-inf on its second token)
TEACHER_PLAN: dict[int, str] = {}


class FaultyTeacher:
    def __init__(self, scorer: HFScorer) -> None:
        self.scorer = scorer
        self.calls = 0

    def score(self, episodes, *, topk: int = 0, keep_hidden: bool = False) -> TokenScores:
        s = self.scorer.score(episodes)
        fault = TEACHER_PLAN.get(self.calls)
        self.calls += 1
        logp = s.logp_N.clone()
        if fault == "nan_one":
            logp[0] = math.nan
        elif fault == "nan_all":
            logp[:] = math.nan
        elif fault == "neginf_one":
            logp[1] = -math.inf
        return TokenScores(logp, s.entropy_N)


def make_faulty_teacher(cfg, tokenizer) -> FaultyTeacher:
    model = load_model(cfg.teacher.model, load_tokenizer(cfg.teacher.model, "teacher.model"),
                       "teacher.model")
    return FaultyTeacher(HFScorer(model.requires_grad_(False), tokenizer.pad_token_id))


class FlakyMath(gym.Env):
    """MathText, except: of every 8 reset() calls (counted over all instances) the 3rd sleeps
    `hang_s`, the 6th raises, and the episode of the 8th spins in step()."""

    observation_space = action_space = text_space()
    resets = 0

    def __init__(self, hang_s: float = 30.0, **kwargs) -> None:
        self.inner = make_env("mmopd/MathText-v0", **kwargs)
        self.hang_s = hang_s
        self.spin = False

    def reset(self, *, seed=None, options=None):
        FlakyMath.resets += 1
        k = FlakyMath.resets % 8
        if k == 3:
            time.sleep(self.hang_s)
        if k == 6:
            raise RuntimeError("reset broke")
        self.spin = k == 0
        return self.inner.reset(seed=seed, options=options)

    def step(self, action):
        while self.spin:  # pure Python: interrupted by the time limit
            pass
        return self.inner.step(action)


register_env("faulty/FlakyMath-v0", FlakyMath)
