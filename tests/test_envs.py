"""Tests for mmopd.envs: registry, text spaces, the MathText env, answer checking, file loading."""

from __future__ import annotations

import importlib
import json
import random
import sys
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import gymnasium
import pytest
from conftest import check_env_quietly
from hypothesis import given, settings
from hypothesis import strategies as st

import mmopd.envs as envs
from mmopd.envs import EnvNotFoundError, import_env_modules, list_envs, make_env, text_space
from mmopd.envs.math_text import (
    DatasetError,
    MathTextEnv,
    careless_solution,
    check_answer,
    generate_problem,
    load_problems,
)

MATH = "mmopd/MathText-v0"


# ----------------------------------------------------------------------------- registry


def test_builtin_registered_and_reload_is_silent() -> None:
    assert MATH in list_envs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(envs)
    assert list_envs().count(MATH) == 1


@pytest.mark.parametrize("env_id", list_envs())
def test_check_env_every_registered_env(env_id: str) -> None:
    env = make_env(env_id)
    check_env_quietly(env)
    check_env_quietly(env.unwrapped)


@pytest.mark.parametrize("kwargs", [{"split": "test", "test_size": 20}, {"level": 5}])
def test_check_env_variants(kwargs: dict) -> None:
    check_env_quietly(MathTextEnv(**kwargs))


def test_unknown_id_names_id_and_suggests() -> None:
    with pytest.raises(EnvNotFoundError, match="mmopd/MathTxt-v0") as info:
        make_env("mmopd/MathTxt-v0")
    msg = str(info.value)
    assert "mmopd/MathText-v0" in msg and "register_env" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_bad_kwargs_name_env_and_kwarg() -> None:
    with pytest.raises(ValueError, match=r"mmopd/MathText-v0.*'levle'"):
        make_env(MATH, levle=3)
    with pytest.raises(ValueError, match="level"):
        make_env(MATH, level=9)


def test_import_env_modules_error_names_module() -> None:
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        import_env_modules(["no_such_module_xyz"])
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        make_env("no_such_module_xyz:Foo-v0")


_USER_MODULE = """
import gymnasium
from mmopd.envs import register_env, text_space


class EchoEnv(gymnasium.Env):
    def __init__(self, word="hi"):
        self.word = word
        self.observation_space = self.action_space = text_space(64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.word, {}

    def step(self, action):
        return "", float(action == self.word), True, False, {}


register_env("{env_id}", EchoEnv)
"""


@pytest.fixture
def user_env(tmp_path, monkeypatch):
    """Writes a module outside the package that registers an env; cleans the registry after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def write(stem: str) -> tuple[str, str]:
        module, env_id = f"{stem}_{uuid.uuid4().hex[:8]}", f"usertest/Echo{len(made)}-v0"
        (tmp_path / f"{module}.py").write_text(_USER_MODULE.replace("{env_id}", env_id))
        made.append((module, env_id))
        return module, env_id

    yield write
    for module, env_id in made:
        sys.modules.pop(module, None)
        gymnasium.registry.pop(env_id, None)


def test_external_env_by_import(user_env) -> None:
    module, env_id = user_env("userenvs_a")
    assert env_id not in list_envs()
    import_env_modules([module])
    assert env_id in list_envs()
    env = make_env(env_id, word="yo")
    assert env.reset(seed=0)[0] == "yo"
    assert env.step("yo")[1] == 1.0
    check_env_quietly(env.unwrapped)
    with warnings.catch_warnings():  # re-importing / reloading the user module is silent
        warnings.simplefilter("error")
        import_env_modules(module)
        importlib.reload(sys.modules[module])


def test_external_env_by_module_syntax(user_env) -> None:
    module, env_id = user_env("userenvs_b")
    env = make_env(f"{module}:{env_id}")
    assert env.reset()[0] == "hi" and env_id in list_envs()
    with pytest.raises(ValueError, match=rf"{env_id}.*'colour'"):
        make_env(env_id, colour="red")


# ----------------------------------------------------------------------------- spaces


def test_text_space_accepts_real_text() -> None:
    space = text_space()
    for text in ["", "47+38=", "Let x ∈ ℝ, √2 ≈ 1.414 → ∑ α²\n\tdone ½ é ≤ ∞", "\\boxed{85}"]:
        assert text in space
    assert "x" * 8193 not in space and "47+38=" in text_space(16, extra_chars="中")
    assert "中文" in text_space(extra_chars="中文")


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_generated_solutions_are_correct(level: int) -> None:
    rng = random.Random(level)
    for _ in range(300):
        p = generate_problem(rng, level)
        expr = p.question.rstrip("=")
        assert p.answer == str(eval(expr))  # noqa: S307 - our own "a+b" strings
        assert int(p.answer) >= 0 and p.solution.endswith(f"\\boxed{{{p.answer}}}")
        assert check_answer(p.solution, p.answer) == (True, p.answer)
        assert check_answer(p.solution, str(int(p.answer) + 1))[0] is False
        if level <= 3:
            assert len(p.solution) < 80


def test_solution_format_example() -> None:
    # The exact wording is what small character-level models learn to imitate.
    from mmopd.envs.math_text import _add_solution, _mul_solution, _sub_solution

    assert _add_solution(47, 38) == ("7+8=15, write 5 carry 1. 4+3+1=8.", 85)
    assert _sub_solution(83, 47) == ("13-7=6, borrow 1. 8-1-4=3.", 36)
    assert _mul_solution(47, 6) == ("7*6=42, write 2 carry 4. 4*6+4=28.", 282)


@pytest.mark.parametrize(("level", "draws"), [(1, 3000), (5, 12000)])
def test_question_space_matches_capacity(level: int, draws: int) -> None:
    # The held-out set is capped at half of _CAPACITY; the count must be right for small levels.
    from mmopd.envs.math_text import _CAPACITY

    rng = random.Random(0)
    seen = {generate_problem(rng, level).question for _ in range(draws)}
    assert len(seen) == _CAPACITY[level]


def test_level_validation() -> None:
    for bad in (0, 6, "2", True):
        with pytest.raises(ValueError, match="level"):
            generate_problem(random.Random(0), bad)
    for kwargs in ({"split": "dev"}, {"test_size": 0}, {"system_prompt": 3}, {"answer_key": ""}):
        with pytest.raises(ValueError):
            MathTextEnv(**kwargs)


def test_seed_determinism() -> None:
    a, b = MathTextEnv(level=3), MathTextEnv(level=3)
    assert a.reset(seed=7) == b.reset(seed=7)
    assert [a.reset()[0] for _ in range(5)] == [b.reset()[0] for _ in range(5)]
    assert len({a.reset(seed=s)[0] for s in range(30)}) > 20
    assert a.reset(seed=7)[1]["problem_id"] == "synthetic-L3-7"


@pytest.mark.parametrize("level", [1, 2, 5])
def test_test_split_fixed_and_disjoint_from_train(level: int) -> None:
    test = MathTextEnv(split="test", level=level)
    again = MathTextEnv(split="test", level=level)
    n = test.num_problems
    assert n == (50 if level == 1 else 200)  # level 1 has only 100 questions: half held out
    questions = [test.reset(options={"index": i})[0] for i in range(n)]
    assert questions == [again.problem(i).question for i in range(n)]
    assert len(set(questions)) == n
    train = MathTextEnv(level=level)
    assert train.num_problems is None
    assert not {train.reset(seed=s)[0] for s in range(1500)} & set(questions)
    with pytest.raises(IndexError, match=f"index {n} out of range"):
        test.reset(options={"index": n})
    with pytest.raises(ValueError, match="index"):
        train.reset(options={"index": 0})


# ----------------------------------------------------------------------------- contract


def test_reset_step_contract() -> None:
    env = make_env(MATH, system_prompt="Be brief.")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("1")
    with warnings.catch_warnings():  # the passive env checker must have nothing to say
        warnings.simplefilter("error")
        obs, info = env.reset(seed=1)
        assert obs == info["messages"][-1]["content"]
        assert info["messages"][0] == {"role": "system", "content": "Be brief."}
        assert set(info) == {"messages", "teacher_messages", "answer", "solution", "problem_id"}
        teacher = info["teacher_messages"]
        assert teacher[0] == info["messages"][0] and info["solution"] in teacher[1]["content"]
        assert teacher[1]["content"].startswith(obs)
        good = env.step(f"so \\boxed{{{info['answer']}}}")
    assert good == ("", 1.0, True, False, {"correct": True, "pred": info["answer"]})
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")  # the episode is over
    env.reset(seed=2)
    assert env.step("no idea")[1:4] == (0.0, True, False)
    env.reset()
    with pytest.raises(TypeError, match="str"):
        env.step(42)
    plain = MathTextEnv().reset(seed=1)[1]["messages"]
    assert [m["role"] for m in plain] == ["user"]


# ----------------------------------------------------------------------------- files


def _jsonl(tmp_path, lines: list[str], name: str = "p.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_loading_and_file_env(tmp_path) -> None:
    rows = [{"q": "1+1=", "a": 2, "s": "\\boxed{2}"}, {"q": "Half of 1?", "a": "\\frac{1}{2}"}]
    path = _jsonl(
        tmp_path, [json.dumps(r) for r in rows] + ["", json.dumps({"q": "x∈ℤ?", "a": 3.0})]
    )
    problems = load_problems(path, question_key="q", answer_key="a", solution_key="s")
    assert [p.answer for p in problems] == ["2", "\\frac{1}{2}", "3"]
    assert [p.id for p in problems] == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:4"]
    assert problems[0].solution == "\\boxed{2}" and problems[1].solution is None
    env = make_env(MATH, source=str(path), question_key="q", answer_key="a", solution_key="s")
    assert env.unwrapped.num_problems == 3
    obs, info = env.reset(options={"index": 1})
    assert obs == "Half of 1?" and "teacher_messages" not in info
    assert env.step("It is \\boxed{0.5}")[1] == 1.0
    assert env.reset(seed=5) == env.reset(seed=5)
    check_env_quietly(env.unwrapped)
    assert env.unwrapped.reset(options={"index": 2})[0] in env.observation_space
    with pytest.raises(IndexError, match="out of range"):
        env.reset(options={"index": 3})


def test_parquet_loading(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["2+2=", "3*3="], "answer": [4, 9]}), path)
    problems = load_problems(str(path))
    assert [(p.question, p.answer, p.id) for p in problems] == [
        ("2+2=", "4", "p.parquet:0"),
        ("3*3=", "9", "p.parquet:1"),
    ]
    bad = tmp_path / "bad.parquet"  # a bad row is skipped, counted and named by its index
    pq.write_table(pa.table({"question": ["a", None], "answer": ["1", "2"]}), bad)
    with pytest.warns(UserWarning, match=r"skipped 1 unusable row\(s\) of 2: bad.parquet:1: "
                      r"missing field 'question'"):
        assert [p.question for p in load_problems(bad)] == ["a"]
    lists = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"question": ["a"], "answer": [[1, 2]]}), lists)
    with pytest.raises(DatasetError, match=r"no usable row of 1(.|\n)*lists.parquet:0: field "
                       r"'answer' must be a non-empty string or a number"):
        load_problems(lists)


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (["{not json"], r"p.jsonl:1: invalid JSON"),
        (['{"question": "q"}'], r"p.jsonl:1: missing field 'answer'"),
        (['{"question": "q", "answer": [1]}'], r"p.jsonl:1: field 'answer' must be a non-empty"),
        (['{"question": "", "answer": "1"}'], r"p.jsonl:1: field 'question' must be a non-"),
        (['{"question": "q", "answer": true}'], r"p.jsonl:1: field 'answer' must be a non-empty"),
        (['["q", "1"]'], r"p.jsonl:1: expected a JSON object"),
        (["", "  "], r"no usable row of 0(.|\n)*the source has no rows"),
    ],
)
def test_malformed_jsonl(tmp_path, lines: list[str], pattern: str) -> None:
    path = _jsonl(tmp_path, lines)
    with pytest.raises(DatasetError, match=pattern):  # every row bad: one error
        load_problems(path)
    with pytest.raises(ValueError, match=pattern):  # same error through the env constructor
        MathTextEnv(source=str(path))
    if lines[0].strip():  # beside a good row, the same line is skipped and reported
        good = _jsonl(tmp_path, ['{"question": "1+1=", "answer": 2}', *lines], "g.jsonl")
        with pytest.warns(UserWarning, match="skipped 1 unusable row"):
            env = MathTextEnv(source=str(good))
        assert env.num_problems == 1 and len(env.row_errors) == 1
        assert env.row_errors[0].startswith("g.jsonl:2: ")


def test_missing_file_and_unknown_folder(tmp_path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="not one written by datasets' save_to_disk"):
        load_problems(tmp_path)


# ----------------------------------------------------------------------------- grading


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("\\boxed{85}", "85", (True, "85")),
        ("first \\boxed{3}, on reflection \\boxed{85}", "85", (True, "85")),
        ("\\boxed{85} then \\boxed{3}", "85", (False, "3")),
        ("\\boxed{\\frac{170}{2}}", "85", (True, "\\frac{170}{2}")),
        ("so the final answer is 85", "85", (True, "85")),
        ("\\boxed{0.5}", "\\frac{1}{2}", (True, "0.5")),
        ("", "85", (False, None)),
        ("\\boxed{}", "85", (False, None)),
        ("\\boxed{85", "85", (False, None)),  # cut off before the closing brace
        ("\\boxed{9^{9^{9^{9}}}}", "85", (False, "9^{9^{9^{9}}}")),  # would hang sympy
        ("}{" * 5000 + "\\boxed{" * 5000, "85", (False, None)),
    ],
)
def test_check_answer_cases(completion: str, gold: str, expected: tuple) -> None:
    assert check_answer(completion, gold) == expected


def test_check_answer_off_main_thread_matches_main() -> None:
    cases = ["\\boxed{85}", "\\boxed{\\frac{170}{2}}", "answer: 85", "\\boxed{84}", "junk {"]
    main = [check_answer(c, "85") for c in cases]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda c: check_answer(c, "85"), cases)) == main


_LATEX_BITS = ["\\boxed{", "{", "}", "\\frac", "^", "$", "=", "85", "x", " ", "\\", "!", "."]


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(st.text(max_size=300), st.lists(st.sampled_from(_LATEX_BITS)).map("".join)),
    st.sampled_from(["85", "\\frac{1}{2}", "-3", "x=2"]),
)
def test_check_answer_never_raises(completion: str, gold: str) -> None:
    correct, pred = check_answer(completion, gold)
    assert isinstance(correct, bool) and (pred is None or isinstance(pred, str))


# ----------------------------------------------------------------------------- careless demos


def _carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def test_careless_solutions_forget_carries_and_box_what_they_computed() -> None:
    rng = random.Random(0)
    assert careless_solution("47+38=", 1.0, rng) == "7+8=15, write 5. 4+3=7. \\boxed{75}"
    assert careless_solution("82-17=", 1.0, rng) == "12-7=5. 8-1=7. \\boxed{75}"
    assert careless_solution("27*3=", 1.0, rng) == "7*3=21, write 1. 2*3=6. \\boxed{61}"
    for level in (2, 3, 4, 5):  # careless=0 is the exact worked solution
        for _ in range(300):
            p = generate_problem(rng, level)
            assert careless_solution(p.question, 0.0, rng) == p.solution
    with pytest.raises(ValueError, match="not a synthetic"):
        careless_solution("what?", 0.5, rng)


def test_careless_env_changes_only_the_demonstration() -> None:
    exact, careless = MathTextEnv(level=2), MathTextEnv(level=2, careless=0.7)
    slipped = carry = 0
    for seed in range(400):
        q, info = exact.reset(seed=seed)
        q2, info2 = careless.reset(seed=seed)
        assert q == q2 and info["answer"] == info2["answer"]
        assert info["teacher_messages"] == info2["teacher_messages"]  # the reference is exact
        assert info2 == careless.reset(seed=seed)[1]  # seeded
        a, b = map(int, q[:-1].split("+"))
        if _carries(a, b):
            carry += 1
            slipped += info2["solution"] != info["solution"]
        else:
            assert info2["solution"] == info["solution"]  # nothing to forget
        assert careless.step(info2["solution"])[1] == float(info2["solution"] == info["solution"])
    assert 0.6 < slipped / carry < 0.8, (slipped, carry)


@pytest.mark.parametrize("kwargs, match", [
    ({"careless": 1.5}, "careless must be a probability"),
    ({"careless": True}, "careless must be a probability"),
    ({"careless": 0.5, "source": "data.jsonl"}, "careless needs source='synthetic'"),
])
def test_careless_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MathTextEnv(**kwargs)
