"""Tests for mmopd/GymText-v0: gymnasium games as multi-turn text envs (parsing, invalid moves,
experts, held-out splits, and the ready configs in configs/gym)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import gymnasium
import pytest
from conftest import check_env_quietly
from hypothesis import given, settings
from hypothesis import strategies as st

from mmopd.config import SFTConfig, TrainConfig, load_config
from mmopd.envs import make_env
from mmopd.envs.gym_games import _blackjack_text
from mmopd.envs.gym_text import (
    GymTextEnv,
    blackjack_basic_strategy,
    parse_action,
    value_iteration,
)

GYM = "mmopd/GymText-v0"
NOT_SLIPPERY = {"is_slippery": False}
_GYM_CONFIGS = Path(__file__).parent.parent / "configs" / "gym"
CONFIGS = sorted(p for p in _GYM_CONFIGS.glob("*.yaml") if "sft" not in p.name)


def _play_expert(env: gymnasium.Env, **reset_kwargs) -> tuple[bool, list[str], int]:
    """(won, observations, moves) of one episode played by the env's expert."""
    obs, info = env.reset(**reset_kwargs)
    messages, seen, done = list(info["messages"]), [obs], False
    while not done:
        reply = env.unwrapped.expert_reply(messages)
        obs, _, terminated, truncated, info = env.step(reply)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": obs}]
        seen.append(obs)
        done = terminated or truncated
    return info["correct"], seen, info["steps"]


# ----------------------------------------------------------------------------- gymnasium checks


@pytest.mark.parametrize(
    "kwargs",
    [
        {"game": "FrozenLake-v1", "game_kwargs": NOT_SLIPPERY},
        {"game": "FrozenLake-v1", "random_map_size": 4, "split": "test", "test_size": 5},
        {"game": "Taxi-v4"},
        {"game": "CliffWalking-v1", "max_steps": 20},
        {"game": "Blackjack-v1", "on_invalid": "retry"},
    ],
    ids=["frozenlake", "frozenlake-random-test", "taxi", "cliffwalking", "blackjack"],
)
def test_check_env(kwargs: dict) -> None:
    env = make_env(GYM, **kwargs)
    check_env_quietly(env)
    check_env_quietly(env.unwrapped)


# ----------------------------------------------------------------------------- text round trips


def test_frozenlake_round_trip() -> None:
    env = make_env(GYM, game="FrozenLake-v1", game_kwargs=NOT_SLIPPERY)
    with warnings.catch_warnings():  # the passive env checker must have nothing to say
        warnings.simplefilter("error")
        obs, info = env.reset(seed=0)
    assert obs == "@FFF\nFHFH\nFFFH\nHFFG"
    assert [m["role"] for m in info["messages"]] == ["system", "user"]
    system = info["messages"][0]["content"]
    assert "left, down, right, up" in system and "@ is you" in system
    assert info["messages"][1]["content"] == obs and info["problem_id"] == "FrozenLake-v1:seed-0"
    obs, reward, terminated, truncated, info = env.step("Action: RIGHT")
    assert obs == "S@FF\nFHFH\nFFFH\nHFFG"
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info == {
        "action": "right",
        "invalid_action": False,
        "invalid_actions": 0,
        "steps": 1,
        "game_return": 0.0,
    }
    for reply in ["right", "down", "2nd thought: down", "down", "right"]:
        obs, reward, terminated, truncated, info = env.step(reply)
    assert (obs, reward, terminated, truncated, info["correct"]) == ("", 1.0, True, False, True)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("left")  # the episode is over
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step("1")  # an action index: down
    assert obs.startswith("SFFF\n@HFH")
    assert env.step("right")[1:4] == (0.0, True, False)  # into the hole: lost
    env.reset()
    with pytest.raises(TypeError, match="str"):
        env.step(1)


def test_taxi_and_cliff_and_blackjack_render() -> None:
    taxi = GymTextEnv("Taxi-v4")
    obs, _ = taxi.reset(seed=1)
    assert obs.splitlines()[-1] == "Passenger at B, destination R." and obs.count("T") == 1
    assert "\x1b" not in obs and "+" not in obs
    for move in ["east", "south", "south", "pickup"]:
        obs = taxi.step(move)[0]
    assert obs.endswith("Passenger in taxi, destination R.") and "|Y| : |T: |" in obs
    cliff = GymTextEnv("CliffWalking-v1")
    assert cliff.reset(seed=0)[0] == "oooooooooooo\n" * 3 + "@CCCCCCCCCCT"
    obs, _, terminated, _, info = cliff.step("right")  # into the cliff: back to the start
    assert not terminated and obs.endswith("@CCCCCCCCCCT") and info["game_return"] == -100.0
    blackjack = GymTextEnv("Blackjack-v1")
    assert re.fullmatch(
        r"Your sum: \d+, dealer shows: (A|\d+), usable ace: (yes|no)", blackjack.reset(seed=0)[0]
    )
    ace = _blackjack_text(blackjack, (14, 1, 1))
    assert ace == "Your sum: 14, dealer shows: A, usable ace: yes"
    assert blackjack.step("stick")[2] is True


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("right", 2),
        ("RIGHT", 2),
        ("  Up.\n", 3),
        ("Action: left", 0),
        ("not left, so down", 1),
        ("2", 2),
        (" 3 ", 3),
        ("4", None),
        ("-1", None),
        ("2 and 3", None),
        ("leftover", None),
        ("move_left", None),
        ("", None),
        ("¿izquierda?", None),
        ("ｒｉｇｈｔ", None),
        ("→ right ←", 2),
        ("déjà vu: up", 3),
        ("\x00\ud7ff", None),
        ("ſtop, ſo up", 3),  # unicode case folding matches, and still maps to an action
        ("\u212aeft", None),
        ("LEFT\u0130", None),
    ],
)
def test_parse_action(reply: str, expected: int | None) -> None:
    assert parse_action(reply, ("left", "down", "right", "up")) == expected


def test_parse_action_prefers_longest_name() -> None:
    actions = ("go", "go on", "stop")
    assert parse_action("go on", actions) == 1 and parse_action("go, on", actions) == 0


# ----------------------------------------------------------------------------- invalid moves


@pytest.mark.parametrize(
    "reply", ["", "   ", "I don't know", "🙂 λ→∞ 中文", "x" * 20_000, "\x1b[41m", "6", "lefty"]
)
def test_invalid_reply_ends_the_episode(reply: str) -> None:
    env = make_env(GYM, game="Taxi-v4")
    env.reset(seed=4)
    obs, reward, terminated, truncated, info = env.step(reply)
    assert (obs, reward, terminated, truncated) == ("", 0.0, True, False)
    assert info["invalid_action"] and info["correct"] is False and info["action"] is None
    with pytest.raises(RuntimeError, match="reset"):
        env.step("north")


def test_invalid_reply_retry_mode_and_max_steps() -> None:
    env = GymTextEnv("FrozenLake-v1", NOT_SLIPPERY, on_invalid="retry", max_steps=3)
    board, _ = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("hmm")
    assert obs == "Invalid reply. Reply with one action: left, down, right, up.\n" + board
    assert (reward, terminated, truncated, info["invalid_actions"]) == (0.0, False, False, 1)
    assert env.step("right")[0] == "S@FF\nFHFH\nFFFH\nHFFG"
    obs, reward, terminated, truncated, info = env.step("???")
    assert (obs, terminated, truncated, info["correct"], info["steps"]) == (
        "",
        False,
        True,
        False,
        3,
    )


def test_game_time_limit_passes_through() -> None:
    env = GymTextEnv("FrozenLake-v1", NOT_SLIPPERY)  # FrozenLake-v1 stops after 100 moves
    env.reset(seed=0)
    for _ in range(99):
        assert env.step("left")[2:4] == (False, False)  # bumping into the wall: no move
    _, reward, terminated, truncated, info = env.step("left")
    assert (reward, terminated, truncated, info["correct"]) == (0.0, False, True, False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=6))
def test_any_reply_text_is_data(replies: list[str]) -> None:
    env = GymTextEnv("Taxi-v4", on_invalid="retry", max_steps=6)
    obs, _ = env.reset(seed=0)
    for reply in replies:
        obs, reward, terminated, truncated, info = env.step(reply)
        assert obs in env.observation_space and reward in (0.0, 1.0)
        if terminated or truncated:
            assert isinstance(info["correct"], bool)
            break


# ----------------------------------------------------------------------------- experts


def test_value_iteration_prefers_the_shortest_path() -> None:
    # A corridor 0-1-2-3 with the goal at 3, reached from 2 (right) and, slower, by a detour.
    table = {
        s: {
            0: [(1.0, max(s - 1, 0), 0.0, False)],
            1: [(1.0, s + 1, float(s + 1 == 3), s + 1 == 3)] if s < 3 else [(1.0, 3, 0, True)],
        }
        for s in range(4)
    }
    assert value_iteration(table)[:3].tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    ("game", "kwargs", "seeds"),
    [
        ("FrozenLake-v1", {"game_kwargs": NOT_SLIPPERY}, 2),
        ("FrozenLake8x8-v1", {"game_kwargs": NOT_SLIPPERY}, 2),
        ("FrozenLake-v1", {"game_kwargs": NOT_SLIPPERY, "random_map_size": 4}, 30),
        ("FrozenLake-v1", {"game_kwargs": NOT_SLIPPERY, "random_map_size": 8, "test_size": 5}, 15),
        ("Taxi-v4", {}, 30),
        ("CliffWalking-v1", {"max_steps": 30}, 3),
    ],
)
def test_expert_always_wins(game: str, kwargs: dict, seeds: int) -> None:
    env = make_env(GYM, game=game, **kwargs)
    results = [_play_expert(env, seed=s) for s in range(seeds)]
    assert all(won for won, _, _ in results)
    if game == "CliffWalking-v1":
        assert results[0][2] == 13  # right along the cliff edge: the shortest path


def test_blackjack_basic_strategy_wins_often() -> None:
    env = GymTextEnv("Blackjack-v1")
    wins = sum(_play_expert(env, seed=s)[0] for s in range(2000))
    assert wins / 2000 > 0.40  # about 43%; always sticking wins 39%, random play 28%
    assert blackjack_basic_strategy((16, 10, 0)) == 1 and blackjack_basic_strategy((16, 6, 0)) == 0
    assert blackjack_basic_strategy((18, 9, 1)) == 1 and blackjack_basic_strategy((18, 7, 1)) == 0
    env.reset(seed=1)
    assert env.expert_reply([]) in ("stick", "hit")


def test_expert_needs_a_running_episode() -> None:
    env = GymTextEnv("Taxi-v4")
    with pytest.raises(RuntimeError, match="reset"):
        env.expert_reply([])


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("game", "kwargs"),
    [
        ("FrozenLake-v1", {"game_kwargs": NOT_SLIPPERY, "random_map_size": 4}),
        ("Taxi-v4", {}),
        ("Blackjack-v1", {}),
    ],
)
def test_held_out_episodes_are_fixed(game: str, kwargs: dict) -> None:
    test = GymTextEnv(game, split="test", test_size=20, **kwargs)
    again = GymTextEnv(game, split="test", test_size=20, **kwargs)
    assert test.num_problems == 20 and GymTextEnv(game, **kwargs).num_problems is None
    for i in (0, 7, 19):
        assert _play_expert(test, options={"index": i}) == _play_expert(again, options={"index": i})
    assert test.reset(options={"index": 3})[1]["problem_id"] == f"{game}:test-3"
    assert len({test.reset(options={"index": i})[0] for i in range(20)}) > 5
    with pytest.raises(IndexError, match="index 20 out of range"):
        test.reset(options={"index": 20})
    with pytest.raises(ValueError, match="split='test'"):
        GymTextEnv(game, **kwargs).reset(options={"index": 0})


def test_train_seeds_are_deterministic_and_disjoint_from_test() -> None:
    kwargs = {"game_kwargs": NOT_SLIPPERY, "random_map_size": 4, "test_size": 100}
    train, other = GymTextEnv("FrozenLake-v1", **kwargs), GymTextEnv("FrozenLake-v1", **kwargs)
    assert train.reset(seed=11) == other.reset(seed=11)
    assert [train.reset()[0] for _ in range(5)] == [other.reset()[0] for _ in range(5)]
    test = GymTextEnv("FrozenLake-v1", split="test", **kwargs)
    test_maps = {test.reset(options={"index": i})[0] for i in range(100)}
    assert len(test_maps) == 100  # distinct held-out maps
    train_maps = {train.reset(seed=s)[0] for s in range(400)}
    assert len(train_maps) > 100 and not train_maps & test_maps
    # Fixed-map games differ only by seed: train seeds stay below the held-out seed range.
    from mmopd.envs.gym_text import _TEST_SEED_BASE

    assert train._episode(2**64 + 5, None)[0] == 5 and test._episode(None, 0)[0] == (
        _TEST_SEED_BASE
    )


# ----------------------------------------------------------------------------- user games, errors


class _Corridor(gymnasium.Env):
    """A five-cell corridor with an ansi rendering and a transition table, like the toy texts."""

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self.observation_space, self.action_space = (
            gymnasium.spaces.Discrete(5),
            gymnasium.spaces.Discrete(2),
        )
        self.P = {
            s: {
                0: [(1.0, max(s - 1, 0), 0.0, False)],
                1: [(1.0, min(s + 1, 4), float(s == 3), s == 3)],
            }
            for s in range(5)
        }
        self.s = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s = 0
        return 0, {}

    def step(self, action):
        _, self.s, reward, done = self.P[self.s][int(action)][0]
        return self.s, reward, done, False, {}

    def render(self):
        return "".join("\x1b[44mA\x1b[0m" if i == self.s else "." for i in range(5)) + "\n"


@pytest.fixture
def corridor_id():
    env_id = "gymtexttest/Corridor-v0"
    gymnasium.register(env_id, entry_point=_Corridor)
    yield env_id
    gymnasium.registry.pop(env_id, None)


def test_user_game_with_action_names(corridor_id: str) -> None:
    with pytest.raises(ValueError, match=r"no built-in adapter.*actions=\["):
        GymTextEnv(corridor_id)
    env = GymTextEnv(corridor_id, actions=["Back", "Forward"], rules="Reach the end.")
    obs, info = env.reset(seed=0)
    assert obs == "A...." and info["messages"][0]["content"] == (
        "Reach the end. Reply with one action: Back, Forward."
    )
    assert _play_expert(env, seed=0)[0]
    env.reset(seed=0)
    assert env.expert_reply() == "Forward"
    check_env_quietly(env)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"game": "NoSuchGame-v1"}, "NoSuchGame"),
        ({"game": "Taxi-v3"}, "Taxi-v4"),
        ({"game": "CartPole-v1"}, "actions="),
        ({"game": "Taxi-v4", "random_map_size": 4}, "FrozenLake"),
        ({"random_map_size": 2}, "random_map_size"),
        ({"random_map_size": 4, "game_kwargs": {"map_name": "8x8"}}, "map_name"),
        ({"game": "Taxi-v4", "actions": ["a", "b"]}, "does not match"),
        ({"actions": ["a", "A", "b", "c"]}, "distinct"),
        ({"split": "dev"}, "split"),
        ({"test_size": 0}, "test_size"),
        ({"max_steps": 0}, "max_steps"),
        ({"on_invalid": "ignore"}, "on_invalid"),
        ({"game_kwargs": {"render_mode": "human"}}, "render_mode"),
        ({"game_kwargs": {"is_slipery": False}}, "is_slipery"),
    ],
)
def test_bad_kwargs_say_what_is_wrong(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_env(GYM, **kwargs)


# ----------------------------------------------------------------------------- configs


def test_gym_configs_exist() -> None:
    assert {p.stem for p in CONFIGS} >= {"frozenlake", "taxi", "cliffwalking", "blackjack"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_gym_config_loads_and_makes_its_envs(path: Path) -> None:
    cfg = load_config(TrainConfig, path)
    assert cfg.env.id == GYM and cfg.objective.name == "reopold" and cfg.model.tiny is not None
    train = make_env(cfg.env.id, **cfg.env.kwargs)
    held_out = make_env(cfg.env.id, **{**cfg.env.kwargs, **cfg.env.eval_kwargs})
    assert held_out.unwrapped.num_problems >= cfg.eval.num_problems
    won, observations, moves = _play_expert(train, seed=0)
    assert won or "Blackjack" in cfg.env.kwargs["game"]  # the one game even an expert loses
    assert moves <= cfg.rollout.max_turns  # the expert's episode fits the turn budget
    longest = max(map(len, train.unwrapped.adapter.actions))
    assert longest + 1 <= cfg.rollout.max_new_tokens  # a bare action name and the end token
    # A whole episode of max_turns fits the tiny model's context (character tokens; the chat
    # template adds ~10 tokens per message, ~25 per turn).
    prompt = len(train.unwrapped.system_prompt) + len(observations[0]) + 35
    per_turn = max(map(len, observations)) + cfg.rollout.max_new_tokens + 25
    assert prompt + cfg.rollout.max_turns * per_turn <= cfg.model.tiny.max_position_embeddings


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_gym_teacher_sft_config_matches_its_train_config(path: Path) -> None:
    from mmopd.rollout.render import ChatRenderer
    from mmopd.tokenizer import build_char_tokenizer
    from mmopd.training.sft import build_examples

    train = load_config(TrainConfig, path)
    sft = load_config(SFTConfig, path.with_name(f"{path.stem}_teacher_sft.yaml"))
    assert sft.output_dir == train.teacher.model.path and sft.data.env == train.env
    assert sft.max_turns == train.rollout.max_turns
    assert sft.model.tiny.max_position_embeddings == train.model.tiny.max_position_embeddings
    # The SFT builder plays whole expert episodes through expert_reply; the loss is on replies.
    sft.data.num_examples = 2
    renderer = ChatRenderer(build_char_tokenizer())
    actions = make_env(train.env.id, **train.env.kwargs).unwrapped.adapter.actions
    for ids, mask, _ in build_examples(sft, renderer):
        replies = renderer.tokenizer.decode([i for i, m in zip(ids, mask) if m])
        assert replies and set(replies.split("<|im_end|>")) <= {"", *actions}
