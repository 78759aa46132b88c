"""A custom teacher: anything with a `score(episodes, topk=..., keep_hidden=...)` method that
returns per-token log-probs of the student's sampled tokens (`TokenScores`), built by a factory
the config names (`teacher.kind: custom`, `teacher.factory: "module:function"`).

    python examples/custom_teacher.py [OUT_DIR]

This one interpolates two in-process models token by token: alpha * log pi_T + (1 - alpha) *
log pi_0, the configured teacher and the frozen initial student, a softer target early in
distillation. (The sum is a per-token score, not a normalised distribution: fine for the
sampled-token objectives a custom teacher serves, opd / reopold / gopd.)
"""

from __future__ import annotations

import sys

import torch

from mmopd.episode import Episode
from mmopd.models import load_model, load_tokenizer
from mmopd.teachers.scorer import HFScorer, TokenScores
from mmopd.training.loop import train

ALPHA = 0.7


class InterpolatedTeacher:
    def __init__(self, teacher: HFScorer, initial: HFScorer, alpha: float) -> None:
        self.teacher, self.initial, self.alpha = teacher, initial, alpha

    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: bool = False) -> TokenScores:
        t = self.teacher.score(episodes)
        s = self.initial.score(episodes)
        logp_N = self.alpha * t.logp_N + (1 - self.alpha) * s.logp_N
        return TokenScores(logp_N, t.entropy_N)


def make_teacher(cfg, tokenizer) -> InterpolatedTeacher:
    """The factory `teacher.factory: "custom_teacher:make_teacher"` names."""
    teacher = load_model(cfg.teacher.model, load_tokenizer(cfg.teacher.model, "teacher.model"),
                         "teacher.model")
    initial = load_model(cfg.model, tokenizer)  # the student's starting weights, frozen
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the student trains
    pad = tokenizer.pad_token_id
    return InterpolatedTeacher(HFScorer(teacher.requires_grad_(False).to(device), pad),
                               HFScorer(initial.requires_grad_(False).to(device), pad), ALPHA)


def main(out: str = "runs/example-teacher") -> dict:
    from _tiny import tiny_config

    return train(tiny_config(out, ["teacher.kind=custom",
                                   "teacher.factory=custom_teacher:make_teacher",
                                   "objective.name=opd", "env.kwargs={level: 1}"]))


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
