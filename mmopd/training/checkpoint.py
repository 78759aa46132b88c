"""Checkpoints: `checkpoints/step-N/` with the student (save_pretrained), its tokenizer and the
optimiser / scheduler / RNG state. Written to a temporary directory and renamed into place, so a
directory named step-N is always complete; `resume=auto` picks the newest one. A LoRA student is
saved merged (a plain model, loadable by path) with its adapter in `step-N/adapter/`."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing or incomplete."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model: Any, tokenizer: Any,
                    state: dict[str, Any], keep_last: int, processor: Any = None) -> Path:
    """Atomically write checkpoints/step-N and prune older ones beyond `keep_last`
    (`processor`: a VLM's image processor, saved beside the tokenizer)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from mmopd.models import save_merged

    save_merged(model, tmp)
    tokenizer.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, root: Path) -> Path | None:
    """"never" -> None; "auto" -> newest complete checkpoint or None; else an explicit dir."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"trainer.resume: {resume!r} is not a complete checkpoint "
                              f"(no {STATE_FILE}); use 'auto' or a checkpoints/step-N directory")
    return path


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, weights_only=False)


def load_student(cfg: Any, tokenizer: Any, path: Path, vision: Any = None) -> Any:
    """The trainable student of checkpoint `path` (`cfg`: the run's ModelConfig). Full
    fine-tuning: the saved weights. LoRA: the run's own base model with the saved adapter, so
    training continues on the same adapters the optimiser state belongs to (adapters put on
    top of the merged weights would start afresh)."""
    import dataclasses

    from mmopd.models import load_adapter, load_model

    if cfg.lora is None:
        return load_model(dataclasses.replace(cfg, path=str(path), tiny=None, tokenizer=None),
                          tokenizer, trainable=True)
    student = load_model(cfg, tokenizer, trainable=True, vision=vision)
    load_adapter(student, path / "adapter")
    return student
