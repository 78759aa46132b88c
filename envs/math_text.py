"""mmopd/MathText-v0: single-turn math problems as a text env (question in, reply text out)."""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import random
import re
from collections.abc import Callable
from typing import Any

import gymnasium

from .answers import check_answer
from .registration import careless_rate, reset_index
from .sources import DatasetError, env_source_spec, load_source, source_spec
from .spaces import text_space

__all__ = [
    "DatasetError",
    "MathTextEnv",
    "Problem",
    "careless_solution",
    "check_answer",
    "generate_problem",
    "load_problems",
]

LEVELS = (1, 2, 3, 4, 5)
# Number of distinct questions per level (a - b only with a >= b), so the held-out set can be
# capped at half of it and never eats the whole train space.
_CAPACITY = {
    1: 10 * 10,
    2: 90 * 90,
    3: 90 * 90 + 90 * 91 // 2,
    4: 900 * 900 + 900 * 901 // 2,
    5: 90 * 8,
}
_TEST_SEED = 20_240_917  # fixed: the held-out set must be identical on every machine and run
TEACHER_TEMPLATE = "{question}\n\nReference solution: {solution}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem; `solution` (a worked solution, may be None) is the teacher's privileged view."""

    question: str
    answer: str
    solution: str | None
    id: str


# ----------------------------------------------------------------------------- synthetic


def _columns(n: int) -> list[int]:
    return [int(d) for d in reversed(str(n))]  # least significant digit first


# A `slip()` call per carry or borrow: True forgets it (a careless solver's worked solution, for
# deliberately weak students); the default never slips.
Slip = Callable[[], bool]
_NEVER: Slip = lambda: False  # noqa: E731


def _add_solution(a: int, b: int, slip: Slip = _NEVER) -> tuple[str, int]:
    xs, ys, steps, carry, digits = _columns(a), _columns(b), [], 0, []
    width = max(len(xs), len(ys))
    for i in range(width):
        terms = xs[i : i + 1] + ys[i : i + 1] + ([carry] if carry else [])
        total = sum(terms)
        expr = "+".join(map(str, terms)) + f"={total}"
        if i == width - 1:
            steps.append(expr + ".")
            digits.append(total)
        else:
            carry = 0 if total < 10 or slip() else total // 10
            digits.append(total % 10)
            steps.append(expr + f", write {total % 10}" + (f" carry {carry}." if carry else "."))
    return " ".join(steps), _join(digits)


def _sub_solution(a: int, b: int, slip: Slip = _NEVER) -> tuple[str, int]:
    # requires a >= b, so the top column never borrows
    xs, ys, steps, borrow, digits = _columns(a), _columns(b), [], 0, []
    for i, x in enumerate(xs):
        y = ys[i] if i < len(ys) else 0
        top = x + 10 if x - borrow - y < 0 else x
        expr = str(top) + (f"-{borrow}" if borrow else "") + (f"-{y}" if i < len(ys) else "")
        expr += f"={top - borrow - y}"
        digits.append(top - borrow - y)
        borrow = int(top > x and not slip())
        steps.append(expr + (", borrow 1." if borrow else "."))
    return " ".join(steps), _join(digits)


def _mul_solution(a: int, d: int, slip: Slip = _NEVER) -> tuple[str, int]:
    xs, steps, carry, digits = _columns(a), [], 0, []
    for i, x in enumerate(xs):
        total = x * d + carry
        expr = f"{x}*{d}" + (f"+{carry}" if carry else "") + f"={total}"
        if i == len(xs) - 1:
            steps.append(expr + ".")
            digits.append(total)
        else:
            carry = 0 if total < 10 or slip() else total // 10
            digits.append(total % 10)
            steps.append(expr + f", write {total % 10}" + (f" carry {carry}." if carry else "."))
    return " ".join(steps), _join(digits)


def _join(digits: list[int]) -> int:
    """The number whose columns (least significant first) are `digits`; the last column is
    written whole (it may have two digits)."""
    *low, top = digits
    return int(str(top) + "".join(str(d) for d in reversed(low))) if low else top


def generate_problem(rng: random.Random, level: int, problem_id: str | None = None) -> Problem:
    """One arithmetic problem with a column-by-column worked solution ending in \\boxed{}.

    Levels: 1 single-digit +; 2 two-digit +; 3 two-digit + or - (result >= 0);
    4 three-digit + or -; 5 two-digit * one-digit (2..9).
    """
    _check_level(level)
    if level == 5:
        a, b, op = rng.randint(10, 99), rng.randint(2, 9), "*"
    else:
        lo, hi = {1: (0, 9), 2: (10, 99), 3: (10, 99), 4: (100, 999)}[level]
        op = rng.choice("+-") if level >= 3 else "+"
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "-" and a < b:
            a, b = b, a
    question = f"{a}{op}{b}="
    steps, result = _SOLVERS[op](a, b)
    solution = f"{steps} \\boxed{{{result}}}"
    return Problem(question, str(result), solution, problem_id or f"synthetic-L{level}-{a}{op}{b}")


_SOLVERS = {"+": _add_solution, "-": _sub_solution, "*": _mul_solution}
_QUESTION = re.compile(r"(\d+)([+*-])(\d+)=")


def careless_solution(question: str, careless: float, rng: random.Random) -> str:
    """The worked solution of a synthetic question as a careless solver writes it: each carry
    (or borrow) is forgotten with probability `careless`, and the boxed answer is what the
    slipped columns give (wrong whenever a slip happened)."""
    m = _QUESTION.fullmatch(question)
    if m is None:
        raise ValueError(f"not a synthetic arithmetic question: {question!r}")
    a, op, b = int(m[1]), m[2], int(m[3])
    steps, result = _SOLVERS[op](a, b, lambda: rng.random() < careless)
    return f"{steps} \\boxed{{{result}}}"


def _check_level(level: Any) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or level not in LEVELS:
        raise ValueError(f"level must be an int in 1..5, got {level!r}")


@functools.lru_cache(maxsize=32)
def _test_set(level: int, test_size: int) -> tuple[Problem, ...]:
    # At most half of a level's questions are held out, so training always has problems left
    # (level 1 only has 100 distinct questions).
    size = min(test_size, _CAPACITY[level] // 2)
    rng, seen, problems = random.Random(_TEST_SEED + level), set(), []
    while len(problems) < size:
        p = generate_problem(rng, level, f"synthetic-L{level}-test-{len(problems)}")
        if p.question not in seen:
            seen.add(p.question)
            problems.append(p)
    return tuple(problems)


@functools.lru_cache(maxsize=32)
def _test_questions(level: int, test_size: int) -> frozenset[str]:
    return frozenset(p.question for p in _test_set(level, test_size))


# ----------------------------------------------------------------------------- files


def load_problems(
    source: str | os.PathLike[str],
    question_key: str = "question",
    answer_key: str = "answer",
    solution_key: str = "solution",
    *,
    subset: str | None = None,
    split: str | None = None,
    preset: str | None = None,
    fields: dict[str, str] | None = None,
) -> list[Problem]:
    """Problems from a source (`envs/sources.py`: a hub dataset id, a save_to_disk folder,
    Parquet, CSV or JSON lines). `fields` (or a preset) maps columns; the *_key arguments are
    the older spelling of fields.question / answer / solution. Ids are "<name>:<row>"."""
    fields = _key_fields(question_key, answer_key, solution_key, fields)
    loaded = load_source(source_spec(source, subset=subset, split=split, preset=preset,
                                     fields=fields))
    return [_problem(r) for r in loaded.rows]


def _key_fields(question_key: str, answer_key: str, solution_key: str,
                fields: dict[str, str] | None) -> dict[str, str] | None:
    """`fields` with the older *_key spelling folded in (keys left at their defaults add
    nothing, so a preset's own columns stand)."""
    keys = {"question": question_key, "answer": answer_key, "solution": solution_key}
    if fields is not None and not isinstance(fields, dict):
        return fields  # the source spec refuses it, naming it
    return {**{k: v for k, v in keys.items() if v != k}, **(fields or {})} or None


def _problem(row: dict[str, Any]) -> Problem:
    return Problem(row["question"], row["answer"], row.get("solution"),
                   str(row.get("id") or row["where"]))


# ----------------------------------------------------------------------------- env


def _check_key(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


class MathTextEnv(gymnasium.Env):
    """One math problem per episode: reset() gives the question, step(reply) grades the reply.

    source="synthetic" generates arithmetic (split "train": endless, never a test question;
    split "test": a fixed held-out set of test_size problems). Any other source is a dataset
    (`envs/sources.py`): a hub id (with `subset`), a save_to_disk folder, Parquet, CSV or JSON
    lines; `preset` ("gsm8k", "math", "math500", "aime") or `fields` maps its columns. The
    dataset's split is `source_split`, else `split` when the dataset has splits; a single-split
    source (a file) serves its rows to both splits.
    `careless` > 0 makes info["solution"] (the demonstration `mmopd sft` trains on) a careless
    solver's: each carry or borrow is forgotten with that probability. Grading and the
    teacher's reference-solution view stay exact.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        source: str | os.PathLike[str] = "synthetic",
        split: str = "train",
        level: int = 2,
        system_prompt: str | None = None,
        test_size: int = 200,
        question_key: str = "question",
        answer_key: str = "answer",
        solution_key: str = "solution",
        careless: float = 0.0,
        subset: str | None = None,
        source_split: str | None = None,
        preset: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise ValueError(f"source must be 'synthetic', a dataset id or a path, got {source!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        _check_level(level)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {system_prompt!r}")
        if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
            raise ValueError(f"test_size must be a positive int, got {test_size!r}")
        for name, key in (("question_key", question_key), ("answer_key", answer_key),
                          ("solution_key", solution_key)):  # fmt: skip
            _check_key(name, key)
        careless = careless_rate(careless)
        if careless and str(source) != "synthetic":
            raise ValueError("careless needs source='synthetic' (it rewrites generated solutions)")
        self.source, self.split, self.level = str(source), split, level
        self.careless = careless
        self.system_prompt, self.test_size = system_prompt, test_size

        self._problems: tuple[Problem, ...] | None
        self.row_errors: tuple[str, ...] = ()  # every skipped row of a dataset, "name:row: why"
        if self.source == "synthetic":
            self._problems = _test_set(level, test_size) if split == "test" else None
            self.observation_space = text_space()
        else:
            spec = env_source_spec(
                source, split, subset=subset, source_split=source_split, preset=preset,
                fields=_key_fields(question_key, answer_key, solution_key, fields))
            loaded = load_source(spec)
            self.row_errors = loaded.errors
            self._problems = tuple(_problem(r) for r in loaded.rows)
            # Widen the space to the file's own characters/lengths: observations must be in it.
            questions = [p.question for p in self._problems]
            self.observation_space = text_space(
                max(8192, *map(len, questions)), extra_chars="".join(set("".join(questions)))
            )
        self.action_space = self.observation_space
        self.num_problems: int | None = None if self._problems is None else len(self._problems)
        self._current: Problem | None = None

    def problem(self, i: int) -> Problem:
        """The i-th problem of a finite set; for the endless train split, the problem of seed i."""
        i = operator.index(i)
        if self._problems is None:
            if i < 0:
                raise IndexError(f"problem seed must be >= 0, got {i}")
            rng, exclude = random.Random(i), _test_questions(self.level, self.test_size)
            while True:  # reject held-out questions so train never overlaps test
                p = generate_problem(rng, self.level, f"synthetic-L{self.level}-{i}")
                if p.question not in exclude:
                    return p
        if not 0 <= i < len(self._problems):
            raise IndexError(
                f"problem index {i} out of range: this set has {len(self._problems)} problems "
                f"(valid indices 0..{len(self._problems) - 1})"
            )
        return self._problems[i]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        index = reset_index(options)
        if index is not None:
            if self._problems is None:
                raise ValueError("options['index'] needs a finite set (split='test' or a file)")
            problem = self.problem(index)
        elif self._problems is not None:
            problem = self._problems[int(self.np_random.integers(len(self._problems)))]
        else:
            # The seed itself names the problem, so the same seed always gives the same one.
            problem = self.problem(
                seed if seed is not None else int(self.np_random.integers(2**62))
            )
        self._current = problem
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        info: dict[str, Any] = {
            "messages": system + [{"role": "user", "content": problem.question}],
            "answer": problem.answer,
            "solution": problem.solution,
            "problem_id": problem.id,
        }
        if self.careless:
            rng = random.Random(f"careless-{problem.id}-{seed}")
            info["solution"] = careless_solution(problem.question, self.careless, rng)
        if problem.solution:
            teacher_text = TEACHER_TEMPLATE.format(
                question=problem.question, solution=problem.solution
            )
            info["teacher_messages"] = system + [{"role": "user", "content": teacher_text}]
        return problem.question, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._current is None:
            raise RuntimeError(
                "MathTextEnv.step() called before reset(): every episode is a single step, "
                "call reset() to get a new problem first"
            )
        if not isinstance(action, str):
            raise TypeError(f"action must be the reply text (str), got {type(action).__name__}")
        correct, pred = check_answer(action, self._current.answer)
        self._current = None  # single-turn: the episode is over
        return "", float(correct), True, False, {"correct": correct, "pred": pred}
