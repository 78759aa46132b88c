"""REOPOLD's ablation ladder (its paper's Section 5.3, Result 3) on the tiny worlds: what each of
its pieces adds, rung by rung, at the same budget.

Every rung distils the world's careless student from its teacher (the world's demo of that seed,
built by benchmarks/worlds.py into runs/worlds/W-seedS, or here if missing) with the world's
default recipe's budget (rollout batches, optimiser steps, learning rate and schedule, two
optimiser steps per rollout batch, so that the reward at the current policy and the per-query
normaliser matter), all in the paper's training form: PPO's ratio clip [0.8, 1.2], the reward at
the parameters being updated, the kept tokens of each query as the normaliser.

    rkl        token_rkl: the reward R(theta) = log pi_T - log pi_theta keeps its gradient
    +sg        opd: stop-gradient on R
    +clip      reopold refining from the first iteration with beta 1: every token, rewards
               clipped at ln(lambda) / (1 - lambda)
    +entropy   reopold refining from the first iteration: the top-beta entropy tokens
    +schedule  reopold: exploration (below-floor tokens dropped), then refinement (the default)
    former     the default recipe in mmopd's former form: the reward at pi_old, the minibatch's
               kept tokens as the normaliser, no ratio clip

Per rung: the gap closed (after - before) / (teacher - before), mean ± std over seeds; the
episodes each seed needs to first reach 90 % of its gap (linear interpolation between
evaluations; "never" when it does not); the mean student entropy over each quarter of training
(from metrics.jsonl); the greedy accuracy curves. Runs already finished with the same config are
read, not trained again.

    python benchmarks/ladder.py [--worlds math,vision] [--seeds 0,1,2] [--rungs A,B]
        [--runs runs/worlds] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import command, describe, jsonl_rows, run_seconds, train_or_reuse, written_utc
from worlds import DEMO_DIRS, demo_is_current, first_reach

from mmopd.demo import DemoPremiseError, demo_configs, gap_closed, run_demo

# reopold and token_rkl train in the paper's form by default; opd is given it
PAPER_FORM = ("objective.ratio_clip=[0.8, 1.2]", "objective.reward_at=current",
              "objective.normaliser=query")
RUNGS: dict[str, tuple[str, ...]] = {
    "rkl": ("objective.name=token_rkl",),
    "+sg": ("objective.name=opd", *PAPER_FORM),
    "+clip": ("objective.name=reopold", "objective.switch_step=0", "objective.beta=1.0"),
    "+entropy": ("objective.name=reopold", "objective.switch_step=0"),
    "+schedule": (),  # the world's default recipe: its demo's own run (benchmarks/worlds.py's)
    "former": ("objective.name=reopold", "objective.reward_at=rollout",
               "objective.normaliser=batch", "objective.ratio_clip=null"),
}
REACH = 0.9  # the share of the gap whose first crossing is reported


def quarters(rows: list[dict[str, Any]], key: str) -> list[float | None]:
    """The mean of `key` over each quarter of the run's optimiser steps."""
    n = len(rows)
    out: list[float | None] = []
    for q in range(4):
        vals = [r[key] for r in rows[q * n // 4:(q + 1) * n // 4] if key in r]
        out.append(statistics.fmean(vals) if vals else None)
    return out


def run_rungs(world: str, seeds: list[int], rungs: list[str], runs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"world": world, "seeds": seeds, "premises": [], "runs": []}
    for seed in seeds:
        demo = runs / f"{world}-seed{seed}"
        if seed == 0 and not demo_is_current(demo, world, seed) and demo_is_current(
                Path(DEMO_DIRS[world]), world, seed):
            demo = Path(DEMO_DIRS[world])
        if not demo_is_current(demo, world, seed):
            try:
                run_demo(demo, world=world, seed=seed)
            except DemoPremiseError as e:
                out["premises"].append({"seed": seed, "holds": False, "error": str(e)})
                continue
        res = json.loads((demo / "results.json").read_text())
        before, teacher = res["before"]["accuracy"], res["teacher"]["accuracy"]
        out["premises"].append({"seed": seed, "holds": True, "before": before,
                                "teacher": teacher})
        base = demo_configs(demo, world=world, seed=seed)[2]
        for rung in rungs:
            default = not RUNGS[rung]  # the demo's own run, shared with benchmarks/worlds.py
            run_dir = demo / "reopold" if default else demo / "ladder" / rung.replace("+", "plus-")
            cfg, reused = train_or_reuse(
                base, [*RUNGS[rung], *([] if default else ["eval.pass_k=0"])], run_dir,
                f"{world} seed {seed}: {rung}")
            per_batch = cfg.rollout.prompts_per_batch * cfg.rollout.samples_per_prompt
            evals = jsonl_rows(run_dir / "eval.jsonl")
            metrics = [m for m in jsonl_rows(run_dir / "metrics.jsonl") if "loss" in m]
            xs = [0] + [e["step"] // cfg.rollout.minibatches * per_batch for e in evals]
            ys = [before] + [e["accuracy"] for e in evals]
            target = before + REACH * (teacher - before)
            out["runs"].append({
                "world": world, "rung": rung, "seed": seed, "run_dir": str(run_dir),
                "reused": reused, "seconds": run_seconds(run_dir), "before": before,
                "teacher": teacher, "gap_closed": gap_closed(before, ys[-1], teacher),
                "episodes_to_90": first_reach(xs, ys, target)["episodes"],
                "curve": list(zip(xs, ys)),
                "entropy_quarters": quarters(metrics, "student_entropy"),
                "kept_quarters": quarters(metrics, "update_kept_frac"),
                "clipped_max": max((m.get("ratio_clipped_frac", 0.0) for m in metrics),
                                   default=0.0)})
    return out


def _pm(xs: list[float], pct: bool = False) -> str:
    m = statistics.fmean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.0%} ± {s:.0%}" if pct else f"{m:.3f} ± {s:.3f}"


def markdown(results: list[dict[str, Any]], rungs: list[str], meta: dict[str, Any]) -> str:
    lines = ["# REOPOLD's ablation ladder on the tiny worlds", "", f"`{meta['command']}`", "",
             f"Machine: {meta['machine']}; {meta['wall_seconds'] / 60:.1f} min wall "
             f"({sum(r['reused'] for res in results for r in res['runs'])} runs read back). "
             "Every rung at the world's default budget with two optimiser steps per rollout "
             "batch, in the paper's form (ratio clip [0.8, 1.2], the reward at the current "
             "policy, the per-query normaliser) but `former` (mmopd's former REOPOLD: reward at "
             f"pi_old, minibatch normaliser, no clip). Episodes to {REACH:.0%} of the gap: "
             "each seed's first crossing (interpolated), mean over the seeds that reach it. "
             "Student entropy: mean over each quarter of the run.", ""]
    for res in results:
        lines += [f"## {res['world']}", "", "| seed | teacher | before |", "|---:|---:|---:|"]
        for p in res["premises"]:
            lines.append(f"| {p['seed']} | {p.get('teacher', float('nan')):.3f} | "
                         f"{p.get('before', float('nan')):.3f} |" if p["holds"] else
                         f"| {p['seed']} | premise fails | |")
        lines += ["", f"| rung | gap closed | per seed | episodes to {REACH:.0%} of the gap | "
                  "entropy by quarter | kept by quarter | max clipped frac |",
                  "|---|---:|---:|---:|---|---|---:|"]
        for rung in rungs:
            rs = [r for r in res["runs"] if r["rung"] == rung]
            if not rs:
                continue
            eps = [r["episodes_to_90"] for r in rs]
            got = [e for e in eps if e is not None]
            reach = (f"{statistics.fmean(got):,.0f}" if got else "never") + (
                f" ({len(got)} of {len(eps)})" if len(got) < len(eps) else "")
            ent = [statistics.fmean(x) for x in zip(*[r["entropy_quarters"] for r in rs])
                   if None not in x]
            kept = [statistics.fmean(x) for x in zip(*[r["kept_quarters"] for r in rs])
                    if None not in x]
            lines.append(
                f"| {rung} | {_pm([r['gap_closed'] for r in rs], True)} | "
                f"{', '.join(format(r['gap_closed'], '.0%') for r in rs)} | {reach} | "
                f"{' / '.join(f'{e:.3f}' for e in ent)} | "
                f"{' / '.join(f'{k:.2f}' for k in kept)} | "
                f"{max(r['clipped_max'] for r in rs):.3f} |")
        first = [r for r in res["runs"] if r["rung"] == rungs[0]]
        if first:
            xs = [x for x, _ in first[0]["curve"]]
            lines += ["", "Greedy accuracy, mean over seeds:", "",
                      "| episodes | " + " | ".join(rungs) + " |",
                      "|---:|" + "---:|" * len(rungs)]
            for i, x in enumerate(xs):
                cells = []
                for rung in rungs:
                    rs = [r for r in res["runs"] if r["rung"] == rung]
                    cells.append(f"{statistics.fmean(r['curve'][i][1] for r in rs):.3f}"
                                 if rs else "-")
                lines.append(f"| {x:,} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], rungs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for rung in rungs:
            rs = [r for r in res["runs"] if r["rung"] == rung]
            if not rs:
                continue
            xs = [x for x, _ in rs[0]["curve"]]
            ys = [statistics.fmean(r["curve"][i][1] for r in rs) for i in range(len(xs))]
            ax.plot(xs, ys, marker="o", label=rung, linestyle="--" if rung == "former" else "-")
        ax.set_title(f"{res['world']} world, mean over seeds")
        ax.set_xlabel("sampled episodes")
        ax.set_ylabel("greedy accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="math,vision")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rungs", default=",".join(RUNGS))
    ap.add_argument("--runs", default="runs/worlds")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rungs = args.rungs.split(",")
    bad = [r for r in rungs if r not in RUNGS]
    if bad:
        raise SystemExit(f"--rungs: unknown rung {bad[0]!r}; choose from {','.join(RUNGS)}")
    t0 = time.perf_counter()
    results = [run_rungs(w, [int(s) for s in args.seeds.split(",")], rungs, Path(args.runs))
               for w in args.worlds.split(",")]
    meta = {"machine": describe(), "command": command(), "written_utc": written_utc(),
            "wall_seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps({**meta, "rungs": {r: list(RUNGS[r])
                                                                   for r in rungs},
                                                 "results": results}, indent=2))
    text = markdown(results, rungs, meta)
    (out / "ladder.md").write_text(text)
    print(text)
    plot(results, rungs, out / "ladder.png")


if __name__ == "__main__":
    main()
