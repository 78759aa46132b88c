"""mmopd/ToolMath-v0: arithmetic a small model cannot do in its head, with tools to do it.

The student may call the tools the env offers (calculator by default, or python) over several
turns; the agent loop runs the calls and shows the results. The first reply without a tool call is
the final answer, graded against the exact result. `expert_reply` demonstrates the intended use:
one tool call, then "Answer: <result>". `call_format="react"` makes that call the short
`Action: calculator[123*45]` (the env tells the agent loop so through info["tool_parser"]);
`careless` > 0 makes a seeded fraction of demonstrations answer from the head instead
(`Guess: <result>`, exact but with no tool call): the habit a weakly supervised student picks up.
The guess has its own word so that the careful path's "Answer:" always copies a tool result.
`source` (a hub dataset id, save_to_disk folder, Parquet, CSV or JSONL, with `preset` / `fields`
as MathText takes them, see envs/sources.py) poses a dataset's word problems instead, tools
still on offer; such problems have no expert demonstration.
"""

from __future__ import annotations

import functools
import operator
import random
from typing import Any

import gymnasium

from mmopd.rollout.toolcalls import format_call

from .answers import check_answer
from .registration import careless_rate, reset_index
from .sources import env_source_spec, load_source
from .spaces import text_space

LEVELS = {  # level -> (description, generator of (question expression, value))
    1: "two-digit times two-digit",
    2: "three-digit times two-digit",
    3: "three-digit times three-digit plus three-digit",
}
TOOLS = ("calculator", "python")
CALL_FORMATS = ("hermes", "react")
_TEST_SEED = 20_261_122  # fixed: the held-out set is identical on every machine
DEFAULT_SYSTEM = ("Use a tool for arithmetic. When you know the result, reply with "
                  "'Answer: <number>'.")


def generate_expression(rng: random.Random, level: int) -> tuple[str, int]:
    """A random expression of the level and its exact value."""
    if level == 1:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}*{b}", a * b
    if level == 2:
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        return f"{a}*{b}", a * b
    if level == 3:
        a, b, c = rng.randint(100, 999), rng.randint(100, 999), rng.randint(100, 999)
        return f"{a}*{b}+{c}", a * b + c
    raise ValueError(f"level must be one of {sorted(LEVELS)}, got {level!r}")


@functools.cache
def _test_set(level: int, size: int) -> tuple[tuple[str, int], ...]:
    rng, seen, out = random.Random(_TEST_SEED + level), set(), []
    while len(out) < size:
        expr, value = generate_expression(rng, level)
        if expr not in seen:
            seen.add(expr)
            out.append((expr, value))
    return tuple(out)


class ToolMathEnv(gymnasium.Env):
    """One expression per episode; tool turns are free, the first plain reply is graded."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, level: int = 1, split: str = "train", test_size: int = 200,
                 tools: list[str] | tuple[str, ...] = ("calculator",),
                 system_prompt: str | None = DEFAULT_SYSTEM, call_format: str = "hermes",
                 careless: float = 0.0, source: str | None = None, subset: str | None = None,
                 source_split: str | None = None, preset: str | None = None,
                 fields: dict[str, str] | None = None) -> None:
        generate_expression(random.Random(0), level)  # validates the level
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
            raise ValueError(f"test_size must be a positive int, got {test_size!r}")
        bad = [t for t in tools if t not in TOOLS]
        if not tools or bad:
            raise ValueError(f"tools must be a non-empty subset of {TOOLS}, got {list(tools)}")
        if call_format not in CALL_FORMATS:
            raise ValueError(f"call_format must be one of {CALL_FORMATS}, got {call_format!r}")
        careless = careless_rate(careless)
        self.call_format, self.careless = call_format, careless
        self._from_head = False  # this episode's demonstration skips the tool (careless)
        self.level, self.split, self.test_size = level, split, test_size
        self.tools, self.system_prompt = list(tools), system_prompt
        self.observation_space = self.action_space = text_space()
        self.num_problems: int | None = test_size if split == "test" else None
        self._current: tuple[str, int | str] | None = None
        self._rows: tuple[tuple[str, str], ...] | None = None  # a dataset's (question, answer)
        self.row_errors: tuple[str, ...] = ()
        if source is not None:
            if careless:
                raise ValueError("careless needs generated expressions (source=None)")
            spec = env_source_spec(source, split, subset=subset, source_split=source_split,
                                   preset=preset, fields=fields)
            loaded = load_source(spec)
            self._rows = tuple((r["question"], r["answer"]) for r in loaded.rows)
            self._ids = {r["question"]: str(r.get("id") or r["where"]) for r in loaded.rows}
            self.row_errors, self.num_problems = loaded.errors, len(self._rows)

    def problem(self, i: int) -> tuple[str, int | str]:
        """Held-out problem i (test split) or the problem of seed i (train split)."""
        i = operator.index(i)
        if self._rows is not None:
            return self._rows[i]
        if self.split == "test":
            return _test_set(self.level, self.test_size)[i]
        held_out = {e for e, _ in _test_set(self.level, self.test_size)}
        rng = random.Random(i)
        while True:  # train never shows a held-out question
            expr, value = generate_expression(rng, self.level)
            if expr not in held_out:
                return expr, value

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        index = reset_index(options)
        if index is not None:
            if self.split != "test" and self._rows is None:
                raise ValueError("options['index'] needs split='test' or a source")
            expr, value = self.problem(index)
        elif self._rows is not None:
            expr, value = self._rows[int(self.np_random.integers(len(self._rows)))]
        elif self.split == "test":
            expr, value = self.problem(int(self.np_random.integers(self.test_size)))
        else:
            expr, value = self.problem(seed if seed is not None
                                       else int(self.np_random.integers(2**62)))
        self._current = (expr, value)
        if self.careless:
            self._from_head = random.Random(f"careless-{expr}-{seed}").random() < self.careless
        question = expr if self._rows is not None else f"What is {expr}?"
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        info = {
            "messages": system + [{"role": "user", "content": question}],
            # privileged view for self-distillation: the teacher is told the result
            "teacher_messages": system + [{"role": "user",
                                           "content": f"{question} (The result is {value}.)"}],
            "tools": list(self.tools),
            "answer": str(value),
            "problem_id": self._ids[expr] if self._rows else f"toolmath-L{self.level}-{expr}",
            "tool_parser": self.call_format,
        }
        return question, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._current is None:
            raise RuntimeError("ToolMathEnv.step() called before reset()")
        if not isinstance(action, str):
            raise TypeError(f"action must be the reply text (str), got {type(action).__name__}")
        correct, pred = check_answer(action, str(self._current[1]))
        self._current = None
        return "", float(correct), True, False, {"correct": correct, "pred": pred}

    def expert_reply(self, messages: list[dict[str, Any]]) -> str:
        """Call the first tool on the expression; once its result is shown, answer with it.
        A careless demonstration answers at once, without the tool."""
        if self._current is None:
            raise RuntimeError("expert_reply() needs a running episode")
        if self._rows is not None:
            raise RuntimeError("a dataset's problems have no expert demonstration (source set)")
        expr, value = self._current
        if self._from_head:
            return f"Guess: {value}"
        last = messages[-1] if messages else {}
        if last.get("role") == "tool" and not str(last.get("content", "")).startswith("Error"):
            return f"Answer: {str(last['content']).strip()}"
        if self.tools[0] == "python":
            return format_call("python", {"code": f"print({expr})"}, self.call_format)
        return format_call("calculator", {"expression": expr}, self.call_format)
