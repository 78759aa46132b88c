"""Multi-turn tool-use agents: tool-call parsing, tools, the agent loop's masks and budgets, the
ToolMath env and expert demonstrations."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmopd.envs import make_env, text_space
from mmopd.episode import STOP_BUDGET, STOP_EOS, STOP_ERROR, STOP_LENGTH, STOP_MAX_TURNS
from mmopd.rollout.agent_loop import AgentLoop, collect_demonstrations
from mmopd.rollout.render import ChatRenderer
from mmopd.rollout.toolcalls import HermesParser, ReActParser, format_call
from mmopd.tools import (
    ToolDefinitionError,
    ToolNotFoundError,
    ToolResult,
    call_tool,
    make_tool,
    tool,
)
from mmopd.tools.calculator import calculate
from mmopd.tools.search import CorpusError


@tool(register=False)
def echo(text: str, times: int = 1) -> str:
    """Repeat a text.

    Args:
        text: what to repeat
        times: how often
    """
    return text * times


@tool(register=False)
def explode(text: str) -> str:
    """Always fails.

    Args:
        text: ignored
    """
    raise RuntimeError("tool bug")


class ChatEnv(gym.Env):
    """Continues until a reply contains DONE (or `turns` replies); offers echo/explode tools."""

    observation_space = action_space = text_space()

    def __init__(self, turns: int = 100, obs: str = "ok", fail_at: int | None = None) -> None:
        self.turns, self.obs, self.fail_at = turns, obs, fail_at

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.n = 0
        return "start", {"messages": [{"role": "user", "content": f"task {seed}"}],
                         "tools": [echo, explode]}

    def step(self, action):
        self.n += 1
        if self.fail_at == self.n:
            raise RuntimeError("env broke")
        done = "DONE" in action or self.n >= self.turns
        return self.obs, float(done), done, False, {"correct": done}


def _scripted(tokenizer, renderer, replies_by_slot, stop_reason=STOP_EOS):
    """generate() for AgentLoop.run: each slot's next scripted reply, ended with <|im_end|>."""
    end = renderer.turn_closer[:1]
    sent: dict[int, list[list[int]]] = {}

    def generate(slots):
        out = []
        for s in slots:
            queue = replies_by_slot[id(s)]
            text = queue.pop(0) if queue else "DONE"
            ids = tokenizer.encode(text, add_special_tokens=False) + end
            sent.setdefault(id(s), []).append(ids)
            out.append((ids, [-0.5] * len(ids), stop_reason))
        return out

    return generate, sent


def _run(tokenizer, scripts, env_kwargs=None, **loop_kwargs):
    r = ChatRenderer(tokenizer)
    loop = AgentLoop(r, **loop_kwargs)
    slots = loop.start([ChatEnv(**(env_kwargs or {})) for _ in scripts],
                       [{"seed": i} for i in range(len(scripts))])
    gen, sent = _scripted(tokenizer, r, {id(s): list(t) for s, t in zip(slots, scripts)})
    eps = loop.run(slots, gen)
    return eps, [sent.get(id(s), []) for s in slots], slots


# ----------------------------------------------------------------------------- parser


def test_hermes_parser_reads_calls_and_reports_malformed_ones():
    p = HermesParser()
    ok = p.parse('think <tool_call>\n{"name": "calc", "arguments": {"x": 1}}\n</tool_call>'
                 '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    assert [(c.name, c.arguments) for c in ok.calls] == [("calc", {"x": 1}), ("b", {"y": 2})]
    assert not ok.errors and ok.wants_tools
    assert not p.parse("plain answer 42").wants_tools
    bad = p.parse('<tool_call>{"name": "calc", "arguments": {</tool_call>'
                  "<tool_call>[1, 2]</tool_call><tool_call>{\"name\": \"c\"")
    assert bad.calls == [] and len(bad.errors) == 3
    assert "not valid JSON" in bad.errors[0] and '"name"' in bad.errors[1]
    assert "not closed" in bad.errors[2]


@given(st.text(max_size=200))
def test_parser_never_raises_on_garbage(text):
    for t in (text, "<tool_call>" + text, "<tool_call>" + text + "</tool_call>"):
        HermesParser().parse(t)
    for t in (text, "Action: " + text, "Action: calc[" + text):
        ReActParser().parse(t)


def test_react_parser_and_format_round_trip():
    p = ReActParser()
    call = format_call("calculator", {"expression": "37*48"}, "react")
    assert call == "Action: calculator[37*48]"
    got = p.parse(f"I will compute.\n{call}\nAction: search[a [b] c]")
    assert [(c.name, c.arguments) for c in got.calls] == [("calculator", "37*48"),
                                                          ("search", "a [b] c")]
    assert not got.errors
    assert not p.parse("Answer: 1776").wants_tools
    bad = p.parse("Action: calculator 37*48")
    assert bad.calls == [] and "Action: name[input]" in bad.errors[0]
    with pytest.raises(ValueError, match="exactly one argument"):
        format_call("echo", {"text": "a", "times": 2}, "react")


def test_a_bare_text_argument_fills_the_only_required_string_argument():
    calc = make_tool("calculator")
    assert call_tool(calc, "6*7").text == "42"
    res = call_tool(echo, "hi")  # echo's one required argument is the string "text"
    assert not res.error and res.text == "hi"


# ----------------------------------------------------------------------------- tools


def test_tool_decorator_builds_schema_and_validates_arguments():
    assert echo.parameters["required"] == ["text"]
    assert echo.parameters["properties"]["times"]["type"] == "integer"
    assert call_tool(echo, {"text": "ab", "times": 2}) == ToolResult("abab")
    for args, msg in [({"times": 2}, "missing required"), ({"text": 3}, "type string"),
                      ({"text": "a", "times": True}, "type integer"),
                      ({"text": "a", "tmes": 2}, "did you mean 'times'"), ([1], "JSON object")]:
        res = call_tool(echo, args)
        assert res.error and msg in res.text, (args, res.text)
    res = call_tool(explode, {"text": "x"})
    assert res.error and "RuntimeError: tool bug" in res.text
    huge = call_tool(echo, {"text": "x" * 100, "times": 1000}, max_chars=500)
    assert len(huge.text) < 600 and "more characters cut" in huge.text

    with pytest.raises(ToolDefinitionError, match="Args"):
        @tool(register=False)
        def undocumented(x: int) -> int:
            """No argument docs."""
            return x


def test_registry_names_builtins_and_suggests():
    assert make_tool("calculator").name == "calculator"
    with pytest.raises(ToolNotFoundError, match="did you mean 'calculator'"):
        make_tool("calculater")


@pytest.mark.parametrize("expr,value", [
    ("347*29", "10063"), ("(37*48) - 125/5", "1751"), ("2^10", "1024"), ("7/2", "3.5"),
    ("sqrt(16) + max(2, 3)", "7"), ("-3 % 5", "2"), ("10**20", "100000000000000000000"),
    ("086*2", "172"), ("10.05*2", "20.1"), ("0.5+0", "0.5"), ("1e05", "100000"),
])
def test_calculator_values(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", [
    "__import__('os').system('ls')", "open('/etc/passwd')", "9**9**9", "(10**1000)**1000",
    "factorial(100000)", "1/0", "x + 1", "[1] * 10**9", "lambda: 1", "1 +", "a.b",
])
def test_calculator_refuses_without_evaluating(expr):
    res = make_tool("calculator").run({"expression": expr})
    assert res.error and res.text.startswith("Error:")


def test_calculator_parses_model_text_without_warnings():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # ("error" would turn them into SyntaxErrors instead)
        for expr in ('"\\d"', "2(3)", "(1)(2)", "1 is 1"):
            res = make_tool("calculator").run({"expression": expr})
            assert res.error and res.text.startswith("Error:")
    assert [str(w.message) for w in caught] == []


def test_search_tool_over_folder_and_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "paris.txt").write_text("Paris is the capital of France.")
    (tmp_path / "docs" / "rome.md").write_text("Rome is the capital of Italy.")
    t = make_tool("search", corpus=tmp_path / "docs")
    assert call_tool(t, {"query": "Italy capital", "k": 1}).text.startswith("[1] rome")
    rows = tmp_path / "c.jsonl"
    rows.write_text(json.dumps({"id": "a", "text": "gradient descent"}) + "\n")
    assert "gradient" in call_tool(make_tool("search", corpus=rows), {"query": "gradient"}).text
    assert call_tool(make_tool("search", corpus=rows), {"query": "zebra"}).text == "No results."
    rows.write_text('{"id": 1}\n')
    res = call_tool(make_tool("search", corpus=rows), {"query": "x"})
    assert res.error and "c.jsonl:1" in res.text
    with pytest.raises(CorpusError):
        make_tool("search", corpus=tmp_path / "missing").search("x")


# ----------------------------------------------------------------------------- agent loop

_REPLIES = st.one_of(
    st.sampled_from(["DONE", "thinking", "The answer is 4."]),
    st.builds(lambda t: format_call("echo", {"text": t}), st.text("abc xyz!", max_size=8)),
    st.just(format_call("explode", {"text": "x"})),
    st.just(format_call("nope", {})),
    st.just("<tool_call>{broken json</tool_call>"),
    st.just('<tool_call>{"name": "echo", "arguments": {"text": 5}}</tool_call>'),
    st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=12),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts=st.lists(st.lists(_REPLIES, max_size=6), min_size=1, max_size=3),
       obs=st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=10),
       max_turns=st.integers(1, 7))
def test_masks_cover_exactly_the_student_tokens(tokenizer, scripts, obs, max_turns):
    """Across random multi-turn interactions with tool calls, failures and observations:
    loss_mask is 1 exactly on the sampled tokens, step_index numbers the turns, and the episode
    is token for token what the chat template renders for the same conversation."""
    eps, sent, slots = _run(tokenizer, scripts, {"obs": obs}, max_turns=max_turns)
    r = ChatRenderer(tokenizer)
    for ep, turns, slot in zip(eps, sent, slots):
        student = [t for t, m in zip(ep.input_ids, ep.loss_mask) if m]
        assert student == [t for turn in turns for t in turn]
        steps = [k for k, m in zip(ep.step_index, ep.loss_mask) if m]
        assert steps == [k for k, turn in enumerate(turns) for _ in turn]
        assert all(k == -1 for k, m in zip(ep.step_index, ep.loss_mask) if not m)
        assert ep.input_ids[: ep.prompt_len] == r.prompt(slot.messages[:1])
        assert len(turns) <= max_turns
        # Incremental rendering equals rendering the whole conversation at once.
        full = r.full(slot.messages)
        if ep.stop_reason in (STOP_EOS, STOP_MAX_TURNS):
            assert full[: len(ep.input_ids)] == ep.input_ids or ep.input_ids[: len(full)] == full
        logp = [x for x, m in zip(ep.sampled_logprobs, ep.loss_mask) if m]
        assert logp == [-0.5] * len(student)


def test_tool_calls_run_and_results_come_back_as_tool_messages(tokenizer):
    calls = [format_call("echo", {"text": "hi", "times": 2}), format_call("explode", {"text": ""}),
             format_call("nope", {}), "<tool_call>{bad</tool_call>", "DONE"]
    (ep,), _, (slot,) = _run(tokenizer, [calls])
    tool_msgs = [m["content"] for m in slot.messages if m["role"] == "tool"]
    assert tool_msgs[0] == "hihi"
    assert "RuntimeError: tool bug" in tool_msgs[1]
    assert "unknown tool 'nope'; available: echo, explode" in tool_msgs[2]
    assert "not valid JSON" in tool_msgs[3]
    assert ep.metadata["tool_calls"] == 3 and ep.metadata["tool_errors"] == 3
    assert ep.metadata["parse_errors"] == 1
    assert ep.reward == 1.0 and ep.stop_reason == STOP_EOS and ep.metadata["correct"]
    assert max(ep.step_index) == 4  # five assistant turns


def test_budgets_and_failures_end_episodes_with_stop_reasons(tokenizer):
    (ep,), _, _ = _run(tokenizer, [["a", "b", "c"]], max_turns=2)
    assert ep.stop_reason == STOP_MAX_TURNS and max(ep.step_index) == 1
    (ep,), sent, _ = _run(tokenizer, [["a" * 30, "b" * 30]], max_episode_tokens=60)
    assert ep.stop_reason == STOP_BUDGET and len(ep.input_ids) <= 60
    (ep,), _, _ = _run(tokenizer, [["a", "b"]], {"fail_at": 2})
    assert ep.stop_reason == STOP_ERROR and "env broke" in ep.metadata["error"]
    # a truncated turn (per-turn budget) is still answered; the episode goes on
    r = ChatRenderer(tokenizer)
    loop = AgentLoop(r)
    slots = loop.start([ChatEnv()], [{"seed": 0}])
    gen, _ = _scripted(tokenizer, r, {id(slots[0]): ["cut off", "DONE"]}, STOP_LENGTH)
    (ep,) = loop.run(slots, gen)
    assert ep.reward == 1.0 and max(ep.step_index) == 1


# ----------------------------------------------------------------------------- ToolMath


def test_toolmath_env_checks_and_demonstrations_solve_it(tokenizer):
    from gymnasium.utils.env_checker import check_env

    env = make_env("mmopd/ToolMath-v0", level=2)
    check_env(env.unwrapped, skip_render_check=True)
    test = make_env("mmopd/ToolMath-v0", level=2, split="test", test_size=20)
    q0 = test.reset(options={"index": 3})[0]
    assert q0 == test.reset(options={"index": 3})[0]
    held_out = {test.reset(options={"index": i})[0] for i in range(20)}
    assert not held_out & {env.reset(seed=s)[0] for s in range(300)}
    r = ChatRenderer(tokenizer)
    for tools in (["calculator"], ["python"]):
        envs = [make_env("mmopd/ToolMath-v0", level=3, tools=tools) for _ in range(4)]
        eps = collect_demonstrations(envs, [{"seed": s} for s in range(4)], r)
        assert all(e.metadata["correct"] and e.metadata["tool_calls"] == 1 for e in eps), \
            [e.metadata["messages"] for e in eps]
    assert env.step("Answer: 1")[1] == 0.0
    with pytest.raises(ValueError, match="tools"):
        make_env("mmopd/ToolMath-v0", tools=["shell"])
    with pytest.raises(ValueError, match="call_format"):
        make_env("mmopd/ToolMath-v0", call_format="json")
    with pytest.raises(ValueError, match="careless"):
        make_env("mmopd/ToolMath-v0", careless=-0.1)


def test_toolmath_react_calls_and_careless_demonstrations(tokenizer):
    """The short call format runs through the agent loop (the env names its parser), and a
    careless demonstrator answers a seeded share of problems from its head, without the tool."""
    r = ChatRenderer(tokenizer)
    n = 40
    envs = [make_env("mmopd/ToolMath-v0", level=2, call_format="react", careless=0.5)
            for _ in range(n)]
    eps = collect_demonstrations(envs, [{"seed": s} for s in range(n)], r)
    called = [e for e in eps if e.metadata.get("tool_calls")]
    assert all(e.metadata["correct"] and e.metadata["tool_calls"] == 1 for e in called)
    assert all("Action: calculator[" in e.metadata["completions"][0] for e in called)
    assert all(max(e.step_index) == 1 for e in called)  # two assistant turns
    from_head = [e for e in eps if not e.metadata.get("tool_calls")]
    assert all(max(e.step_index) == 0 and e.metadata["completions"][0].startswith("Guess: ")
               for e in from_head)
    assert 10 < len(from_head) < 30
    again = collect_demonstrations(envs, [{"seed": s} for s in range(n)], r)
    assert [e.input_ids for e in again] == [e.input_ids for e in eps]


# ----------------------------------------------------------------------------- SOD, TCOD, training


def test_sod_weights_by_hand():
    import torch

    from mmopd.objectives import sod_weights

    # episode 0: d = 0.5 then 0.1 -> w2 = min(0.5/0.1, 1.2) = 1.2; episode 1: d = 0.2 then 2.0
    # -> w2 = 0.1; the first turn of each episode has weight 1
    lo = torch.tensor([-1.0, -1.0, -2.0, -2.0, -1.0, -3.0])
    lt = torch.tensor([-1.5, -1.5, -2.1, -2.1, -1.2, -1.0])
    w, m = sod_weights(lo, lt, torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 1]),
                       delta=0.2, eps=1e-6)
    assert w.tolist() == pytest.approx([1, 1, 1.2, 1.2, 1, 0.1], rel=1e-4)
    assert m["sod/d_mean_turn1"] == pytest.approx(1.05, rel=1e-4)
    assert m["sod/w_min_turn1"] == pytest.approx(0.1, rel=1e-4)
    assert m["sod/w_max_turn0"] == 1.0


def test_make_plan_composes_sod_and_outcome_advantage():
    import torch

    from mmopd.config import ObjectiveConfig
    from mmopd.objectives import OBJECTIVES, TokenBatch, grpo_advantages, make_plan

    tb = TokenBatch(episode_N=torch.tensor([0, 0, 1, 1]), step_N=torch.tensor([0, 1, 0, 1]),
                    logp_old_N=torch.tensor([-1.0, -1.0, -1.0, -1.0]),
                    logp_teacher_N=torch.tensor([-2.0, -1.5, -1.1, -3.0]),
                    entropy_N=torch.ones(4), reward_E=torch.tensor([1.0, 0.0]),
                    group_E=torch.tensor([0, 0]))
    plain = make_plan(OBJECTIVES["opd"], tb, 0, 10, ObjectiveConfig(name="opd"))
    assert plain.advantage_N.tolist() == pytest.approx([-1.0, -0.5, -0.1, -2.0])
    sod = make_plan(OBJECTIVES["opd"], tb, 0, 10, ObjectiveConfig(name="opd",
                                                                  step_weighting="sod"))
    # ep 0: d = 1.0, 0.5 -> w = 1.2 (capped); ep 1: d = 0.1, 2.0 -> w = 0.05
    assert sod.advantage_N.tolist() == pytest.approx([-1.0, -0.6, -0.1, -0.1], rel=1e-4)
    both = make_plan(OBJECTIVES["opd"], tb, 0, 10,
                     ObjectiveConfig(name="opd", step_weighting="sod", outcome_coef=0.5))
    adv_E = grpo_advantages(tb.reward_E, tb.group_E)
    assert both.advantage_N.tolist() == pytest.approx(
        (sod.advantage_N + 0.5 * adv_E[tb.episode_N]).tolist(), rel=1e-4)
    assert "sod/w_mean_turn1" in both.metrics


def test_tcod_turn_limit():
    from mmopd.config import RolloutConfig
    from mmopd.training.loop import _turn_limit

    r = RolloutConfig(max_turns=4, curriculum="tcod", tcod_c=3)
    assert [_turn_limit(r, k) for k in (0, 2, 3, 6, 9, 30)] == [1, 1, 2, 3, 4, 4]
    assert _turn_limit(RolloutConfig(max_turns=4), 0) == 4


@pytest.fixture
def chat_env_overrides(tiny_overrides):
    from mmopd.envs import register_env

    register_env("test/Chat-v0", ChatEnv)
    return tiny_overrides + ['env={"id": "test/Chat-v0", "kwargs": {"turns": 3}, '
                             '"eval_kwargs": {}}', "rollout.max_turns=3", "trainer.steps=4"]


@pytest.mark.parametrize("extra", [
    ["objective.name=reopold", "objective.step_weighting=sod", "objective.outcome_coef=0.5",
     "rollout.curriculum=tcod", "rollout.tcod_c=2"],
    ["objective.name=rkl", "objective.step_weighting=sod", "rollout.max_episode_tokens=60"],
])
def test_multi_turn_training_with_sod(chat_env_overrides, extra):
    from pathlib import Path

    from mmopd.config import TrainConfig, load_config
    from mmopd.training.loop import train

    res = train(load_config(TrainConfig, None, chat_env_overrides + extra))
    log = Path(res["run_dir"]) / "metrics.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rows) == 4 and all(r["grad_norm"] > 0 for r in rows)
    assert all(k in rows[0] for k in ("sod/w_mean_turn0", "tool_calls", "stop_max_turns_frac"))
    if "rollout.curriculum=tcod" in extra:  # 1 turn for steps 1-2, then 2 turns
        assert [r["turns"] for r in rows] == [1, 1, 2, 2]
        assert "sod/w_mean_turn1" in rows[2] and "sod/w_mean_turn1" not in rows[0]
    else:
        assert all(r["stop_token_budget_frac"] > 0 for r in rows)


def test_config_rejects_impossible_agent_options(tiny_overrides):
    from mmopd.config import ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match="outcome_coef"):
        load_config(TrainConfig, None, tiny_overrides + ["objective.name=rkl",
                                                          "objective.outcome_coef=1"])
    with pytest.raises(ConfigError, match="step_weighting"):
        load_config(TrainConfig, None, tiny_overrides + ["objective.name=grpo",
                                                          "objective.step_weighting=sod"])
