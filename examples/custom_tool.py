"""A custom tool: a typed, documented Python function becomes a tool the student can call, and an
environment offers it by name.

    python examples/custom_tool.py [OUT_DIR]

`@tool` reads the schema from the type hints and the Google-style docstring and registers the
tool as "word_count". The env lists it in `info["tools"]`; the agent loop shows its schema to the
chat template, runs the calls the student makes (ReAct form here: `Action: word_count[...]`) and
appends the results as tool messages, over up to `rollout.max_turns` turns.
"""

from __future__ import annotations

import random
import sys

import gymnasium as gym

from mmopd.envs import register_env, text_space
from mmopd.tools import tool
from mmopd.training.loop import train

SENTENCES = ("the cat sat on the mat", "a quick brown fox jumps over the lazy dog",
             "to be or not to be", "rain falls on the green hills every spring")


@tool
def word_count(text: str) -> int:
    """Count the words in a text.

    Args:
        text: the text to count
    """
    return len(text.split())


class WordCountEnv(gym.Env):
    observation_space = action_space = text_space()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.text = random.Random(seed).choice(SENTENCES)
        question = f"How many words are in: {self.text}?"
        return question, {"messages": [{"role": "user", "content": question}],
                          "tools": ["word_count"], "tool_parser": "react",
                          "answer": str(len(self.text.split()))}

    def step(self, action: str):
        correct = action.strip().split()[-1:] == [str(len(self.text.split()))]
        return "", float(correct), True, False, {"correct": correct}


register_env("examples/WordCount-v0", WordCountEnv)


def main(out: str = "runs/example-tool") -> dict:
    from _tiny import tiny_config

    cfg = tiny_config(out, ["env.id=examples/WordCount-v0", "env.kwargs={}",
                            "env.eval_kwargs={}", "rollout.max_turns=3", "objective.name=opd"])
    return train(cfg)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
