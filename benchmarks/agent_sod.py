"""SOD vs no SOD at equal samples on the tiny agent world (multi-turn calculator tool use).

Uses the teacher and the weak student that `mmopd demo --world agent` builds (it runs the demo
first if they are missing), then distils the student with the demo's REOPOLD config twice per
seed — `objective.step_weighting` sod and none — with identical rollout budgets, and reports
held-out greedy accuracy, pass@4 and per-sample accuracy against the number of sampled episodes.
Writes JSON, a Markdown table and a PNG.

    python benchmarks/agent_sod.py [--demo runs/agent-demo] [--seeds 0] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import (  # the script's folder is on sys.path
    command,
    describe,
    finished_run,
    jsonl_rows,
)

from mmopd.config import TrainConfig, load_config, to_dict
from mmopd.demo import demo_configs, run_demo
from mmopd.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="runs/agent-demo", help="agent demo directory")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (demo / "teacher").is_dir() or not (demo / "student-init").is_dir():
        run_demo(demo, world="agent")
    _, _, base = demo_configs(demo, world="agent")
    per_batch = base.rollout.prompts_per_batch * base.rollout.samples_per_prompt
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for weighting in ("sod", "none"):
            run_dir = out / "agent_sod_runs" / f"{weighting}-seed{seed}"
            cfg = load_config(TrainConfig, None, [
                f"{k}={json.dumps(v)}" for k, v in to_dict(base).items()] + [
                f"objective.step_weighting={weighting}", f"trainer.seed={seed}",
                f"trainer.output_dir={run_dir}"])
            t0 = time.perf_counter()
            done = finished_run(cfg, [demo / "reopold", run_dir])
            reused = done is not None
            if done is None:
                train(cfg)
                done = run_dir
            evals = jsonl_rows(done / "eval.jsonl")
            runs.append({"weighting": weighting, "seed": seed, "run_dir": str(done),
                         "reused": reused, "seconds": time.perf_counter() - t0,
                         "curve": [{"episodes": e["step"] // cfg.rollout.minibatches * per_batch,
                                    **{k: e[k] for k in ("accuracy", "pass@4", "sample_accuracy")}}
                                   for e in evals]})
    result = {"command": command(),
              "machine": describe(),
              "config": to_dict(base), "runs": runs}
    (out / "agent_sod.json").write_text(json.dumps(result, indent=2))

    lines = ["| step weighting | seed | episodes | greedy accuracy | pass@4 | sample accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    before = demo / "results.json"
    if before.is_file():
        b = json.loads(before.read_text())["before"]
        lines.append(f"| (student before) | - | 0 | {b['accuracy']:.3f} | {b['pass@4']:.3f} | "
                     f"{b['sample_accuracy']:.3f} |")
    for r in runs:
        last = r["curve"][-1]
        lines.append(f"| {r['weighting']} | {r['seed']} | {last['episodes']} | "
                     f"{last['accuracy']:.3f} | {last['pass@4']:.3f} | "
                     f"{last['sample_accuracy']:.3f} |")
    table = "\n".join(lines)
    (out / "agent_sod.md").write_text(
        "# SOD vs no SOD, tiny agent world (ToolMath level 2, REOPOLD)\n\n"
        f"`{result['command']}`, {result['machine']}\n\n"
        + table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in runs:
        xs = [c["episodes"] for c in r["curve"]]
        style = "-" if r["weighting"] == "sod" else "--"
        label = f"{r['weighting']} seed {r['seed']}"
        axes[0].plot(xs, [c["accuracy"] for c in r["curve"]], style, label=label)
        axes[1].plot(xs, [c["sample_accuracy"] for c in r["curve"]], style, label=label)
    for ax, name in zip(axes, ("greedy accuracy", "sample accuracy (T=1)")):
        ax.set_xlabel("sampled episodes")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "agent_sod.png", dpi=120)


if __name__ == "__main__":
    main()
