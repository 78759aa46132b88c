"""Experiment trackers (trainer.report_to) through accelerate: TensorBoard, W&B, Trackio, MLflow.

Every row that goes to metrics.jsonl is logged at its step, every eval.jsonl row under "eval/",
and the resolved config as hyper-parameters. Files stay in the run directory where the tracker
allows it: TensorBoard events in RUN_DIR/tensorboard/mmopd/, W&B's offline runs in RUN_DIR/wandb/,
MLflow's in RUN_DIR/mlruns/ (Trackio keeps its own local store, TRACKIO_DIR). Only the main
process logs.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

# report_to name -> the module it needs (and the pip package that provides it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow-skinny")}
PROJECT = "mmopd"


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def resolve_report_to(value: str | list[str]) -> list[str]:
    """The trackers a run reports to: "auto" is TensorBoard when it is installed, "none" none.
    Raises ValueError for an unknown name or a tracker whose package is missing."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"must be a tracker name or a list of them, got {value!r}")
    if names in (["auto"], []):
        return ["tensorboard"] if installed("tensorboard") else []
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}, "
                         "'auto' (tensorboard when installed) or 'none'")
    missing = [n for n in names if not installed(n)]
    if missing:
        packages = " ".join(TRACKERS[n][1] for n in missing)
        raise ValueError(f"{', '.join(missing)} is not installed: pip install {packages} "
                         "(or pip install 'mmopd[track]' for all of them)")
    return list(dict.fromkeys(names))


def init_kwargs(names: list[str], out: Path) -> dict[str, dict[str, Any]]:
    """Per-tracker arguments that name the run and keep its files in the run directory."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": out.name, "dir": str(out)}
    if "trackio" in names:
        kwargs["trackio"] = {"name": out.name}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": out.name, "logging_dir": str(out / "mlruns")}
    return kwargs


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as "section.field" -> scalar (lists, None and the rest as text), the
    form hyper-parameter tables take."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics row (not its step), named for the tracker."""
    return {prefix + k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}
