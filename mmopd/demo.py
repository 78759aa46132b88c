"""`mmopd demo [--world math|agent|vision]`: the whole pipeline on a tiny world, nothing to
download, with a check of its own premise and a verdict it can defend.

Each world has a gap that is a behaviour, not luck: the teacher is supervised on careful
demonstrations, the student on a careless demonstrator's, which skip the world's skill part of
the time — the carry of column addition (math), the calculator call before the answer (agent),
the square inside the frame rather than the other one (vision). Both are supervised to
convergence, so the student is well formatted and has seen the skill, but it prefers to skip it:
its greedy replies skip it, its samples sometimes don't, and the teacher's token scores say which
is which. The demo measures both models on held-out problems, refuses to go on when the teacher
is not clearly ahead, distils the student on its own samples and reports the share of the gap it
closed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmopd.config import ModelConfig, SFTConfig, TrainConfig, load_config
from mmopd.tokenizer import build_char_tokenizer
from mmopd.training.loop import train
from mmopd.training.sft import sft

TEACHER = {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
           "intermediate_size": 384, "seed": 1}
# Head size 32 everywhere (hidden / heads): the smallest vLLM's CPU attention runs, so every model
# the demo writes can be served, and its distillation can roll out in vLLM (--rollout vllm)
STUDENT = {"hidden_size": 96, "num_layers": 3, "num_heads": 3, "num_kv_heads": 1,
           "intermediate_size": 256, "seed": 2}
VL_TEACHER = {"arch": "qwen2_5_vl", "hidden_size": 128, "num_layers": 3, "num_heads": 4,
              "num_kv_heads": 2, "intermediate_size": 384, "seed": 1, "vision_depth": 2,
              "vision_hidden_size": 64, "vision_heads": 4}
VL_STUDENT = {"arch": "qwen2_5_vl", "hidden_size": 96, "num_layers": 3, "num_heads": 3,
              "num_kv_heads": 1, "intermediate_size": 256, "seed": 2, "vision_depth": 1,
              "vision_hidden_size": 48, "vision_heads": 4}
PREMISE_MARGIN = 0.15  # the teacher must lead the student by this much before distilling
GAP_BAR = 0.9  # the share of the gap a world's default recipe is expected to close


class DemoPremiseError(RuntimeError):
    """The teacher is not clearly ahead of the student: distillation has nothing to show."""


@dataclass(frozen=True)
class World:
    """One tiny world of the demo: its env, the careless demonstrations the student learns
    from, how long each model is supervised, and how the student is distilled."""

    env: dict[str, Any]
    student_env: dict[str, Any]  # env kwargs of the student's supervision (careless demos)
    habit: str  # the careless demonstrator's habit, which the student picks up
    teacher_examples: int
    student_examples: int
    sft_lr: float
    distill: tuple[str, ...]
    teacher_epochs: int = 3
    student_epochs: int = 3
    sft_schedule: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"warmup_steps": 30, "schedule": "cosine"})
    teacher_model: dict[str, Any] = dataclasses.field(default_factory=lambda: TEACHER)
    student_model: dict[str, Any] = dataclasses.field(default_factory=lambda: STUDENT)
    vision: bool = False  # tiny Qwen2.5-VL models and a tokenizer with an image processor
    student_view_frac: float = 0.0  # student SFT examples shown in the env's teacher view


WORLDS = {
    # two-digit addition in worked column steps; the careless solver forgets 70 % of carries.
    # The student gets twice the teacher's examples so the few carried ones still teach it
    # every three-term column sum (with 6,000 it knew only half of them; then distillation has
    # facts to teach, not just the habit). The learning rate decays (cosine): at a constant one
    # the greedy accuracy sagged late in refinement (0.98 -> 0.88 over the last 20 steps of one
    # run; final 0.990 / 0.935 / 0.970 over 3 seeds, against 1.000 on each with the decay)
    "math": World(
        env={"id": "mmopd/MathText-v0", "kwargs": {"level": 2}},
        student_env={"careless": 0.7}, habit="forgets the carry 70 % of the time",
        teacher_examples=6000, student_examples=12000, sft_lr=3e-3,
        distill=("rollout.prompts_per_batch=64", "rollout.max_new_tokens=48", "trainer.steps=100",
                 "optim.schedule=cosine", "eval.every=20")),
    # two-digit x two-digit products: "Action: calculator[12*45]", the result, then
    # "Answer: N" (two assistant turns); the careless demonstrator answers from its head 60 % of
    # the time (lr 1e-3: at 3e-3 the teacher never learned to copy the expression). With
    # three-digit x two-digit products (4 or 5 digits) the distilled student called the tool
    # but miscopied its result (7910 -> 77910) on up to a third of the problems: even careful
    # demonstrations alone took this student to 0.885 only. SOD's recipe: step-weighted
    # distillation reward plus the GRPO episode advantage, PPO-clipped ratios; REOPOLD's
    # agentic beta 0.4
    "agent": World(
        env={"id": "mmopd/ToolMath-v0", "kwargs": {"level": 1, "system_prompt": None,
                                                   "call_format": "react"}},
        student_env={"careless": 0.6},
        habit="answers from its head, without the calculator, 60 % of the time",
        teacher_examples=6000, student_examples=9000, sft_lr=1e-3,
        distill=("rollout.prompts_per_batch=32", "rollout.max_new_tokens=32",
                 "rollout.max_turns=3", "objective.step_weighting=sod",
                 "objective.outcome_coef=1.0", "objective.ratio_clip=[0.8, 1.28]",
                 "objective.beta=0.4", "trainer.steps=60", "eval.every=20")),
    # "What color is the square inside the black frame?" on an 84 px image with one distractor
    # square: tiny Qwen2.5-VL models; the careless captioner names the other square 70 % of the
    # time. Half of its examples show the frame's crop (the env's teacher view, where the
    # captioner is exact: no distractor shows), so the crop self-teacher of
    # configs/vision/vision_opd.yaml can read crops. The squares sit on the 3 x 3 grid of 28 px
    # cells, one merged visual token each: placed anywhere, the tiny VLM teacher reached only
    # 0.52-0.815; on the grid, 1.000 at lr 1e-3 (3e-3 left one seed's teacher at 0.460). The
    # student's language model has 3 layers: with 2, even careful demonstrations alone took it
    # to 0.87 only, below the gap the world asks it to close
    "vision": World(
        env={"id": "mmopd/VisionQA-v0", "kwargs": {"task": "color", "image_size": 84,
                                                   "num_distractors": 1, "layout": "grid",
                                                   "system_prompt": None}},
        student_env={"careless": 0.7},
        habit="names the square outside the frame 70 % of the time",
        teacher_examples=6000, student_examples=6000, sft_lr=1e-3,
        teacher_epochs=2, student_epochs=2, sft_schedule={"warmup_steps": 20, "schedule": "cosine"},
        teacher_model=VL_TEACHER, student_model=VL_STUDENT, vision=True, student_view_frac=0.5,
        distill=("rollout.prompts_per_batch=32", "rollout.max_new_tokens=24", "optim.lr=2e-4",
                 "trainer.steps=150", "eval.every=30")),
}


def demo_configs(out: Path, fast: bool = False, world: str = "math", rollout: str = "hf",
                 seed: int = 0) -> tuple[SFTConfig, SFTConfig, TrainConfig]:
    """The three runs of the demo as configs (printable, overridable, reusable in tests).
    `seed` moves every seed of the world (both models' initialisations and supervision, the
    distillation run), for sweeps over seeds. `rollout="vllm"` samples the distillation
    episodes with vLLM (the models are the same either way)."""
    if world not in WORLDS:
        raise ValueError(f"unknown demo world {world!r}; choose one of {sorted(WORLDS)}")
    w = WORLDS[world]
    tok = str(out / "tokenizer")

    def supervised(tiny: dict, env_kwargs: dict, examples: int, epochs: int, name: str,
                   sft_seed: int, view_frac: float = 0.0) -> SFTConfig:
        env = {**w.env, "kwargs": {**w.env["kwargs"], **env_kwargs}}
        data = {"env": env, "num_examples": examples,
                **({"teacher_view_frac": view_frac} if view_frac else {})}
        model = {"tiny": {**tiny, "seed": tiny["seed"] + 100 * seed}, "tokenizer": tok}
        return load_config(SFTConfig, None, [
            f"model={json.dumps(model)}", f"data={json.dumps(data)}", f"epochs={epochs}",
            "batch_size=32", f"optim={json.dumps({'lr': w.sft_lr, **w.sft_schedule})}",
            f"output_dir={out / name}", "eval_problems=0", f"seed={sft_seed + 100 * seed}",
        ])

    # Both are supervised to convergence; only the demonstrations differ.
    teacher_sft = supervised(w.teacher_model, {}, 600 if fast else w.teacher_examples,
                             1 if fast else w.teacher_epochs, "teacher", 1)
    student_sft = supervised(w.student_model, w.student_env, 400 if fast else w.student_examples,
                             1 if fast else w.student_epochs, "student-init", 2,
                             w.student_view_frac)
    distill = load_config(TrainConfig, None, [
        f"model.path={out / 'student-init'}",
        f"teacher.model.path={out / 'teacher'}",
        f"env={json.dumps(w.env)}",
        "objective.name=reopold",
        "rollout.samples_per_prompt=4", "rollout.minibatches=2", "trainer.micro_batch_size=64",
        f"trainer.output_dir={out / 'reopold'}", f"trainer.seed={seed}",
        "optim.lr=3e-4", "optim.warmup_steps=0", "trainer.log_every=10",  # world may override
        "eval.num_problems=200", "eval.pass_k=4", "eval.at_start=false",
        *w.distill, f"rollout.backend={rollout}",
        *(["trainer.steps=4", "eval.every=0"] if fast else []),
    ])
    return teacher_sft, student_sft, distill


def gap_closed(before: float, after: float, teacher: float) -> float:
    """(after - before) / (teacher - before): 1 = the student reached the teacher."""
    return (after - before) / (teacher - before)


def verdict(before: float, after: float, teacher: float) -> str:
    """One line on what distillation did, judged against the world's bar."""
    closed = gap_closed(before, after, teacher)
    if after < before:
        return (f"verdict: FAILED: the student got worse ({before:.3f} -> {after:.3f}, "
                f"teacher {teacher:.3f})")
    if closed >= GAP_BAR:
        return (f"verdict: distillation closed {closed:.0%} of the gap to the teacher "
                f"({before:.3f} -> {after:.3f}, teacher {teacher:.3f}; bar {GAP_BAR:.0%})")
    return (f"verdict: SHORT: distillation closed only {closed:.0%} of the gap "
            f"({before:.3f} -> {after:.3f}, teacher {teacher:.3f}; bar {GAP_BAR:.0%})")


def check_premise(before: float, teacher: float, world: str) -> None:
    """Raise DemoPremiseError unless the teacher leads the student by PREMISE_MARGIN."""
    if teacher - before < PREMISE_MARGIN:
        raise DemoPremiseError(
            f"the {world} world's premise does not hold: the teacher's held-out accuracy "
            f"({teacher:.3f}) is not ahead of the student's ({before:.3f}) by "
            f"{PREMISE_MARGIN}, so distillation would have nothing to show; nothing was "
            "distilled. The supervised models are in the run directory for a look; a teacher "
            "that failed to learn needs more supervision (teacher examples or epochs)")


def run_demo(out: str | Path = "runs/demo", fast: bool = False, world: str = "math",
             rollout: str = "hf", seed: int = 0) -> dict[str, Any]:
    """Supervise teacher and student, measure both, check the premise, distil, judge.
    `fast` is a smoke run of the pipeline: its models are too briefly supervised for the
    premise to hold, so it is reported, not enforced, and no verdict is given."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher_sft, student_sft, distill = demo_configs(out, fast, world, rollout, seed)
    w = WORLDS[world]
    build_char_tokenizer(out / "tokenizer", vision=w.vision)

    print("== 1/4 teacher: supervised on careful demonstrations")
    sft(teacher_sft)
    print(f"== 2/4 student: supervised on a careless demonstrator's (it {w.habit})")
    sft(student_sft)

    from mmopd.envs import make_env
    from mmopd.models import load_model, load_tokenizer, load_vision
    from mmopd.rollout.evaluate import EnvPool, evaluate

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
    lead = teacher["accuracy"] - before["accuracy"]
    print(f"teacher accuracy {teacher['accuracy']:.3f}, student {before['accuracy']:.3f}: "
          f"the teacher leads by {lead:+.3f} (the premise needs {PREMISE_MARGIN})")
    if fast:
        print("(--fast: a smoke run of the pipeline; the premise is not enforced)")
    else:
        check_premise(before["accuracy"], teacher["accuracy"], world)

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
    acc = before["accuracy"], after["accuracy"], teacher["accuracy"]
    closed = gap_closed(*acc) if lead > 0 else float("nan")
    line = ("verdict: none (--fast smoke run: its models are too briefly supervised to judge)"
            if fast else verdict(*acc))
    summary = {"world": world, "seed": seed, "before": before, "after": after,
               "teacher": teacher, "gap_closed": closed, "verdict": line,
               "wall_seconds": seconds, "curves": str(out / "reopold" / "curves.png")}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    shown = "n/a (the teacher is not ahead)" if lead <= 0 else f"{closed:.1%}"
    text = "\n".join(table) + (f"\n\ngap closed: {shown}\n{line}\n"
                               f"wall time {seconds / 60:.1f} min; curves: {summary['curves']}")
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)
    return summary


def _method(cfg: TrainConfig) -> str:
    name = cfg.objective.name.upper()
    return name + (" + SOD" if cfg.objective.step_weighting == "sod" else "")
