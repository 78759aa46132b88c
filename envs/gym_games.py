"""The games mmopd/GymText-v0 knows: per game, the action names, the rules, a renderer that turns
the board into plain text, what counts as a win, and an expert policy.

FrozenLake, Taxi and CliffWalking render through gymnasium's "ansi" mode, with the colours that
mark the agent turned into letters; Blackjack's tuple observation gets a one-line renderer. The
experts are value iteration over the game's transition table P, or Blackjack basic strategy.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np

__all__ = [
    "GAME_ADAPTERS",
    "GameAdapter",
    "action_pattern",
    "blackjack_basic_strategy",
    "parse_action",
    "value_iteration",
]

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LAST_ACTION_LINE = re.compile(r"^\s*\(\w+\)\s*$")  # gymnasium's "  (Down)" under the board

# ----------------------------------------------------------------------------- rendering


def _board(ansi: str) -> str:
    """An ansi rendering as plain text: no colour codes, no last-action line, no blank lines."""
    lines = (line.rstrip() for line in _ANSI_ESCAPE.sub("", ansi).splitlines())
    return "\n".join(line for line in lines if line and not _LAST_ACTION_LINE.match(line))


def _render_ansi(env: gymnasium.Env) -> str:
    text = env.render()
    if not isinstance(text, str):
        raise TypeError(
            f"{env.spec.id if env.spec else env}: render() in 'ansi' mode returned "
            f"{type(text).__name__}, expected text"
        )
    return text


def _ansi_text(env: gymnasium.Env, obs: Any) -> str:
    """Any game's own ansi rendering with the colours stripped (games without an adapter)."""
    return _board(_render_ansi(env))


def _frozen_lake_text(env: gymnasium.Env, obs: Any) -> str:
    # gymnasium shows the agent only as a red background, which stripping would lose: use "@".
    return _board(re.sub(r"\x1b\[41m.\x1b\[0m", "@", _render_ansi(env)))


def _taxi_text(env: gymnasium.Env, obs: Any) -> str:
    # The taxi is a yellow (empty) or green (carrying) background: draw it as "T". Passenger and
    # destination are only colours too, so say them in words. The +---+ borders add nothing.
    board = _board(re.sub(r"\x1b\[4[23]m.\x1b\[0m", "T", _render_ansi(env)))
    rows = [row for row in board.splitlines() if not row.startswith("+")]
    game = env.unwrapped
    _, _, passenger, destination = game.decode(int(obs))
    stops = [game.desc[1 + r, 2 * c + 1].decode() for r, c in game.locs]
    where = "in taxi" if passenger == len(stops) else f"at {stops[passenger]}"
    return "\n".join(rows) + f"\nPassenger {where}, destination {stops[destination]}."


def _cliff_text(env: gymnasium.Env, obs: Any) -> str:
    # gymnasium puts cells three characters apart and the agent as "x": squeeze, and use "@".
    rows = _board(_render_ansi(env)).splitlines()
    return "\n".join(row.replace(" ", "").replace("x", "@") for row in rows)


def _blackjack_text(env: gymnasium.Env, obs: Any) -> str:
    player, dealer, usable_ace = obs
    card = "A" if dealer == 1 else str(dealer)
    return f"Your sum: {player}, dealer shows: {card}, usable ace: {'yes' if usable_ace else 'no'}"


# ----------------------------------------------------------------------------- experts


def blackjack_basic_strategy(obs: tuple[int, int, int]) -> int:
    """Basic strategy without doubling or splitting (gymnasium has neither): 1 = hit, 0 = stick.

    Soft hands (a usable ace): stick on 19+, and on 18 unless the dealer shows 9, 10 or an ace.
    Hard hands: stick on 17+, on 13-16 against a dealer 2-6, on 12 against 4-6; otherwise hit.
    """
    player, dealer, usable_ace = (int(x) for x in obs)
    if usable_ace:
        return int(not (player >= 19 or (player == 18 and 2 <= dealer <= 8)))
    if player >= 17 or (player >= 13 and 2 <= dealer <= 6) or (player == 12 and 4 <= dealer <= 6):
        return 0
    return 1


Transitions = Mapping[int, Mapping[int, Sequence[tuple[float, int, float, bool]]]]


def value_iteration(
    transitions: Transitions, gamma: float = 0.99, tol: float = 1e-9, max_iters: int = 100_000
) -> np.ndarray:
    """Greedy optimal action per state for a gymnasium toy-text table P[s][a] = [(p, s', r, done)].

    With gamma < 1 the optimum also prefers shorter paths among equally good ones (FrozenLake pays
    only at the goal, so undiscounted every path to it would tie). Ties go to the lowest action.
    """
    n_states, n_actions = len(transitions), len(transitions[0])
    rows = [(s * n_actions + a, p, s2, r, done)
            for s in range(n_states) for a in range(n_actions)
            for p, s2, r, done in transitions[s][a]]  # fmt: skip
    sa, prob, nxt, reward, done = (np.asarray(col) for col in zip(*rows))
    nxt = nxt.astype(np.int64)
    cont = gamma * prob * (1.0 - done.astype(float))
    immediate = np.bincount(sa, prob * reward, minlength=n_states * n_actions)
    v = np.zeros(n_states)
    for _ in range(max_iters):
        q = immediate + np.bincount(sa, cont * v[nxt], minlength=n_states * n_actions)
        q = q.reshape(n_states, n_actions)
        v_new = q.max(axis=1)
        converged = np.abs(v_new - v).max() < tol
        v = v_new
        if converged:
            break
    return q.argmax(axis=1)


# ----------------------------------------------------------------------------- adapters


def _won_with_reward(reward: float, terminated: bool) -> bool:
    return terminated and reward > 0


@dataclasses.dataclass(frozen=True)
class GameAdapter:
    """How one gymnasium game becomes text: action names, rules, renderer, goal and expert."""

    actions: tuple[str, ...]  # action names; name i is the wrapped env's Discrete action i
    rules: str  # the system prompt, ahead of "Reply with one action: ..."
    render: Callable[[gymnasium.Env, Any], str] = _ansi_text  # (wrapped env, its obs) -> text
    ansi: bool = True  # make the wrapped env with render_mode="ansi" (the renderer reads it)
    success: Callable[[float, bool], bool] = _won_with_reward  # (reward, terminated) -> won
    expert: Callable[[Any], int] | None = None  # obs -> action; None: value iteration over P


_FROZEN_LAKE = GameAdapter(
    actions=("left", "down", "right", "up"),
    rules="FrozenLake. Walk from S to G. F is ice, H is a hole, @ is you.",
    render=_frozen_lake_text,
)
_CLIFF = GameAdapter(
    actions=("up", "right", "down", "left"),
    rules="CliffWalking. Walk from @ to T. C is a cliff: it sends you back to the start.",
    render=_cliff_text,
    success=lambda reward, terminated: terminated,  # every step pays -1, the goal included
)

# Built-in games by gymnasium name (the id without version). Add an entry to support another
# game in code, or pass actions=[...] (and rules=...) to GymTextEnv for an "ansi" game.
GAME_ADAPTERS: dict[str, GameAdapter] = {
    "FrozenLake": _FROZEN_LAKE,
    "FrozenLake8x8": _FROZEN_LAKE,
    "Taxi": GameAdapter(
        actions=("south", "north", "east", "west", "pickup", "dropoff"),
        rules="Taxi. Drive T to the passenger, pickup, drive to the destination, dropoff. "
        "R G Y B are stops, | is a wall.",
        render=_taxi_text,
    ),
    "CliffWalking": _CLIFF,
    "CliffWalkingSlippery": _CLIFF,
    "Blackjack": GameAdapter(
        actions=("stick", "hit"),
        rules="Blackjack. Get closer to 21 than the dealer without going over. "
        "An ace counts 1 or 11.",
        render=_blackjack_text,
        ansi=False,
        expert=blackjack_basic_strategy,
    ),
}


def action_pattern(actions: Sequence[str]) -> re.Pattern[str]:
    """The regex parse_action searches a reply with (compile once per env, not per reply)."""
    # One named group per action ("a3" is actions[3]), so a match maps back to its index even
    # when case-insensitive matching accepts a spelling that lower() does not map to the name
    # ("ſtick" matches "stick"). Longest names first: "go on" must not be read as "go". The \w
    # guards make names whole words ("leftover" is not "left", "move_left" is not "left").
    by_length = sorted(range(len(actions)), key=lambda i: -len(actions[i]))
    alternatives = "|".join(f"(?P<a{i}>{re.escape(actions[i])})" for i in by_length)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def parse_action(
    reply: str, actions: Sequence[str], pattern: re.Pattern[str] | None = None
) -> int | None:
    """The action index a reply names, or None when it names none.

    The last action name in the reply wins (case-insensitive, whole words), so reasoning may
    mention other moves first: "not left, so: right" is right. A reply that names no action but
    is just an action index ("2", surrounding spaces allowed) selects that index.
    """
    pattern = pattern or action_pattern(actions)
    matches = list(pattern.finditer(reply))
    if matches and matches[-1].lastgroup is not None:
        return int(matches[-1].lastgroup[1:])
    digits = re.fullmatch(r"\s*([0-9]{1,6})\s*", reply)
    if digits and int(digits.group(1)) < len(actions):
        return int(digits.group(1))
    return None
