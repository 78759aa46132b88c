"""`mmopd export RUN_DIR/checkpoints/step-N --out DIR`: a clean model folder with a model card.

A checkpoint already holds the student as `save_pretrained` wrote it (LoRA adapters merged in),
its tokenizer and, for VLMs, the image processor; export copies those files (not the optimiser
state, the manifest or the raw adapter), adds a generation config where the checkpoint has
none, and writes README.md: the base student, the teacher, the objective and its settings, the
data, the steps, and the held-out results of the run's eval.jsonl. `--push-to-hub REPO` uploads
the folder with huggingface_hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from mmopd.envs.sources import is_local_source
from mmopd.training.checkpoint import MANIFEST, STATE_FILE, checkpoint_problem

# what a checkpoint holds for training only
_TRAINING_ONLY = {STATE_FILE, MANIFEST, "adapter"}


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names it."""


def _run_dir(checkpoint: Path) -> Path | None:
    """RUN_DIR of RUN_DIR/checkpoints/step-N, when the run's config.yaml is there."""
    run = checkpoint.parent.parent
    return run if checkpoint.parent.name == "checkpoints" and (run / "config.yaml").is_file() \
        else None


def _model_name(model: dict[str, Any] | None) -> str:
    if not model:
        return "none"
    if model.get("path"):
        return str(model["path"])
    return "a tiny model built from config" if model.get("tiny") else "none"


def _teacher_name(teacher: dict[str, Any]) -> str:
    kind = teacher.get("kind", "model")
    if kind == "model":
        return _model_name(teacher.get("model"))
    if kind == "served":
        served = teacher.get("served") or {}
        return f"served ({served.get('model') or 'the server'} at {served.get('url')})"
    if kind == "cache":
        return f"cached scores ({teacher.get('cache')})"
    return {"self": "the initial student, frozen", "ema": "an EMA of the student"}.get(kind, kind)


def model_card(cfg: dict[str, Any], evals: list[dict[str, Any]], step: int) -> str:
    """README.md for an exported student: what it was distilled from, how, and its results."""
    student, objective = _model_name(cfg.get("model")), cfg.get("objective", {})
    env = cfg.get("env", {})
    kwargs = env.get("kwargs") or {}
    source = kwargs.get("source")
    hub_data = [source] if isinstance(source, str) and source != "synthetic" and \
        not is_local_source(source) else []
    meta: dict[str, Any] = {"library_name": "transformers", "tags": [
        "mmopd", "on-policy-distillation", str(objective.get("name", ""))]}
    if cfg.get("model", {}).get("path"):
        meta["base_model"] = cfg["model"]["path"]
    if hub_data:
        meta["datasets"] = hub_data
    settings = {k: v for k, v in objective.items() if v is not None and not isinstance(v, dict)}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {student} distilled on-policy with mmopd", "",
             f"The student `{student}` trained on its own episodes for {step} optimiser steps, "
             f"scored token by token by the teacher `{_teacher_name(cfg.get('teacher', {}))}` "
             f"with the `{objective.get('name')}` objective.", "",
             "## Training", "", "| setting | value |", "|---|---|",
             f"| environment | `{env.get('id')}` |",
             "| data | " + (f"`{source}`" + (f" ({kwargs['preset']})" if kwargs.get("preset")
                                             else "") if source else "the environment's own")
             + " |",
             f"| steps | {step} |"]
    rollout = cfg.get("rollout", {})
    for key in ("prompts_per_batch", "samples_per_prompt", "max_new_tokens", "temperature"):
        if key in rollout:
            lines.append(f"| rollout.{key} | {rollout[key]} |")
    lr = cfg.get("optim", {}).get("lr")
    if lr is not None:
        lines.append(f"| optim.lr | {lr} |")
    lines += ["", "Objective settings:", "", "```yaml",
              yaml.safe_dump({"objective": settings}, sort_keys=False).strip(), "```", ""]
    lines += ["## Held-out results", ""]
    shown = [r for r in evals if r.get("step", 0) <= step]
    if shown:
        keys = [k for k in shown[-1] if k != "step" and isinstance(shown[-1][k], (int, float))]
        lines += ["| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        for r in ([shown[0], shown[-1]] if len(shown) > 1 else shown):
            lines.append(f"| {r['step']} | " + " | ".join(
                f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                for k in keys) + " |")
        lines += ["", f"Evaluated on `{env.get('id')}` with {env.get('eval_kwargs')} "
                  "(greedy accuracy; pass@k over sampled replies where listed)."]
    else:
        lines.append("No evaluation was logged up to this step.")
    lines += ["", "## Reproduce", "", "```bash", "mmopd train config.yaml", "```",
              "(the run's resolved config, as mmopd wrote it, follows)", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def export(checkpoint: str | Path, out: str | Path, push_to_hub: str | None = None) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise ExportError(f"{checkpoint}: no such checkpoint folder")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ExportError(f"{checkpoint}: incomplete checkpoint ({problem})")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose a new folder")
    step = int(json.loads((checkpoint / MANIFEST).read_text())["step"])
    run = _run_dir(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name not in _TRAINING_ONLY:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, out / f.name)
    if not (out / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(out)).save_pretrained(out)
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if run else {}
    evals = []
    if run and (run / "eval.jsonl").is_file():
        for line in (run / "eval.jsonl").read_text().splitlines():
            try:
                evals.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a killed run
    (out / "README.md").write_text(model_card(cfg, evals, step), encoding="utf-8")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=str(out))
    return out
