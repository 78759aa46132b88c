"""`mmopd/Mixture-v0`: several environments as one, each episode drawn from one of them.

    env:
      id: mmopd/Mixture-v0
      kwargs:
        envs:
          - {id: mmopd/MathText-v0, weight: 0.5, kwargs: {level: 2}}
          - {id: mmopd/ToolMath-v0, weight: 0.5}

Every reset picks an environment (probabilities proportional to `weight`, from the reset seed,
so a run is reproducible) and forwards to it; the episode's info gains "env" (the chosen id), which
`routing.by: env` routes teachers on and metrics group by. Other keyword arguments (e.g. the eval
overrides `split: test`) go to every environment. Evaluation (options["index"] = i) goes round the
environments in order: problem i is problem i // K of environment i % K, so a held-out set takes
the same number of problems from each. Without `envs`, MathText and ToolMath half and half.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from .spaces import text_space

# Without `envs`: the tiny math and tool worlds' environments, half and half.
DEFAULT_ENVS = [{"id": "mmopd/MathText-v0", "weight": 1.0},
                {"id": "mmopd/ToolMath-v0", "weight": 1.0}]


class MixtureEnv(gym.Env):
    """Episodes from several registered environments, weighted."""

    metadata = {"render_modes": []}

    def __init__(self, envs: list[dict[str, Any]] | None = None, **common: Any) -> None:
        from . import make_env  # late: the registry imports this module's package

        envs = DEFAULT_ENVS if envs is None else envs
        if not isinstance(envs, (list, tuple)) or not envs:
            raise ValueError("envs must be a non-empty list of {id, weight, kwargs} mappings")
        self.ids: list[str] = []
        weights, self.envs = [], []
        for i, spec in enumerate(envs):
            if not isinstance(spec, dict) or "id" not in spec:
                raise ValueError(f"envs[{i}]: expected a mapping with an `id`, got {spec!r}")
            unknown = set(spec) - {"id", "weight", "kwargs"}
            if unknown:
                raise ValueError(f"envs[{i}]: unknown key(s) {sorted(unknown)}; an entry takes "
                                 "id, weight and kwargs")
            w = spec.get("weight", 1.0)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"envs[{i}].weight: expected a number >= 0, got {w!r}")
            if spec["id"] in self.ids:
                raise ValueError(f"envs[{i}]: {spec['id']!r} is listed twice (give it one "
                                 "weight; use a registered variant for other settings)")
            self.ids.append(spec["id"])
            weights.append(float(w))
            self.envs.append(make_env(spec["id"], **{**common, **(spec.get("kwargs") or {})}))
        if sum(weights) <= 0:
            raise ValueError("envs: the weights sum to 0")
        self.weights = np.asarray(weights) / sum(weights)
        self.observation_space = self.action_space = text_space()
        sizes = [getattr(e.unwrapped, "num_problems", None) for e in self.envs]
        self.num_problems: int | None = (None if None in sizes else
                                         len(self.envs) * min(s for s in sizes if s is not None))
        self.current: gym.Env | None = None
        self.current_id: str | None = None

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        index = options.get("index")
        if index is not None:
            k, options["index"] = index % len(self.envs), index // len(self.envs)
        else:
            k = int(self.np_random.choice(len(self.envs), p=self.weights))
        self.current, self.current_id = self.envs[k], self.ids[k]
        if seed is None:  # the chosen env's own stream would depend on which envs ran before
            seed = int(self.np_random.integers(2**31))
        obs, info = self.current.reset(seed=seed, options=options or None)
        return obs, {**info, "env": self.current_id}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self.current is None:
            raise RuntimeError("MixtureEnv.step() called before reset()")
        obs, reward, terminated, truncated, info = self.current.step(action)
        return obs, reward, terminated, truncated, {**info, "env": self.current_id}

    def expert_reply(self, messages: list[dict[str, Any]]) -> str:
        """The current environment's demonstration (for SFT and the warm-up)."""
        if self.current is None:
            raise RuntimeError("MixtureEnv.expert_reply() called before reset()")
        return self.current.unwrapped.expert_reply(messages)
