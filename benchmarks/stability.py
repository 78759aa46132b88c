"""Where REOPOLD's relaxation matters: REOPOLD (in its paper's form and in mmopd's former one)
vs OPD on the tiny math world over learning rates and optimiser steps per rollout batch.

REOPOLD's premise is instability — heavy negative token rewards and importance ratios far from 1
— which its reward floor and token selection are meant to tame. This sweep probes it: for each
lr in --lrs and each number of minibatches (optimiser steps per rollout batch; more of them move
rho further from 1 within a batch) in --minibatches, both objectives distil the same careless
student from the same teacher (the math world's demo of that seed, built by benchmarks/worlds.py
into runs/worlds/math-seedS, or here if missing) for the same number of optimiser steps, at a
constant learning rate (the world's recipe decays it, which would hide a late collapse).
`reopold` is the paper's form (PPO's ratio clip [0.8, 1.2], the reward at the parameters being
updated, the per-query normaliser: mmopd's default), `reopold-former` mmopd's former one (the
reward at pi_old, the minibatch normaliser, no clip), `opd` OPD's own (reward at pi_old, no
clip). It
reports final and worst greedy accuracy, the gap closed, whether the run collapsed (accuracy
below half the start at any evaluation), and the largest |rho - 1| and grad norm seen. Runs
already finished with the same config are read, not trained again.

    python benchmarks/stability.py [--lrs 1e-4,3e-4,1e-3] [--minibatches 1,4] [--seeds 0,1]
        [--objectives reopold,reopold-former,opd] [--runs runs/worlds] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import command, describe, jsonl_rows, run_seconds, train_or_reuse, written_utc
from worlds import demo_is_current

from mmopd.demo import demo_configs, gap_closed, run_demo

WORLD = "math"
VARIANTS: dict[str, tuple[str, ...]] = {
    "reopold": ("objective.name=reopold",),
    "reopold-former": ("objective.name=reopold", "objective.reward_at=rollout",
                       "objective.normaliser=batch", "objective.ratio_clip=null"),
    "opd": ("objective.name=opd",),
}


def one_run(demo: Path, seed: int, objective: str, lr: float, minibatches: int
            ) -> dict[str, Any]:
    base = demo_configs(demo, world=WORLD, seed=seed)[2]
    run_dir = demo / "stability" / f"{objective}-lr{lr:g}-mb{minibatches}"
    _, reused = train_or_reuse(
        base, [*VARIANTS[objective], f"optim.lr={lr}", "optim.schedule=constant",
               f"rollout.minibatches={minibatches}", "eval.pass_k=0"],
        run_dir, f"seed {seed}: {objective} lr {lr:g} minibatches {minibatches}")
    evals = jsonl_rows(run_dir / "eval.jsonl")
    steps = jsonl_rows(run_dir / "metrics.jsonl")
    return {"objective": objective, "lr": lr, "minibatches": minibatches, "seed": seed,
            "reused": reused, "accuracy": [e["accuracy"] for e in evals],
            "max_ratio_dev": max(abs(m["ratio_mean"] - 1) for m in steps),
            "max_clipped_frac": max((m.get("ratio_clipped_frac", 0.0) for m in steps),
                                    default=0.0),
            "max_grad_norm": max(m["grad_norm"] for m in steps),
            "seconds": run_seconds(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--minibatches", default="1,4")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--objectives", default=",".join(VARIANTS))
    ap.add_argument("--runs", default="runs/worlds")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lrs = [float(x) for x in args.lrs.split(",")]
    mbs = [int(x) for x in args.minibatches.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    objectives = args.objectives.split(",")
    bad = [o for o in objectives if o not in VARIANTS]
    if bad:
        raise SystemExit(f"--objectives: unknown {bad[0]!r}; choose from {','.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        demo = Path(args.runs) / f"{WORLD}-seed{seed}"
        if not demo_is_current(demo, WORLD, seed):
            run_demo(demo, world=WORLD, seed=seed)  # raises if the premise fails
        res = json.loads((demo / "results.json").read_text())
        before, teacher = res["before"]["accuracy"], res["teacher"]["accuracy"]
        for objective in objectives:
            for lr in lrs:
                for mb in mbs:
                    r = one_run(demo, seed, objective, lr, mb)
                    r.update(before=before, teacher=teacher,
                             gap_closed=gap_closed(before, r["accuracy"][-1], teacher),
                             collapsed=min(r["accuracy"]) < before / 2)
                    runs.append(r)
    result = {"world": WORLD, "machine": describe(), "command": command(),
              "written_utc": written_utc(), "runs": runs,
              "wall_seconds": time.perf_counter() - t0}
    (out / "stability.json").write_text(json.dumps(result, indent=2))
    text = markdown(result, objectives, lrs, mbs)
    (out / "stability.md").write_text(text)
    print(text)
    plot(result, objectives, lrs, mbs, out / "stability.png")


def _cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [r["accuracy"][-1] for r in runs]
    return {"final": statistics.fmean(finals), "finals": finals,
            "worst": min(min(r["accuracy"]) for r in runs),
            "gap": statistics.fmean(r["gap_closed"] for r in runs),
            "collapsed": sum(r["collapsed"] for r in runs), "n": len(runs),
            "ratio": max(r["max_ratio_dev"] for r in runs),
            "grad": max(r["max_grad_norm"] for r in runs),
            "clipped": max(r.get("max_clipped_frac", 0.0) for r in runs)}


def markdown(result: dict[str, Any], objectives: list[str], lrs: list[float],
             mbs: list[int]) -> str:
    runs = result["runs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = ["# Stability: REOPOLD (paper's form, former form) vs OPD over learning rate and "
             "minibatches (tiny math world)",
             "", f"`{result['command']}`", "",
             f"Machine: {result['machine']}. This invocation: {result['wall_seconds'] / 60:.1f} "
             f"min wall ({sum(r['reused'] for r in runs)} of {len(runs)} runs read back). Seeds "
             f"{', '.join(map(str, seeds))}; each cell: mean final greedy accuracy (per seed), "
             "the worst accuracy at any evaluation, the mean gap closed, collapsed runs (an "
             "evaluation below half the start), and the largest |mean rho - 1| and grad norm of "
             "any step, and the largest fraction of kept tokens the ratio clip took out.", "",
             "| objective | lr | minibatches | final | per seed | worst | gap closed | "
             "collapsed | max abs(rho - 1) | max grad norm | max clipped |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for obj in objectives:
        for lr in lrs:
            for mb in mbs:
                cell = [r for r in runs if (r["objective"], r["lr"], r["minibatches"])
                        == (obj, lr, mb)]
                if not cell:
                    continue
                c = _cell(cell)
                lines.append(f"| {obj} | {lr:g} | {mb} | {c['final']:.3f} | "
                             f"{', '.join(f'{x:.3f}' for x in c['finals'])} | {c['worst']:.3f} "
                             f"| {c['gap']:.0%} | {c['collapsed']}/{c['n']} | {c['ratio']:.3f} "
                             f"| {c['grad']:.2f} | {c['clipped']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], objectives: list[str], lrs: list[float], mbs: list[int],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mbs), figsize=(4.5 * len(mbs), 3.6), squeeze=False)
    for ax, mb in zip(axes[0], mbs):
        for obj in objectives:
            cells = [[r for r in result["runs"] if (r["objective"], r["lr"], r["minibatches"])
                      == (obj, lr, mb)] for lr in lrs]
            xs = [lr for lr, c in zip(lrs, cells) if c]
            finals = [_cell(c)["final"] for c in cells if c]
            worst = [_cell(c)["worst"] for c in cells if c]
            (line,) = ax.plot(xs, finals, marker="o", label=f"{obj} final")
            ax.plot(xs, worst, marker="x", ls="--", color=line.get_color(),
                    label=f"{obj} worst")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{mb} optimiser step(s) per rollout batch")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("held-out greedy accuracy")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
