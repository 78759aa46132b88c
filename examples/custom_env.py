"""A custom environment: a gymnasium.Env registered under an id, then trained on by that id.

    python examples/custom_env.py [OUT_DIR]

The env asks how many letters a word has. `reset` returns the prompt as chat messages in
`info["messages"]`; `step` takes the student's reply text, grades it, and ends the episode.
`info["answer"]` and `info["correct"]` feed the trainer's accuracy metrics.
"""

from __future__ import annotations

import random
import sys

import gymnasium as gym

from mmopd.envs import register_env, text_space
from mmopd.training.loop import train

WORDS = ("cat", "house", "banana", "river", "moon", "elephant", "tree", "window", "sky")


class LetterCountEnv(gym.Env):
    observation_space = action_space = text_space()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.word = random.Random(seed).choice(WORDS)
        question = f"How many letters are in the word {self.word}?"
        return question, {"messages": [{"role": "user", "content": question}],
                          "answer": str(len(self.word))}

    def step(self, action: str):
        correct = action.strip().split()[-1:] == [str(len(self.word))]
        return "", float(correct), True, False, {"correct": correct}


# the id a config names; the entry point is "module:Class" (or the class itself)
register_env("examples/LetterCount-v0", LetterCountEnv)


def main(out: str = "runs/example-env") -> dict:
    from _tiny import tiny_config

    cfg = tiny_config(out, ["env.id=examples/LetterCount-v0", "env.kwargs={}",
                            "env.eval_kwargs={}", "objective.name=opd"])
    return train(cfg)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
