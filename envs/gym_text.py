"""mmopd/GymText-v0: a gymnasium game with a text rendering (FrozenLake, Taxi, CliffWalking,
Blackjack, or any env with an "ansi" render mode) as a multi-turn text env.

reset() gives the rules and the board as chat messages; each step() reads the student's whole
reply, finds the move in it (see `parse_action`), plays it and returns the next board as text.
A reply that names no move is an invalid move, never an exception: by default it ends the episode
unsuccessfully (`on_invalid="end"`); `on_invalid="retry"` answers with a reminder and the same
board instead. The reward is 1.0 on the step that wins (FrozenLake/CliffWalking goal reached,
Taxi passenger delivered, Blackjack hand won) and 0.0 otherwise; info["correct"] says whether the
episode was won once it ends, and info["game_return"] keeps the game's own reward sum.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
from gymnasium.spaces import Discrete

from .gym_games import (
    GAME_ADAPTERS,
    GameAdapter,
    action_pattern,
    blackjack_basic_strategy,
    parse_action,
    value_iteration,
)
from .registration import reset_index
from .spaces import text_space

__all__ = [
    "GAME_ADAPTERS",
    "GameAdapter",
    "GymTextEnv",
    "blackjack_basic_strategy",
    "parse_action",
    "value_iteration",
]

# Seed ranges: a train seed s plays the wrapped game with seed s mod 2**63, held-out episode i
# with 2**63 + i, so the two splits never share a seed (gymnasium seeds may be any int >= 0).
_TEST_SEED_BASE = 2**63
_MAX_MAP_DRAWS = 1000  # a train map is redrawn while it is a held-out map (see _train_map)

# Optimal policies by (game, game kwargs, map): every env of a pool shares one computation.
_POLICY_CACHE: dict[tuple[str, str, tuple[str, ...] | None], np.ndarray] = {}
_POLICY_CACHE_SIZE = 4096

# ----------------------------------------------------------------------------- random maps


def _random_map(size: int, p: float, seed: int) -> tuple[str, ...]:
    from gymnasium.envs.toy_text.frozen_lake import generate_random_map

    return tuple(generate_random_map(size=size, p=p, seed=seed))


@functools.lru_cache(maxsize=32)
def _test_maps(size: int, p: float, test_size: int) -> tuple[tuple[str, ...], ...]:
    """The held-out maps: the first test_size distinct maps of the test seed range."""
    maps: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    for k in range(20 * test_size + _MAX_MAP_DRAWS):  # bounded: small maps run out
        m = _random_map(size, p, _TEST_SEED_BASE + k)
        if m not in seen:
            seen.add(m)
            maps.append(m)
            if len(maps) == test_size:
                return tuple(maps)
    raise ValueError(
        f"random_map_size={size}, random_map_p={p}: found only {len(maps)} distinct "
        f"maps for test_size={test_size}; lower test_size or use a bigger map"
    )


@functools.lru_cache(maxsize=32)
def _test_map_set(size: int, p: float, test_size: int) -> frozenset[tuple[str, ...]]:
    return frozenset(_test_maps(size, p, test_size))


def _train_map(size: int, p: float, test_size: int, seed: int) -> tuple[str, ...]:
    # Like MathText's held-out questions: a train seed whose map is held out draws again from
    # seeds derived from it, so training never sees a test map.
    held_out = _test_map_set(size, p, test_size)
    for k in range(_MAX_MAP_DRAWS):
        derived = np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0]
        m = _random_map(size, p, seed if k == 0 else int(derived) % _TEST_SEED_BASE)
        if m not in held_out:
            return m
    raise ValueError(
        f"seed {seed}: {_MAX_MAP_DRAWS} map draws were all held-out maps; lower "
        "test_size or use a bigger random_map_size"
    )


# ----------------------------------------------------------------------------- env


def _check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {minimum}{none}, got {value!r}")


def _optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {value!r}")


def _resolve_adapter(
    game: str, actions: Sequence[str] | None, rules: str | None
) -> tuple[str, GameAdapter]:
    """(gymnasium name of `game`, its adapter with the user's action names and rules applied)."""
    try:
        spec = gymnasium.spec(game)
    except gymnasium.error.Error as e:  # unknown or deprecated id: gymnasium names the fix
        raise ValueError(f"game {game!r}: {e}") from e
    name = spec.name if spec.namespace is None else f"{spec.namespace}/{spec.name}"
    adapter = GAME_ADAPTERS.get(name)
    if actions is not None:
        if isinstance(actions, str) or not all(isinstance(a, str) and a.strip() for a in actions):
            raise ValueError(f"actions must be a list of non-empty names, got {actions!r}")
        if len({a.strip().lower() for a in actions}) != len(actions):
            raise ValueError(f"actions must be distinct ignoring case, got {list(actions)}")
        names = tuple(a.strip() for a in actions)
        adapter = dataclasses.replace(adapter or GameAdapter((), f"{spec.name}."), actions=names)
    if adapter is None:
        raise ValueError(
            f"game {game!r} has no built-in adapter (built in: {sorted(GAME_ADAPTERS)}); pass "
            "actions=[...] (the names of its Discrete actions, in order) and rules='...'"
        )
    return name, adapter if rules is None else dataclasses.replace(adapter, rules=rules)


class GymTextEnv(gymnasium.Env):
    """A gymnasium game played in text: board in, reply out, one game move per assistant turn.

    split "train": reset(seed=s) plays the game seeded with s (endless); split "test": a fixed
    held-out set of test_size episodes, reset(options={"index": i}) plays episode i. With
    random_map_size (FrozenLake only) every episode has its own random map; held-out maps never
    occur in training. max_steps caps the replies per episode (invalid ones included) on top of
    the game's own time limit. See the module docstring for the reply and reward rules.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        game: str = "FrozenLake-v1",
        game_kwargs: Mapping[str, Any] | None = None,
        split: str = "train",
        test_size: int = 100,
        max_steps: int | None = None,
        on_invalid: str = "end",
        random_map_size: int | None = None,
        random_map_p: float = 0.8,
        actions: Sequence[str] | None = None,
        rules: str | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if not isinstance(game, str) or not game:
            raise ValueError(f"game must be a gymnasium id such as 'FrozenLake-v1', got {game!r}")
        if game_kwargs is not None and not isinstance(game_kwargs, Mapping):
            raise ValueError(f"game_kwargs must be a mapping or None, got {game_kwargs!r}")
        game_kwargs = dict(game_kwargs or {})
        if "render_mode" in game_kwargs:
            raise ValueError("game_kwargs: do not set render_mode; GymTextEnv picks the text one")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        _check_int("test_size", test_size)
        _check_int("max_steps", max_steps, allow_none=True)
        if on_invalid not in ("end", "retry"):
            raise ValueError(f"on_invalid must be 'end' or 'retry', got {on_invalid!r}")
        _optional_str("rules", rules)
        _optional_str("system_prompt", system_prompt)
        name, adapter = _resolve_adapter(game, actions, rules)
        if random_map_size is not None:
            if name not in ("FrozenLake", "FrozenLake8x8"):
                raise ValueError(f"random_map_size is for FrozenLake games, not {game!r}")
            _check_int("random_map_size", random_map_size, minimum=4)
            p_ok = isinstance(random_map_p, (int, float)) and not isinstance(random_map_p, bool)
            if not p_ok or not 0 < random_map_p <= 1:
                raise ValueError(f"random_map_p must be in (0, 1], got {random_map_p!r}")
            if {"desc", "map_name"} & set(game_kwargs):
                raise ValueError(
                    "random_map_size draws the map: drop desc/map_name from game_kwargs"
                )
        self.game, self.game_kwargs = game, game_kwargs
        self.split, self.test_size = split, test_size
        self.max_steps, self.on_invalid, self.adapter = max_steps, on_invalid, adapter
        self.random_map_size, self.random_map_p = random_map_size, float(random_map_p)
        self._kwargs_key = repr(sorted(game_kwargs.items()))
        self._pattern = action_pattern(adapter.actions)
        self._actions_line = f"Reply with one action: {', '.join(adapter.actions)}."
        self.system_prompt = (
            f"{adapter.rules} {self._actions_line}" if system_prompt is None else system_prompt
        )

        self.observation_space = text_space()
        self.action_space = self.observation_space
        self._charset = self.observation_space.character_set
        self.num_problems: int | None = test_size if split == "test" else None

        self._map: tuple[str, ...] | None = None
        if random_map_size is not None:  # a placeholder map until the first reset picks one
            self._map = _test_maps(random_map_size, self.random_map_p, test_size)[0]
        self._game = self._make_game()
        self._obs: Any = None  # the wrapped game's observation; None when no episode is running
        self._steps = self._invalid = 0
        self._return = 0.0

    # -- wrapped game

    def _make_game(self) -> gymnasium.Env:
        kwargs = dict(self.game_kwargs)
        if self._map is not None:
            kwargs["desc"] = list(self._map)
        if self.adapter.ansi:
            kwargs["render_mode"] = "ansi"
        # No passive checker around the game: this env is what gets checked, and random maps
        # remake the game every episode, where the checker's wrapper is pure overhead.
        try:
            env = gymnasium.make(self.game, disable_env_checker=True, **kwargs)
        except TypeError as e:
            raise ValueError(
                f"game {self.game!r}: bad game_kwargs {sorted(self.game_kwargs)} ({e})"
            ) from e
        if self.adapter.ansi and "ansi" not in env.metadata.get("render_modes", ()):
            raise ValueError(
                f"game {self.game!r} has no 'ansi' render mode to show as text; "
                "add a GameAdapter with its own render function to GAME_ADAPTERS"
            )
        space = env.action_space
        if not isinstance(space, Discrete) or int(space.n) != len(self.adapter.actions):
            names = list(self.adapter.actions)
            raise ValueError(
                f"game {self.game!r}: action space {space} does not match the "
                f"{len(names)} action names {names}"
            )
        return env

    def _text(self, obs: Any) -> str:
        text = self.adapter.render(self._game, obs)
        if not set(text) <= self._charset:  # keep observations inside the text space
            text = "".join(c if c in self._charset else "?" for c in text)
        return text[: self.observation_space.max_length]

    # -- episodes

    def _episode(self, seed: int | None, index: Any | None) -> tuple[int, str, int | None]:
        """(wrapped game seed, episode id, held-out index or None)."""
        if index is not None:
            if self.split != "test":
                raise ValueError("options['index'] selects a held-out episode: use split='test'")
            i = operator.index(index)
            if not 0 <= i < self.test_size:
                raise IndexError(
                    f"episode index {i} out of range: this set has {self.test_size} "
                    f"episodes (valid indices 0..{self.test_size - 1})"
                )
        elif self.split == "test":
            i = int(self.np_random.integers(self.test_size))
        else:
            # The seed itself names the episode, so the same seed always gives the same one.
            s = seed if seed is not None else int(self.np_random.integers(2**62))
            return s % _TEST_SEED_BASE, f"seed-{s}", None
        return _TEST_SEED_BASE + i, f"test-{i}", i

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        game_seed, episode, index = self._episode(seed, reset_index(options))
        if self.random_map_size is not None:
            size, p = self.random_map_size, self.random_map_p
            new_map = (
                _test_maps(size, p, self.test_size)[index]
                if index is not None
                else _train_map(size, p, self.test_size, game_seed)
            )
            if new_map != self._map:
                self._game.close()
                self._map = new_map
                self._game = self._make_game()
        self._obs, _ = self._game.reset(seed=game_seed)
        self._steps = self._invalid = 0
        self._return = 0.0
        text = self._text(self._obs)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        info: dict[str, Any] = {
            "messages": system + [{"role": "user", "content": text}],
            "problem_id": f"{self.game}:{episode}",
        }
        return text, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._obs is None:
            raise RuntimeError(
                f"GymTextEnv({self.game}).step() called before reset() or after "
                "the episode ended; call reset() to start an episode"
            )
        if not isinstance(action, str):
            raise TypeError(f"action must be the reply text (str), got {type(action).__name__}")
        self._steps += 1
        index = parse_action(action, self.adapter.actions, self._pattern)
        if index is None:
            self._invalid += 1
            if self.on_invalid == "end":
                return self._finish(0.0, True, False, None, won=False)
            obs_text = f"Invalid reply. {self._actions_line}\n{self._text(self._obs)}"
            terminated, truncated, won = False, False, False
        else:
            game_action = int(self._game.action_space.start) + index
            obs, reward, terminated, truncated, _ = self._game.step(game_action)
            self._return += float(reward)
            self._obs = obs
            won = bool(terminated) and self.adapter.success(float(reward), bool(terminated))
            terminated, truncated = bool(terminated), bool(truncated) and not terminated
            obs_text = ""
        if not terminated and self.max_steps is not None and self._steps >= self.max_steps:
            truncated = True
        if terminated or truncated:
            return self._finish(float(won), terminated, truncated, index, won)
        if index is not None:
            obs_text = self._text(self._obs)
        return obs_text, 0.0, False, False, self._info(index)

    def _info(self, index: int | None) -> dict[str, Any]:
        return {
            "action": None if index is None else self.adapter.actions[index],
            "invalid_action": index is None,
            "invalid_actions": self._invalid,
            "steps": self._steps,
            "game_return": self._return,
        }

    def _finish(
        self, reward: float, terminated: bool, truncated: bool, index: int | None, won: bool
    ) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._obs = None  # the episode is over: step() needs a reset() now
        return "", reward, terminated, truncated, {**self._info(index), "correct": won}

    # -- expert

    def expert_action(self) -> int:
        """The expert's action index in the current state (see expert_reply)."""
        if self._obs is None:
            raise RuntimeError("expert_action() needs a running episode; call reset() first")
        if self.adapter.expert is not None:
            return int(self.adapter.expert(self._obs))
        key = (self.game, self._kwargs_key, self._map)
        policy = _POLICY_CACHE.get(key)
        if policy is None:
            table = getattr(self._game.unwrapped, "P", None)
            if table is None:
                raise NotImplementedError(
                    f"no expert for {self.game!r}: it has no transition table P for value "
                    "iteration and its GameAdapter defines no expert"
                )
            if len(_POLICY_CACHE) >= _POLICY_CACHE_SIZE:
                _POLICY_CACHE.clear()
            policy = _POLICY_CACHE[key] = value_iteration(table)
        return int(policy[int(self._obs)])

    def expert_reply(self, messages: list[dict[str, str]] | None = None) -> str:
        """The reply an expert gives now: just the action name (e.g. "right").

        The expert reads the game state, not `messages` (accepted so it can stand in for a policy
        over the conversation). FrozenLake, Taxi and CliffWalking: the optimal policy from value
        iteration over the game's transition table (shortest path to the goal); Blackjack: basic
        strategy (blackjack_basic_strategy).
        """
        return self.adapter.actions[self.expert_action()]

    def close(self) -> None:
        self._game.close()
        super().close()
