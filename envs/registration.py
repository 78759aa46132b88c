"""Registry of environments by id: a thin layer over gymnasium's with clearer errors."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium
from gymnasium.envs.registration import EnvSpec

NAMESPACE = "mmopd/"

# Ids registered through register_env (user envs live outside the "mmopd/" namespace too).
_registered: set[str] = set()

_HOW_TO_REGISTER = (
    "register one with mmopd.envs.register_env('ns/Name-v0', 'pkg.module:EnvClass') in a module "
    "listed under env.imports, or use the id 'pkg.module:Name-v0' to import the module first"
)


class EnvNotFoundError(ValueError):
    """Raised by make_env for an id nobody registered."""


def _entry_point_key(entry_point: str | Callable[..., Any]) -> str:
    # Compare callables by qualified name, not identity: reloading a module creates a new class
    # object for the same entry point and that must not count as a conflicting registration.
    if isinstance(entry_point, str):
        return entry_point
    module = getattr(entry_point, "__module__", "?")
    return f"{module}:{getattr(entry_point, '__qualname__', repr(entry_point))}"


def register_env(id: str, entry_point: str | Callable[..., Any], **kwargs: Any) -> None:
    """Register an environment so make_env(id) can create it and list_envs() shows it.

    `kwargs` go to gymnasium.register unchanged (e.g. kwargs={...} for constructor defaults,
    max_episode_steps=..., order_enforce=...). Registering the same id with the same entry point
    and options again is a silent no-op, so modules can be imported or reloaded freely.
    """
    if not isinstance(id, str) or not id:
        raise ValueError(f"register_env: id must be a non-empty string, got {id!r}")
    # gymnasium.register turns kwargs=None into {}; do the same so the comparison below matches.
    options = {**kwargs, "kwargs": kwargs.get("kwargs") or {}}
    try:
        spec = EnvSpec(id=id, entry_point=entry_point, **options)
    except TypeError as e:
        raise ValueError(
            f"register_env({id!r}): {e}. Options are passed to gymnasium.register; put "
            "constructor defaults in kwargs={...}"
        ) from e
    existing = gymnasium.registry.get(id)
    if existing is not None and dataclasses.replace(
        existing, entry_point=_entry_point_key(existing.entry_point)
    ) == dataclasses.replace(spec, entry_point=_entry_point_key(entry_point)):
        _registered.add(id)  # identical re-registration (re-import, reload): nothing to do
        return
    gymnasium.register(id=id, entry_point=entry_point, **options)
    _registered.add(id)


def list_envs() -> list[str]:
    """Sorted ids in the "mmopd/" namespace plus every id registered through register_env."""
    ids = {env_id for env_id in gymnasium.registry if env_id.startswith(NAMESPACE)}
    ids.update(env_id for env_id in _registered if env_id in gymnasium.registry)
    return sorted(ids)


def import_env_modules(modules: Sequence[str] | str) -> None:
    """Import user modules that register environments (the config key `env.imports`)."""
    if isinstance(modules, str):
        modules = [modules]
    for name in modules:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"env.imports: module names must be non-empty strings, got {name!r}")
        try:
            importlib.import_module(name.strip())
        except Exception as e:  # any failure inside user code: say which module, keep the cause
            raise ImportError(
                f"env.imports: cannot import module {name!r} ({type(e).__name__}: {e}); check "
                "that it is installed or on PYTHONPATH and imports without errors"
            ) from e


def _closest(env_id: str, candidates: list[str]) -> list[str]:
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(env_id.lower(), list(by_lower), n=3, cutoff=0.5)
    return [by_lower[c] for c in close]


def _not_found_message(id: str, env_id: str) -> str:
    # Prefer our own envs; gymnasium's built-ins (CartPole...) only if nothing of ours is close.
    close = _closest(env_id, list_envs()) or _closest(env_id, list(gymnasium.registry))
    hint = (
        f"did you mean {', '.join(map(repr, close))}?"
        if close
        else f"known mmopd envs: {', '.join(list_envs()) or 'none'}."
    )
    return f"unknown environment id {id!r}: {hint} To add an environment, {_HOW_TO_REGISTER}."


def make_env(id: str, **kwargs: Any) -> gymnasium.Env:
    """Create a registered environment by id (or "pkg.module:Name-v0" to import pkg.module first).

    Returns the gymnasium-wrapped env; use `env.unwrapped` for env-specific attributes.
    """
    if not isinstance(id, str) or not id:
        raise EnvNotFoundError(f"environment id must be a non-empty string, got {id!r}")
    module, _, env_id = id.rpartition(":")
    if module:
        import_env_modules([module])
    if env_id not in gymnasium.registry:
        raise EnvNotFoundError(_not_found_message(id, env_id))
    try:
        return gymnasium.make(env_id, **kwargs)
    except TypeError as e:
        # gymnasium re-raises the constructor's TypeError; pull out the offending name if any.
        found = re.search(r"(?:keyword argument|argument:?) '(\w+)'", str(e))
        what = f"bad keyword argument {found.group(1)!r}" if found else f"bad arguments ({e})"
        raise ValueError(
            f"cannot make environment {env_id!r}: {what}; passed kwargs: {sorted(kwargs)}"
        ) from e


def reset_index(options: dict[str, Any] | None) -> Any | None:
    """The held-out episode index of reset(options={"index": i}) (None when not given).

    Envs of this package take no other reset option; anything else is an error, not ignored.
    """
    options = dict(options or {})
    unknown = set(options) - {"index"}
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; supported: ['index']")
    if "index" in options and options["index"] is None:
        raise ValueError("options['index'] must be an episode index, got None")
    return options.get("index")


def careless_rate(value: Any) -> float:
    """A validated `careless` probability (how often an env's demonstrations skip its skill)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"careless must be a probability in [0, 1], got {value!r}")
    return float(value)
