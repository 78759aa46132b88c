"""Checkpoints: `checkpoints/step-N/` with the student (save_pretrained), its tokenizer and the
optimiser / scheduler / RNG state, and `manifest.json` (every file's size) written last. A
checkpoint is written to a temporary directory and renamed into place, so a directory named step-N
appears only once complete; a write that fails (a full disk, a file-size limit) removes its
temporary directory, leaves every earlier checkpoint as it was and raises `CheckpointError`.
`resume=auto` takes the newest checkpoint whose manifest is present and whose files have the sizes
it lists (a truncated file or a missing manifest is reported and that checkpoint passed over).
Pruning to `keep_last` counts complete checkpoints only, after the new one is verified, so the
only complete checkpoint is never deleted. A LoRA student is saved merged (a plain model, loadable
by path) with its adapter in `step-N/adapter/`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
OPTIMIZER_DIR = "optimizer"  # a sharded student's optimiser state (torch.distributed.checkpoint)


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
                    state: dict[str, Any], keep_last: int, processor: Any = None,
                    state_dict: dict[str, Any] | None = None,
                    optimizer_dir: Path | None = None) -> Path:
    """Atomically write checkpoints/step-N and prune older complete ones beyond `keep_last`
    (`processor`: a VLM's image processor, saved beside the tokenizer). A sharded student
    passes its gathered weights (`state_dict`) and the directory its ranks wrote the optimiser
    shards to, which becomes `step-N/optimizer`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    for stale in root.glob(".step-*.tmp"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        _write(tmp, step, model, tokenizer, state, processor, state_dict, optimizer_dir)
    except Exception as e:  # ENOSPC, EFBIG, a quota: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if optimizer_dir is not None:
            shutil.rmtree(optimizer_dir, ignore_errors=True)
        newest = newest_checkpoint(root, report=False)
        kept = f"the newest complete checkpoint is {newest}" if newest else \
            "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint step-{step} in {root}: "
                              f"{type(e).__name__}: {e}. Nothing was replaced: {kept}") from e
    old = root / f".step-{step}.old"
    if final.exists():  # the same step saved again: the old copy goes only once the new is in
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    problem = checkpoint_problem(final)
    if problem is not None:
        raise CheckpointError(f"checkpoint {final} is incomplete right after writing it: "
                              f"{problem}")
    for stale in list_checkpoints(root, report=False)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write(tmp: Path, step: int, model: Any, tokenizer: Any, state: dict[str, Any],
           processor: Any, state_dict: dict[str, Any] | None, optimizer_dir: Path | None) -> None:
    from mmopd.models import save_merged

    save_merged(model, tmp, state_dict)
    if optimizer_dir is not None:
        os.replace(optimizer_dir, tmp / OPTIMIZER_DIR)
    tokenizer.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    for f in files:  # data on disk before the manifest and the rename make it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    manifest = {"step": step, "files": {f.relative_to(tmp).as_posix(): f.stat().st_size
                                        for f in files}}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (None: complete)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the write was interrupted, or an older mmopd wrote it)"
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if STATE_FILE not in files:
        return f"{MANIFEST} lists no {STATE_FILE}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is truncated or altered ({f.stat().st_size} bytes, {size} written)"
    return None


def list_checkpoints(root: Path, report: bool = True) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete step-N directories are passed over (with
    a warning naming the problem when `report`)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if (m := _STEP_DIR.match(p.name)) and p.is_dir():
            problem = checkpoint_problem(p)
            if problem is None:
                found.append((int(m.group(1)), p))
            elif report:
                warnings.warn(f"checkpoint {p} skipped: {problem}", stacklevel=2)
    return [p for _, p in sorted(found)]


def newest_checkpoint(root: Path, report: bool = True) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root, report)
    return found[-1] if found else None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """"never" -> None; "auto" -> newest complete checkpoint or None; else an explicit dir."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_checkpoint(root)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"trainer.resume: {resume!r} is not a directory; use 'auto' or a "
                              "checkpoints/step-N directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"trainer.resume: {resume!r} is not a complete checkpoint: "
                              f"{problem}. Use 'auto' to take the newest complete one")
    return path


def check_resumable(state: dict[str, Any], path: Path, world_size: int, sharded: bool) -> None:
    """Refuse a resume whose launch differs from the one that wrote checkpoint `path`: each rank
    rolls out its own share of problems, and a sharded optimiser state is one shard per rank."""
    saved = state.get("world_size")  # absent: written before checkpoints recorded it
    if saved is not None and saved != world_size:
        raise CheckpointError(
            f"trainer.resume: {path} was written by {saved} processes, this launch has "
            f"{world_size}; resume with {saved} (the ranks' rollout streams and optimiser state "
            "belong to that number)")
    has_shards = (path / OPTIMIZER_DIR).is_dir()
    if has_shards != sharded:
        raise CheckpointError(
            f"trainer.resume: {path} holds the optimiser state of a "
            f"{'sharded (FSDP2)' if has_shards else 'not sharded (one process or DDP)'} student, "
            f"this launch {'shards' if sharded else 'does not shard'} it; launch it as before")


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
