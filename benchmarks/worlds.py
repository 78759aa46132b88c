"""The three tiny worlds over seeds: does distillation close the teacher-student gap, and at
what cost in sampled episodes against an outcome-reward baseline?

For every world and seed it runs the world's demo (`mmopd demo --world W --seed S`: teacher and
careless student supervised with that seed, its premise checked, the default recipe distilled)
into `runs/worlds/W-seedS/` (seed 0: the world's own demo directory, e.g. `runs/demo` after
`make demo`, when it holds a finished demo of the same recipe), then distils the same student
from the same teacher with every other arm at the same budget (same rollout batches, steps and
learning rate; only the objective or SOD differs). A seed whose premise fails (teacher not ahead
by 0.15) is reported and gets no arms. It reports, per arm, the gap closed (after - before) /
(teacher - before) with that seed's own teacher and start, final greedy accuracy, and the
episodes at which the arm's mean curve first reaches GRPO's final mean accuracy (linear
interpolation between evaluations). Runs already finished with the same config are read, not
trained again, so the sweep can span sessions. Writes `worlds_W.json`, `worlds_W.md` and
`worlds_W.png` per world.

    python benchmarks/worlds.py [--worlds math,agent,vision] [--seeds 0,1,2] [--arms A,B]
        [--runs runs/worlds] [--out benchmarks/results]

The vision world's `reopold-vllm` arm (the default recipe on vLLM rollouts) runs in the vLLM env
on the same seeds' models: `.venv-vllm/bin/python benchmarks/worlds.py --worlds vision --arms
reopold-vllm`, then the table of every arm (finished runs are read back, in either env):
`python benchmarks/worlds.py --worlds vision --arms reopold,opd,grpo,reopold-vllm`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import (  # the script's folder is on sys.path
    command,
    describe,
    jsonl_rows,
    run_seconds,
    train_or_reuse,
    written_utc,
)

from mmopd.config import SFTConfig, TrainConfig, load_config, to_dict
from mmopd.demo import GAP_BAR, WORLDS, DemoPremiseError, demo_configs, gap_closed, run_demo

# Overrides that make each arm from the world's demo config; the first arm is the default recipe
# (the demo's own distillation run). Every arm keeps the world's budget and optimiser settings.
ARMS: dict[str, dict[str, tuple[str, ...]]] = {
    "math": {
        "reopold": (),
        "opd": ("objective.name=opd",),
        "grpo": ("objective.name=grpo", "teacher.model=null"),  # outcome reward, no teacher
    },
    # the default is SOD's recipe (step weighting + GRPO episode advantage + clipped ratio) on
    # REOPOLD's reward; "reopold" drops the SOD weighting; "opd" is SOD's own form (OPD reward);
    # GRPO is the outcome advantage alone (outcome_coef 0: it is the objective itself)
    "agent": {
        "reopold+sod": (),
        "reopold": ("objective.step_weighting=none",),
        "opd+sod": ("objective.name=opd",),
        "grpo": ("objective.name=grpo", "objective.step_weighting=none",
                 "objective.outcome_coef=0", "teacher.model=null"),
    },
    "vision": {
        "reopold": (),
        "opd": ("objective.name=opd",),
        "grpo": ("objective.name=grpo", "teacher.model=null"),
        # the default recipe on vLLM rollouts (run in the vLLM env: --arms reopold-vllm)
        "reopold-vllm": ("rollout.backend=vllm",),
    },
}
# Arms that need vLLM run only when asked for by name (--arms), in an env that has it.
VLLM_ARMS = {a for arms in ARMS.values() for a, o in arms.items() if "rollout.backend=vllm" in o}
BASELINE = "grpo"
# Where the world's configs (configs/tiny, agent, vision) put its demo: a demo run there with
# seed 0 (`make demo`, `mmopd demo --world agent --out runs/agent-demo`, ...) is seed 0's.
DEMO_DIRS = {"math": "runs/demo", "agent": "runs/agent-demo", "vision": "runs/vision-demo"}


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


def demo_is_current(demo: Path, world: str, seed: int) -> bool:
    """The demo directory was built by the world's current recipe (its SFT configs match)."""
    teacher, student, _ = demo_configs(demo, world=world, seed=seed)
    for cfg, name in ((teacher, "teacher"), (student, "student-init")):
        f = demo / name / "sft_config.yaml"
        if not f.is_file() or to_dict(load_config(SFTConfig, f)) != to_dict(cfg):
            return False
    return (demo / "results.json").is_file()


def run_world(world: str, seeds: list[int], arms: list[str], runs: Path) -> dict[str, Any]:
    """Every seed's demo and arms of one world; finished runs are read back."""
    arm_runs: dict[str, list[dict]] = {a: [] for a in arms}
    premises: list[dict[str, Any]] = []
    default = next(iter(ARMS[world]))
    for seed in seeds:
        demo = runs / f"{world}-seed{seed}"
        if seed == 0 and not demo_is_current(demo, world, seed) and demo_is_current(
                Path(DEMO_DIRS[world]), world, seed):
            demo = Path(DEMO_DIRS[world])  # the world's own demo already ran
        demo_ran = not demo_is_current(demo, world, seed)  # here, not in an earlier invocation
        if demo_ran:
            print(f"== {world} seed {seed}: demo -> {demo}", flush=True)
            try:
                run_demo(demo, world=world, seed=seed)
            except DemoPremiseError as e:
                premises.append({"seed": seed, "holds": False, "error": str(e)})
                continue
        res = json.loads((demo / "results.json").read_text())
        before, teacher = res["before"]["accuracy"], res["teacher"]["accuracy"]
        premises.append({"seed": seed, "holds": True, "before": before, "teacher": teacher,
                         "demo_seconds": res["wall_seconds"]})
        base = demo_configs(demo, world=world, seed=seed)[2]
        for arm in arms:
            # the default arm is the demo's own run; the others live under arms/ (an arm may
            # be called like the demo's run directory: the agent world's "reopold")
            run_dir = demo / "reopold" if arm == default else demo / "arms" / arm
            # arms beyond the default are scored greedily only (pass@k costs time)
            cfg, reused = train_or_reuse(
                base, [*ARMS[world][arm], *(["eval.pass_k=0"] if arm != default else [])],
                run_dir, f"{world} seed {seed}: {arm}")
            per_batch = cfg.rollout.prompts_per_batch * cfg.rollout.samples_per_prompt
            evals = jsonl_rows(run_dir / "eval.jsonl")
            curve = [{"step": 0, "episodes": 0, "accuracy": before}] + [
                {"step": e["step"], "episodes": e["step"] // cfg.rollout.minibatches * per_batch,
                 "accuracy": e["accuracy"]} for e in evals]
            arm_runs[arm].append({
                "arm": arm, "seed": seed, "run_dir": str(run_dir),
                "reused": reused and not (arm == default and demo_ran),
                "seconds": run_seconds(run_dir),
                "before": before, "teacher": teacher,
                "gap_closed": gap_closed(before, curve[-1]["accuracy"], teacher),
                "curve": curve})
    arm_runs = {a: r for a, r in arm_runs.items() if r}
    out: dict[str, Any] = {"world": world, "seeds": seeds, "premises": premises,
                           "arms": {a: list(ARMS[world][a]) for a in arm_runs}}
    if arm_runs:
        out.update(summarize(arm_runs))
        out["gap_closed"] = {a: {"mean": statistics.fmean(g), "std": _std(g), "per_seed": g}
                             for a, rs in arm_runs.items()
                             for g in [[r["gap_closed"] for r in rs]]}
    out["runs"] = [r for rs in arm_runs.values() for r in rs]
    return out


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="math,agent,vision")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated world seeds")
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: each world's "
                    "arms but those on vLLM rollouts: " + "; ".join(
                        f"{w}: {','.join(a)}" for w, a in ARMS.items()) + ")")
    ap.add_argument("--runs", default="runs/worlds", help="demos and runs, one folder per seed")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    worlds = args.worlds.split(",")
    for w in worlds:
        if w not in ARMS:
            raise SystemExit(f"--worlds: unknown world {w!r}; choose from {','.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    for world in worlds:
        arms = (args.arms.split(",") if args.arms
                else [a for a in ARMS[world] if a not in VLLM_ARMS])
        bad = [a for a in arms if a not in ARMS[world]]
        if bad:
            raise SystemExit(f"--arms: unknown arm {bad[0]!r} for {world}; choose from "
                             f"{','.join(ARMS[world])}")
        t0 = time.perf_counter()
        result = {**run_world(world, seeds, arms, runs), "machine": describe(),
                  "command": command(), "written_utc": written_utc(),
                  "wall_seconds": time.perf_counter() - t0}
        stem = f"worlds_{world}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        text = markdown(result)
        (out / f"{stem}.md").write_text(text)
        print(text)
        if result["runs"]:
            plot(result, out / f"{stem}.png")


def _pm(m: float, s: float, pct: bool = False) -> str:
    return f"{m:.0%} ± {s:.0%}" if pct else f"{m:.3f} ± {s:.3f}"


def _minutes(runs: list[dict[str, Any]]) -> str:
    secs = [r["seconds"] for r in runs if r["seconds"] is not None]
    return (f"{statistics.median(secs) / 60:.1f} min" if secs else "-")


def markdown(result: dict[str, Any]) -> str:
    world = result["world"]
    w = WORLDS[world]
    lines = [f"# Tiny {world} world over seeds", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']}. This invocation: "
             f"{result['wall_seconds'] / 60:.1f} min wall "
             f"({sum(r['reused'] for r in result['runs'])} of {len(result['runs'])} runs read "
             "back from earlier invocations).", "",
             f"Env {w.env['id']} {json.dumps(w.env['kwargs'])}; the student learned from "
             f"a careless demonstrator ({json.dumps(w.student_env)}: it {w.habit}). Greedy "
             "accuracy on 200 held-out problems; gap closed = (after - before) / (teacher - "
             "before) with each seed's own teacher and start; mean ± "
             f"sample std over seeds; the bar is {GAP_BAR:.0%}.", "",
             "| seed | teacher | student before | premise (teacher ahead by 0.15) |",
             "|---:|---:|---:|---|"]
    for p in result["premises"]:
        lines.append(f"| {p['seed']} | {p.get('teacher', float('nan')):.3f} | "
                     f"{p.get('before', float('nan')):.3f} | "
                     + ("holds" if p["holds"] else "FAILS: no arms run") + " |")
    if not result["runs"]:
        return "\n".join(lines) + "\n"
    curves, gaps, reach = result["curves"], result["gap_closed"], result.get("reach", {})
    first = result["runs"][0]
    cfg = load_config(TrainConfig, Path(first["run_dir"]) / "config.yaml")
    lines += ["", f"Per run: {cfg.trainer.steps} optimiser steps, {cfg.rollout.prompts_per_batch}"
              f" prompts × {cfg.rollout.samples_per_prompt} samples per rollout batch, "
              f"{cfg.rollout.minibatches} optimiser steps per batch, lr {cfg.optim.lr:g} for "
              f"every arm; evaluation every {cfg.eval.every} steps.", "",
              "| arm | gap closed | per seed | final greedy accuracy | episodes to GRPO's final "
              "| GRPO / arm episodes | train time (median) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    target = result.get("target")
    for a, c in curves.items():
        r = reach.get(a)
        if a == BASELINE and target:
            eps = f"{target['episodes']:,.0f}"
        elif r is None or (target and target["episodes"] == 0):
            eps = "-"
        else:
            eps = "never" if r["episodes"] is None else f"{r['episodes']:,.0f}"
        ratio = "-" if r is None or (target and target["episodes"] == 0) else r["ratio_text"]
        runs = [x for x in result["runs"] if x["arm"] == a]
        lines.append(f"| {a} | {_pm(gaps[a]['mean'], gaps[a]['std'], True)} | "
                     f"{', '.join(f'{g:.0%}' for g in gaps[a]['per_seed'])} | "
                     f"{_pm(c['mean'][-1], c['std'][-1])} | {eps} | {ratio} | "
                     f"{_minutes(runs)} |")
    if target and target["episodes"] == 0:
        lines += ["", f"GRPO's final mean accuracy ({target['final_mean_accuracy']:.3f}) is not "
                  "above the shared start, so there is no episodes-to-target ratio."]
    arms = list(curves)
    c0 = curves[arms[0]]
    lines += ["", "Greedy accuracy (mean ± std over seeds) against sampled episodes:", "",
              "| step | episodes | " + " | ".join(arms) + " |",
              "|---:|---:|" + "---:|" * len(arms)]
    for i, (st, e) in enumerate(zip(c0["step"], c0["episodes"])):
        lines.append(f"| {st} | {e:,} | " + " | ".join(
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
    teachers = [p["teacher"] for p in result["premises"] if p["holds"]]
    if teachers:
        mean = statistics.fmean(teachers)
        ax.axhline(mean, color="grey", ls=":", lw=1, label=f"teacher, mean ({mean:.3f})")
    ax.set_xlabel("sampled episodes")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(f"tiny {result['world']} world, mean ± std over "
                 f"{len(result['seeds'])} seed(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
