"""The run's independent random streams. Each seed depends only on (run seed, rollout batch,
purpose, index), so a resumed run replays exactly and a teacher cache rolls out the problems
training would draw."""

from __future__ import annotations

import numpy as np

PROBLEMS, SAMPLING, SHUFFLE, WARMUP = 0, 1, 2, 3  # the purposes (streams) of a run's seeds


def derived_seed(seed: int, iteration: int, stream: int, i: int = 0) -> int:
    """The seed of item `i` of `stream` at rollout batch `iteration` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, iteration, stream, i]).generate_state(1)[0])
