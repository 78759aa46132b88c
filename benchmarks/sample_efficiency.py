"""Sample efficiency: REOPOLD vs plain OPD vs GRPO, held-out accuracy against sampled episodes.

Uses the teacher and the weak student that `mmopd demo` builds (it runs the demo first if they
are missing) and distils the student with the demo's config, changing only the objective (and,
in the agent world, SOD step weighting), the seed and the budget; every arm has the same
rollout budget, learning rate and evaluation. For each arm it reports the mean ± std over seeds of
held-out greedy accuracy at each evaluation, GRPO's final mean accuracy, the number of episodes
at which each distillation arm's mean curve first reaches it (linear interpolation between
evaluations) and the ratio GRPO episodes / their episodes. Writes JSON, a Markdown table and a
PNG; runs already finished with the same config are read, not trained again.

    python benchmarks/sample_efficiency.py [--world math|vision|agent] [--demo DIR]
        [--seeds 0,1,2] [--arms reopold,opd,grpo] [--steps N] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from _common import (  # the script's folder is on sys.path
    command,
    describe,
    finished_run,
    jsonl_rows,
)

from mmopd.config import TrainConfig, load_config, to_dict
from mmopd.demo import demo_configs, run_demo
from mmopd.train import train

# Overrides that make each arm; the base is the demo's distillation config of the world.
ARMS: dict[str, dict[str, tuple[str, ...]]] = {
    "math": {
        "reopold": ("objective.name=reopold",),
        # ablation: refinement (entropy selection, clipped rewards) from the first step, without
        # the exploration phase that drops the tokens whose reward is below the clipping floor
        "reopold-refine-only": ("objective.name=reopold", "objective.switch_step=0"),
        "opd": ("objective.name=opd",),
        "grpo": ("objective.name=grpo", "teacher.model=null"),  # outcome reward, no teacher
    },
    # the agent demo distils with REOPOLD + SOD; SOD needs a teacher, so GRPO runs without it
    "agent": {
        "reopold": ("objective.name=reopold", "objective.step_weighting=none"),
        "reopold+sod": ("objective.name=reopold", "objective.step_weighting=sod"),
        "opd": ("objective.name=opd", "objective.step_weighting=none"),
        "grpo": ("objective.name=grpo", "objective.step_weighting=none", "teacher.model=null"),
    },
    "vision": {
        "reopold": ("objective.name=reopold",),
        "opd": ("objective.name=opd",),
        "grpo": ("objective.name=grpo", "teacher.model=null"),
    },
}
DEMO_DIRS = {"math": "runs/demo", "agent": "runs/agent-demo", "vision": "runs/vision-demo"}
# optimiser steps per run and between evaluations, per world (the vision student learns slower)
BUDGET = {"math": (80, 10), "agent": (100, 10), "vision": (300, 50)}
BASELINE = "grpo"


def first_reach(xs: list[float], ys: list[float], target: float) -> dict[str, Any]:
    """Where the curve (xs, ys) first reaches `target`, linearly interpolated between points.
    `index` is the first point at or above it (None: never reached)."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y >= target:
            if i == 0:
                return {"index": 0, "episodes": x}
            x0, y0 = xs[i - 1], ys[i - 1]
            return {"index": i, "episodes": x0 + (target - y0) / (y - y0) * (x - x0)}
    return {"index": None, "episodes": None}


def summarize(arm_runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean ± std curves per arm (std over seeds, n − 1 in the denominator) and the episodes
    each arm needs to reach the baseline's final mean accuracy."""
    curves = {}
    for arm, runs in arm_runs.items():
        steps = [c["step"] for c in runs[0]["curve"]]
        for r in runs:
            if [c["step"] for c in r["curve"]] != steps:
                raise ValueError(f"{arm}: seeds evaluated at different steps")
        accs = [[r["curve"][i]["accuracy"] for r in runs] for i in range(len(steps))]
        curves[arm] = {
            "step": steps, "episodes": [c["episodes"] for c in runs[0]["curve"]],
            "mean": [statistics.fmean(a) for a in accs],
            "std": [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs],
            "final_per_seed": accs[-1]}
    out: dict[str, Any] = {"curves": curves}
    if BASELINE not in curves:
        return out
    base = curves[BASELINE]
    target = base["mean"][-1]
    # GRPO's own cost: where its mean curve first reaches its final mean (the full budget unless
    # it got there earlier and dipped)
    base_eps = first_reach(base["episodes"], base["mean"], target)["episodes"]
    out["target"] = {"arm": BASELINE, "final_mean_accuracy": target, "episodes": base_eps}
    reach = {}
    for arm, c in curves.items():
        if arm == BASELINE:
            continue
        hit = first_reach(c["episodes"], c["mean"], target)
        row: dict[str, Any] = {"episodes": hit["episodes"], "ratio": None, "ratio_text": None}
        if hit["index"] is None:
            row["ratio_text"] = "not reached"
        elif hit["index"] == 0:  # the shared start already reaches it: GRPO learned nothing
            row["ratio_text"] = "n/a (start ≥ target)"
        elif hit["index"] == 1:  # reached by the first evaluation: only a bound is known
            row["ratio_interpolated"] = base_eps / hit["episodes"]  # assumes a straight line
            row["ratio_bound"] = base_eps / c["episodes"][1]
            row["ratio_text"] = f">{row['ratio_bound']:.1f}×"
        else:
            row["ratio"] = base_eps / hit["episodes"]
            row["ratio_text"] = f"{row['ratio']:.1f}×"
        reach[arm] = row
    out["reach"] = reach
    return out


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="math", choices=sorted(ARMS))
    ap.add_argument("--demo", default=None, help="demo directory (default: " + ", ".join(
        f"{w} {d}" for w, d in DEMO_DIRS.items()) + ")")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: all of the "
                                                 "world's: " + "; ".join(
                                                     f"{w}: {','.join(a)}"
                                                     for w, a in ARMS.items()) + ")")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default: "
                    + ", ".join(f"{w} {b[0]}" for w, b in BUDGET.items()) + ")")
    ap.add_argument("--every", type=int, default=None, help="optimiser steps between evaluations "
                    "(default: " + ", ".join(f"{w} {b[1]}" for w, b in BUDGET.items()) + ")")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per rollout batch")
    ap.add_argument("--eval-problems", type=int, default=200, help="held-out problems per eval")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    t_start = time.perf_counter()
    load_start = _load()
    world = args.world
    steps, every = (args.steps or BUDGET[world][0]), (args.every or BUDGET[world][1])
    demo, out = Path(args.demo or DEMO_DIRS[world]), Path(args.out)
    arms = args.arms.split(",") if args.arms else list(ARMS[world])
    for a in arms:
        if a not in ARMS[world]:
            raise SystemExit(f"--arms: unknown arm {a!r} for --world {world}; "
                             f"choose from {','.join(ARMS[world])}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    if not (demo / "teacher").is_dir() or not (demo / "student-init").is_dir():
        run_demo(demo, world=world)
    base = demo_configs(demo, world=world)[2]
    budget = (f"rollout.prompts_per_batch={args.prompts}", f"trainer.steps={steps}",
              f"eval.every={every}", f"eval.num_problems={args.eval_problems}",
              "eval.pass_k=0", "eval.at_start=true")
    stem = "sample_efficiency" + ("" if world == "math" else f"_{world}")
    runs_dir = out / f"{stem}_runs"

    arm_runs: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in seeds:
            run_dir = runs_dir / f"{arm}-seed{seed}"
            cfg = load_config(TrainConfig, None, [
                f"{k}={json.dumps(v)}" for k, v in to_dict(base).items()] + [
                *budget, *ARMS[world][arm], f"trainer.seed={seed}",
                f"trainer.output_dir={run_dir}"])
            per_batch = cfg.rollout.prompts_per_batch * cfg.rollout.samples_per_prompt
            timing = run_dir / "benchmark_seconds.json"  # this run's training time, kept for
            reused = finished_run(cfg, [run_dir]) is not None  # reruns that read it back
            if not reused:
                print(f"== {arm} seed {seed} -> {run_dir}", flush=True)
                t0 = time.perf_counter()
                train(cfg)
                timing.write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                              "load_average_end": _load()}))
            evals = jsonl_rows(run_dir / "eval.jsonl")
            arm_runs.setdefault(arm, []).append({
                "arm": arm, "seed": seed, "run_dir": str(run_dir), "reused": reused,
                "seconds": (json.loads(timing.read_text())["seconds"] if timing.is_file()
                            else None),
                "curve": [{"step": e["step"],
                           "episodes": e["step"] // cfg.rollout.minibatches * per_batch,
                           "accuracy": e["accuracy"]} for e in evals]})
    summary = summarize(arm_runs)
    seconds = time.perf_counter() - t_start
    teacher = None
    demo_results = demo / "results.json"
    if demo_results.is_file():
        teacher = json.loads(demo_results.read_text()).get("teacher")
    result = {
        "world": world, "machine": describe(), "command": command(),
        "load_average_start": load_start, "load_average_end": _load(),
        "wall_seconds": seconds, "train_seconds_all_runs": sum(
            r["seconds"] or 0.0 for rs in arm_runs.values() for r in rs),
        "base_config": to_dict(base), "budget": list(budget), "arms": {
            a: list(ARMS[world][a]) for a in arms},
        "seeds": seeds, "teacher_demo_eval": teacher, **summary,
        "runs": [r for rs in arm_runs.values() for r in rs]}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = markdown(result, base)
    (out / f"{stem}.md").write_text(text)
    print(text)
    plot(result, out / f"{stem}.png")


def _minutes(runs: list[dict[str, Any]]) -> str:
    """Median and range of the runs' recorded training times."""
    secs = [r["seconds"] for r in runs if r["seconds"] is not None]
    if not secs:
        return "not recorded"
    return (f"median {statistics.median(secs) / 60:.1f} min (range {min(secs) / 60:.1f} to "
            f"{max(secs) / 60:.1f})")


def _pm(m: float, s: float) -> str:
    return f"{m:.3f} ± {s:.3f}"


def markdown(result: dict[str, Any], base: TrainConfig) -> str:
    curves = result["curves"]
    arms = list(curves)
    first = result["runs"][0]
    n_runs, n_reused = len(result["runs"]), sum(r["reused"] for r in result["runs"])
    cfg = load_config(TrainConfig, Path(first["run_dir"]) / "config.yaml")
    lines = [
        f"# Sample efficiency, tiny {result['world']} world "
        f"({cfg.env.id} {json.dumps(cfg.env.kwargs)})", "",
        f"`{result['command']}`", "",
        f"Machine: {result['machine']}; load average (1/5/15 min) {result['load_average_start']}"
        f" at the start, {result['load_average_end']} at the end (shared machine). "
        f"This invocation: {result['wall_seconds'] / 60:.1f} min wall for {n_runs} runs"
        + (f" ({n_reused} read from earlier finished runs)" if n_reused else "")
        + f"; training time per run {_minutes(result['runs'])} (a run trained while other "
        "jobs shared the cores takes longer).", "",
        f"Per run: {cfg.trainer.steps} optimiser steps, {cfg.rollout.prompts_per_batch} prompts × "
        f"{cfg.rollout.samples_per_prompt} samples per rollout batch, {cfg.rollout.minibatches} "
        f"optimiser steps per batch, one lr for every arm ({cfg.optim.lr:g}, the demo's, tuned "
        f"for REOPOLD), temperature {cfg.rollout.temperature:g}; greedy accuracy on "
        f"{cfg.eval.num_problems} held-out problems every {cfg.eval.every} steps and at the "
        f"start. Seeds {','.join(map(str, result['seeds']))}; mean ± std over seeds "
        "(sample std).", ""]
    if "target" in result and result["target"]["episodes"] == 0:
        t = result["target"]
        start = curves[t["arm"]]["mean"][0]
        lines += [
            f"{t['arm'].upper()}'s final mean greedy accuracy {t['final_mean_accuracy']:.3f} is "
            f"not above the students' shared start ({start:.3f}): within this budget it gained no "
            "accuracy, so there is no episodes-to-target ratio; compare the final accuracies "
            "and the curves.", ""]
    elif "target" in result:
        t = result["target"]
        lines += [
            f"Target: {t['arm'].upper()}'s final mean greedy accuracy "
            f"{t['final_mean_accuracy']:.3f}, first reached by its mean curve at "
            f"{t['episodes']:,.0f} episodes. Episodes to target: where an arm's mean curve first "
            "reaches it (linear interpolation between evaluations); ratio = GRPO episodes / "
            "arm episodes (\">X\": reached by the first evaluation after the start, so only the "
            "bound GRPO episodes / first-evaluation episodes is known).", ""]
    lines += ["| arm | final greedy accuracy | per seed | episodes to target | "
              "GRPO / arm episodes |", "|---|---:|---:|---:|---:|"]
    reach = result.get("reach", {})
    for a in arms:
        c = curves[a]
        r = reach.get(a)
        eps = ("-" if r is None else "never" if r["episodes"] is None
               else f"{r['episodes']:,.0f}")
        if a == result.get("target", {}).get("arm"):
            eps = f"{result['target']['episodes']:,.0f}"
        if result.get("target", {}).get("episodes") == 0:  # no ratio (text above)
            eps, r = "-", None
        lines.append(f"| {a} | {_pm(c['mean'][-1], c['std'][-1])} | "
                     f"{', '.join(f'{x:.3f}' for x in c['final_per_seed'])} | {eps} | "
                     f"{'-' if r is None else r['ratio_text']} |")
    if result.get("teacher_demo_eval"):
        te = result["teacher_demo_eval"]
        lines.append(f"| (teacher, demo eval on {te['num_problems']:.0f} problems) | "
                     f"{te['accuracy']:.3f} | | | |")
    lines += ["", "Greedy accuracy (mean ± std over seeds) against sampled episodes:", "",
              "| step | episodes | " + " | ".join(arms) + " |",
              "|---:|---:|" + "---:|" * len(arms)]
    c0 = curves[arms[0]]
    for i, (s, e) in enumerate(zip(c0["step"], c0["episodes"])):
        lines.append(f"| {s} | {e:,} | " + " | ".join(
            _pm(curves[a]["mean"][i], curves[a]["std"][i]) for a in arms) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for a, c in result["curves"].items():
        lo = [m - s for m, s in zip(c["mean"], c["std"])]
        hi = [m + s for m, s in zip(c["mean"], c["std"])]
        (line,) = ax.plot(c["episodes"], c["mean"], marker="o", ms=3, label=a)
        ax.fill_between(c["episodes"], lo, hi, color=line.get_color(), alpha=0.2)
        hit = result.get("reach", {}).get(a, {}).get("episodes")
        if hit is not None and result["target"]["episodes"] > 0:  # where it reaches the target
            ax.plot([hit], [result["target"]["final_mean_accuracy"]], marker="x", ms=8,
                    color=line.get_color())
    if "target" in result:
        t = result["target"]
        ax.axhline(t["final_mean_accuracy"], color="k", ls="--", lw=1,
                   label=f"{t['arm']} final ({t['final_mean_accuracy']:.3f})")
    te = result.get("teacher_demo_eval")
    if te:
        ax.axhline(te["accuracy"], color="grey", ls=":", lw=1,
                   label=f"teacher ({te['accuracy']:.3f})")
    ax.set_xlabel("sampled episodes")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"tiny {result['world']} world, mean ± std over "
                 f"{len(result['seeds'])} seed(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
