"""`mmopd demo [--world math|agent|vision]`: the whole pipeline on a tiny world, nothing to
download.

Builds a character tokenizer, supervises a small teacher on worked solutions (math), expert
tool-use episodes (agent) or answers about images (vision: tiny Qwen2.5-VL models), supervises a
smaller student briefly (a weak start), measures both on held-out problems, distils the student
from the teacher on its own samples (REOPOLD; with SOD step weighting in the multi-turn agent
world), and prints student before / after / teacher.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmopd.config import ModelConfig, SFTConfig, TrainConfig, load_config
from mmopd.sft import sft
from mmopd.tokenizer import build_char_tokenizer
from mmopd.train import train

TEACHER = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
           "intermediate_size": 384, "seed": 1}
STUDENT = {"hidden_size": 96, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
           "intermediate_size": 256, "seed": 2}
VL_TEACHER = {"arch": "qwen2_5_vl", "hidden_size": 128, "num_layers": 3, "num_heads": 4,
              "num_kv_heads": 2, "intermediate_size": 384, "seed": 1, "vision_depth": 2,
              "vision_hidden_size": 64, "vision_heads": 4}
VL_STUDENT = {"arch": "qwen2_5_vl", "hidden_size": 96, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "intermediate_size": 256, "seed": 2, "vision_depth": 1,
              "vision_hidden_size": 48, "vision_heads": 4}


@dataclass(frozen=True)
class World:
    """One tiny world of the demo: its env, how long each model is supervised, and how the
    student is distilled. The student is stopped early on purpose (a weak start)."""

    env: dict[str, Any]
    teacher_examples: int
    student_examples: int
    sft_lr: float
    student_epochs: int
    distill: tuple[str, ...]
    teacher_epochs: int = 3
    sft_schedule: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"warmup_steps": 0, "schedule": "constant"})
    teacher_model: dict[str, Any] = dataclasses.field(default_factory=lambda: TEACHER)
    student_model: dict[str, Any] = dataclasses.field(default_factory=lambda: STUDENT)
    vision: bool = False  # tiny Qwen2.5-VL models and a tokenizer with an image processor
    student_view_frac: float = 0.0  # student SFT examples shown in the env's teacher view


WORLDS = {
    # two-digit addition with carries: a worked solution of ~35 characters
    "math": World(
        env={"id": "mmopd/MathText-v0", "kwargs": {"level": 2}},
        teacher_examples=6000, student_examples=6500, sft_lr=3e-3, student_epochs=2,
        distill=("rollout.prompts_per_batch=64", "rollout.max_new_tokens=48", "trainer.steps=200",
                 "eval.every=40")),
    # three-digit x two-digit products through the calculator tool: a tool call, its result,
    # then "Answer: N" (two assistant turns); REOPOLD with SOD step weighting
    "agent": World(
        env={"id": "mmopd/ToolMath-v0", "kwargs": {"level": 2, "system_prompt": None}},
        teacher_examples=6000, student_examples=2560, sft_lr=1e-3, student_epochs=3,
        distill=("rollout.prompts_per_batch=32", "rollout.max_new_tokens=96",
                 "rollout.max_turns=4", "objective.step_weighting=sod", "optim.lr=1e-4",
                 "trainer.steps=100", "eval.every=20")),
    # "What color is the square inside the black frame?" on an 84 px image with one distractor
    # square: tiny Qwen2.5-VL models; the student also saw the frame's crop during its brief
    # supervision (so the crop self-teacher of configs/vision/vision_opd.yaml can read crops)
    "vision": World(
        env={"id": "mmopd/VisionQA-v0", "kwargs": {"task": "color", "image_size": 84,
                                                   "num_distractors": 1, "system_prompt": None}},
        teacher_examples=6000, student_examples=3000, sft_lr=1e-3, student_epochs=2,
        teacher_epochs=2, sft_schedule={"warmup_steps": 20, "schedule": "cosine"},
        teacher_model=VL_TEACHER, student_model=VL_STUDENT, vision=True, student_view_frac=0.5,
        distill=("rollout.prompts_per_batch=32", "rollout.max_new_tokens=24", "optim.lr=2e-4",
                 "trainer.steps=300", "eval.every=50")),
}


def demo_configs(out: Path, fast: bool = False, world: str = "math",
                 rollout: str = "hf") -> tuple[SFTConfig, SFTConfig, TrainConfig]:
    """The three runs of the demo as configs (printable, overridable, reusable in tests).
    `rollout="vllm"` samples the distillation episodes with vLLM; the student then has head
    size 32 (hidden / 32 heads, one key-value head), the smallest vLLM's CPU attention runs."""
    if world not in WORLDS:
        raise ValueError(f"unknown demo world {world!r}; choose one of {sorted(WORLDS)}")
    w = WORLDS[world]
    if rollout == "vllm":
        if w.vision:
            raise ValueError("the vLLM rollout backend samples text students; the vision world "
                             "rolls out with HF generate")
        heads = w.student_model["hidden_size"] // 32
        w = dataclasses.replace(w, student_model={**w.student_model, "num_heads": heads,
                                                  "num_kv_heads": 1})
    tok = str(out / "tokenizer")

    def supervised(tiny: dict, examples: int, epochs: int, name: str, seed: int,
                   view_frac: float = 0.0) -> SFTConfig:
        data = {"env": w.env, "num_examples": examples,
                **({"teacher_view_frac": view_frac} if view_frac else {})}
        return load_config(SFTConfig, None, [
            f"model={json.dumps({'tiny': tiny, 'tokenizer': tok})}",
            f"data={json.dumps(data)}", f"epochs={epochs}",
            "batch_size=32", f"optim={json.dumps({'lr': w.sft_lr, **w.sft_schedule})}",
            f"output_dir={out / name}", "eval_problems=0", f"seed={seed}",
        ])

    # The teacher sees all it needs; the student sees just enough to get the format and some
    # answers right.
    teacher_sft = supervised(w.teacher_model, 600 if fast else w.teacher_examples,
                             1 if fast else w.teacher_epochs, "teacher", 1)
    student_sft = supervised(w.student_model, 400 if fast else w.student_examples,
                             1 if fast else w.student_epochs, "student-init", 2,
                             w.student_view_frac)
    distill = load_config(TrainConfig, None, [
        f"model.path={out / 'student-init'}",
        f"teacher.model.path={out / 'teacher'}",
        f"env={json.dumps(w.env)}",
        "objective.name=reopold",
        "rollout.samples_per_prompt=4", "rollout.minibatches=2", "trainer.micro_batch_size=64",
        f"trainer.output_dir={out / 'reopold'}",
        "optim.lr=3e-4", "optim.warmup_steps=0", "trainer.log_every=10",  # world may override
        "eval.num_problems=200", "eval.pass_k=4", "eval.at_start=false",
        *w.distill, f"rollout.backend={rollout}",
        *(["trainer.steps=4", "eval.every=0"] if fast else []),
    ])
    return teacher_sft, student_sft, distill


def run_demo(out: str | Path = "runs/demo", fast: bool = False,
             world: str = "math", rollout: str = "hf") -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    build_char_tokenizer(out / "tokenizer", vision=WORLDS[world].vision)
    teacher_sft, student_sft, distill = demo_configs(out, fast, world, rollout)

    data = {"math": "worked solutions", "agent": "expert episodes"}.get(world, "answers")
    print(f"== 1/4 supervised teacher on {data}")
    sft(teacher_sft)
    print("== 2/4 weak student: brief supervision")
    sft(student_sft)

    from mmopd.envs import make_env
    from mmopd.evaluate import EnvPool, evaluate
    from mmopd.models import load_model, load_tokenizer, load_vision

    env = distill.env  # the held-out split the training run evaluates on
    pool = EnvPool(lambda: make_env(env.id, **{**env.kwargs, **env.eval_kwargs}))

    def measure(cfg_model: ModelConfig) -> dict[str, float]:
        tokz = load_tokenizer(cfg_model)
        vision = load_vision(cfg_model, tokz)
        model = load_model(cfg_model, tokz, vision=vision)
        res = evaluate(model, tokz, pool, num_problems=distill.eval.num_problems,
                       pass_k=distill.eval.pass_k, max_new_tokens=distill.rollout.max_new_tokens,
                       max_turns=distill.rollout.max_turns, seed=distill.trainer.seed,
                       env_id=env.id, vision=vision)
        return {**res, "params": sum(p.numel() for p in model.parameters())}

    print("== 3/4 measuring teacher and student before distillation")
    before = measure(distill.model)
    teacher = measure(distill.teacher.model)
    print(f"teacher accuracy {teacher['accuracy']:.3f}, student {before['accuracy']:.3f}")

    print(f"== 4/4 {_method(distill)} on the student's own samples")
    result = train(distill)
    after = result["eval"]
    seconds = time.perf_counter() - t_start
    rows = [("student before", before, before["params"]),
            (f"student after ({_method(distill)})", after, before["params"]),
            ("teacher", teacher, teacher["params"])]
    k = distill.eval.pass_k
    table = [f"| model | params | greedy accuracy | pass@{k} | mean reply tokens |",
             "|---|---:|---:|---:|---:|"]
    for name, r, n_params in rows:
        table.append(f"| {name} | {n_params:,} | {r['accuracy']:.3f} | {r.get(f'pass@{k}', 0):.3f}"
                     f" | {r['mean_response_tokens']:.1f} |")
    ratio = after["accuracy"] / max(teacher["accuracy"], 1e-9)
    summary = {"before": before, "after": after, "teacher": teacher,
               "after_over_teacher": ratio, "wall_seconds": seconds,
               "curves": str(out / "reopold" / "curves.png")}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    text = "\n".join(table) + (f"\n\nstudent after / teacher accuracy: {ratio:.1%}; "
                               f"wall time {seconds / 60:.1f} min; curves: {summary['curves']}")
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)
    return summary


def _method(cfg: TrainConfig) -> str:
    name = cfg.objective.name.upper()
    return name + (" + SOD" if cfg.objective.step_weighting == "sod" else "")
