"""Environment adapters for mmopd; importing this package registers the built-in environments.

Usage: ``make_env("mmopd/MathText-v0", level=3)``; ``list_envs()`` shows the registered ids;
``register_env`` (or ``make_env("pkg.module:Name-v0")``) adds environments defined elsewhere.
"""

from __future__ import annotations

from typing import Any

from .registration import (
    EnvNotFoundError,
    import_env_modules,
    list_envs,
    make_env,
    register_env,
)
from .spaces import text_space

# Entry points are strings so that importing mmopd.envs stays cheap: math_text pulls in
# math-verify and sympy (about a second), which only loads when the env is actually made.
# order_enforce=False: the env raises its own clear RuntimeError for step-before-reset.
register_env("mmopd/MathText-v0", "mmopd.envs.math_text:MathTextEnv", order_enforce=False)
register_env("mmopd/GymText-v0", "mmopd.envs.gym_text:GymTextEnv", order_enforce=False)
register_env("mmopd/ToolMath-v0", "mmopd.envs.tool_math:ToolMathEnv", order_enforce=False)
register_env("mmopd/VisionQA-v0", "mmopd.envs.vision_qa:VisionQAEnv", order_enforce=False)
register_env("mmopd/Mixture-v0", "mmopd.envs.mixture:MixtureEnv", order_enforce=False)

_MATH_TEXT_NAMES = {
    "MathTextEnv",
    "Problem",
    "check_answer",
    "generate_problem",
    "load_problems",
    "DatasetError",
}

__all__ = [
    "EnvNotFoundError",
    "import_env_modules",
    "list_envs",
    "make_env",
    "register_env",
    "text_space",
    *sorted(_MATH_TEXT_NAMES),
]


def __getattr__(name: str) -> Any:
    # Lazy re-exports of math_text (see above for why it is not imported eagerly).
    if name in _MATH_TEXT_NAMES:
        from . import math_text

        return getattr(math_text, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
