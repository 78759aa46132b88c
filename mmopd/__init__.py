"""mmopd: on-policy distillation of a student model from a teacher on the student's own episodes.

The names below are the library's front door; each loads its module (and torch) on first use, so
`import mmopd` stays cheap. The packages show the architecture: `rollout` (samplers, agent loop),
`teachers`, `objectives`, `training` (assemble, loop, losses), `config`, `envs` and `tools`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "train": "mmopd.training.loop",
    "sft": "mmopd.training.sft",
    "assemble": "mmopd.training.assemble",
    "load_config": "mmopd.config",
    "TrainConfig": "mmopd.config",
    "SFTConfig": "mmopd.config",
    "ConfigError": "mmopd.config",
    "Episode": "mmopd.episode",
    "make_env": "mmopd.envs",
    "register_env": "mmopd.envs",
    "tool": "mmopd.tools",
    "register_objective": "mmopd.objectives",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmopd' has no attribute {name!r}")
