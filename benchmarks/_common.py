"""What every benchmark script records beside its numbers: the machine, the command that
produced them, and (for the training benchmarks) which runs already finished."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC ..."), or what `platform` knows where /proc is missing."""
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        names = []
    return names[0].strip() if names else (platform.processor() or "unknown CPU")


def describe(threads: int | None = None) -> str:
    """"x86_64 AMD EPYC, 2 cores, torch 2.13.0+cpu[, N torch thread(s)], no GPU" (or the GPU)."""
    import torch

    gpu = (f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU")
    used = f", {threads} torch thread(s)" if threads else ""
    return (f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}{used}, {gpu}")


def command() -> str:
    """This process's command line, quoted so that pasting it into a shell reruns it."""
    return "python " + shlex.join(sys.argv)


def written_utc() -> str:
    """Now, as results record it ("2026-12-02 01:40"): a clone keeps no file times."""
    import datetime as dt

    return f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}"


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def finished_run(cfg: Any, candidates: list[Path]) -> Path | None:
    """The first of `candidates` that holds a finished training run of exactly `cfg` (a
    `TrainConfig`; output directories aside), so a rerun reads it instead of training again."""
    from mmopd.config import ConfigError, TrainConfig, load_config, to_dict

    def key(c: TrainConfig) -> dict[str, Any]:
        d = to_dict(c)
        return {**d, "trainer": {**d["trainer"], "output_dir": None}}

    for d in candidates:
        if not (d / "config.yaml").is_file() or not (d / "eval.jsonl").is_file():
            continue
        evals = jsonl_rows(d / "eval.jsonl")
        try:  # a run of an older mmopd whose config names a field since removed is another run
            old = load_config(TrainConfig, d / "config.yaml")
        except ConfigError:
            continue
        if evals and evals[-1]["step"] == cfg.trainer.steps and key(old) == key(cfg):
            return d
    return None


def train_or_reuse(base: Any, overrides: list[str], run_dir: Path, label: str) -> tuple[Any, bool]:
    """The config `base` (a `TrainConfig`) with `overrides`, trained into `run_dir` unless a
    finished run of exactly it is there; returns (config, reused). A new run's wall time goes
    to run_dir/benchmark_seconds.json."""
    import time

    from mmopd.config import TrainConfig, load_config, to_dict
    from mmopd.training.loop import train

    cfg = load_config(TrainConfig, None, [
        f"{k}={json.dumps(v)}" for k, v in to_dict(base).items()] + [
        *overrides, f"trainer.output_dir={run_dir}"])
    if finished_run(cfg, [run_dir]) is not None:
        return cfg, True
    print(f"== {label} -> {run_dir}", flush=True)
    t0 = time.perf_counter()
    train(cfg)
    (run_dir / "benchmark_seconds.json").write_text(
        json.dumps({"seconds": time.perf_counter() - t0}))
    return cfg, False


def run_seconds(run_dir: Path) -> float | None:
    """A run's training time (evaluations included): what `train_or_reuse` recorded, or for a
    run something else trained (a demo), from its first and last files (config.yaml is
    written at the start, eval.jsonl at the end)."""
    timing = run_dir / "benchmark_seconds.json"
    if timing.is_file():
        return json.loads(timing.read_text())["seconds"]
    start, end = run_dir / "config.yaml", run_dir / "eval.jsonl"
    if start.is_file() and end.is_file():
        return end.stat().st_mtime - start.stat().st_mtime
    return None
