"""Shared by the examples: a two-step training config on tiny random models built in memory, so
every example runs in seconds on a CPU with nothing downloaded. Random models teach nothing: the
examples show how a seam plugs in, not learning (`mmopd demo` shows that)."""

from __future__ import annotations

from pathlib import Path

from mmopd.config import TrainConfig, load_config
from mmopd.tokenizer import build_char_tokenizer


def tiny_config(out: str | Path, overrides: list[str] = (), path: str | Path | None = None
                ) -> TrainConfig:
    """A config (from `path` if given) with tiny student and teacher, two optimiser steps, and
    the run directory under `out`; `overrides` are dotted keys applied last."""
    out = Path(out)
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        build_char_tokenizer(tok)
    tiny = "{{tiny: {{hidden_size: {h}, num_layers: {n}, intermediate_size: {i}}}, tokenizer: {t}}}"
    return load_config(TrainConfig, path, [
        "model=" + tiny.format(h=32, n=1, i=64, t=tok),
        "teacher.model=" + tiny.format(h=48, n=2, i=96, t=tok),
        "rollout.prompts_per_batch=4", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=12", "trainer.steps=2", f"trainer.output_dir={out / 'run'}",
        "eval.num_problems=4", "eval.pass_k=0", "eval.at_start=false", *overrides])
