"""Gather the latest benchmark results into benchmarks/RESULTS.md.

Every benchmark script writes `benchmarks/results/NAME.json` (with the command that produced it)
and `NAME.md` (its table). This script copies each table verbatim under a heading, with the
command from the JSON and the time the result was written, and copies the plots next to
RESULTS.md (`benchmarks/figures/`), so the numbers in RESULTS.md are exactly the scripts' output:
none is typed by hand.

    python benchmarks/collect_results.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path

# (result name, title, what it answers), in the order RESULTS.md lists them
BENCHMARKS = (
    ("vs_trl", "One on-policy distillation step: mmopd vs TRL",
     "seconds per step, tokens/s and peak RSS, same models, prompts and batch, same run"),
    ("real_shapes", "One training step at real model shapes (Qwen2.5 0.5B <- 1.5B, V = 152k)",
     "teacher scoring and update time, padding, peak memory and generation tokens/s of one "
     "bf16 step on this CPU, before and after the GPU-path work, and TRL's where it runs"),
    ("loss_memory", "Loss memory at a real vocabulary (V = 152k, T = 2048)",
     "peak extra memory and time of full-vocabulary, top-k and sampled-token losses: "
     "naive vs chunked autograd (the tests' reference) vs mmopd's fused path"),
    ("worlds_math", "Tiny math world over seeds: REOPOLD vs OPD vs GRPO",
     "gap to the teacher closed, and held-out accuracy against sampled episodes, 3 seeds"),
    ("worlds_agent", "Tiny agent world over seeds: SOD on / off, REOPOLD vs OPD vs GRPO",
     "gap to the teacher closed, and held-out accuracy against sampled episodes, 3 seeds"),
    ("worlds_vision", "Tiny vision world over seeds (VLM student)",
     "gap to the teacher closed, and held-out accuracy against sampled episodes, 3 seeds, for "
     "the arms the table lists (REOPOLD on HF and on vLLM rollouts, OPD, GRPO)"),
    ("ladder", "REOPOLD's ablation ladder on the tiny worlds (its paper's Section 5.3)",
     "what each piece adds, rung by rung, in the paper's form: token_rkl, stop-gradient, reward "
     "clip, entropy selection, the exploration-to-refinement schedule; and the former form"),
    ("stability", "Where REOPOLD's relaxation matters: learning rate x minibatches (math)",
     "final accuracy and collapse over lr and optimiser steps per rollout batch, 2 seeds, "
     "REOPOLD in the paper's form"),
    ("stability_former", "The same sweep before REOPOLD took the paper's form",
     "REOPOLD in mmopd's former form (reward at pi_old, minibatch normaliser, no ratio clip) "
     "and OPD, one packed row per micro-batch (earlier commits)"),
    ("smollm2_teacher", "A real pretrained teacher: SmolLM2-135M-Instruct",
     "a layer-pruned student distilled with REOPOLD on arithmetic"),
    ("cross_tokenizer", "Cross-tokenizer distillation with real models: SmolLM2-135M and "
     "Gemma-3-270M", "the stronger of two pretrained models with different vocabularies and chat "
     "templates distils the other on its own samples"),
    ("rollout_throughput", "Rollout throughput: HF generate vs vLLM",
     "generated tokens/s of the two samplers on the same checkpoint"),
    ("train_step", "Training-step throughput", "rollout / scoring / update split of one step"),
    ("gpu_loss", "One GPU: fused JSD loss vs autograd vs Liger at V = 152k",
     "time and peak memory of a bf16 full-vocabulary JSD step on 8 x 2048 tokens, hidden 1536"),
    ("gpu_scaleout", "One GPU: HF generate vs colocated vLLM vs FSDP2",
     "rollout tokens/s, step time, update MFU and peak memory of a bf16 REOPOLD step"),
)
# results written by a script of another name
SCRIPTS = {f"worlds_{w}": f"worlds.py --worlds {w}" for w in ("math", "agent", "vision")}
SCRIPTS["stability_former"] = "stability.py --objectives reopold-former,opd"


def section(results: Path, figures: Path, name: str, title: str, what: str) -> list[str]:
    md, js = results / f"{name}.md", results / f"{name}.json"
    lines = [f"## {title}", "", f"*{what}.*", ""]
    if not md.is_file():
        return lines + [f"Not run yet: `python benchmarks/{SCRIPTS.get(name, name + '.py')}`.",
                        ""]
    command = written = None
    if js.is_file():
        meta = json.loads(js.read_text())
        meta = meta.get("meta", meta)  # a script that nests its run's facts under "meta"
        command, written = meta.get("command"), meta.get("written_utc")
    # the time the script recorded (a clone does not keep file times), else the file's time
    mtime = dt.datetime.fromtimestamp(md.stat().st_mtime, dt.timezone.utc)
    when = written or f"{mtime:%Y-%m-%d %H:%M}"
    lines.append(f"Command: `{command}`" if command else
                 "Command: not recorded by this result (older script version); rerun "
                 f"`python benchmarks/{SCRIPTS.get(name, name + '.py')}` to record it")
    lines += [f"Written: {when} UTC", ""]
    body = md.read_text().strip().splitlines()
    if body and body[0].startswith("# "):  # the section heading replaces the table's title
        body = body[1:]
    lines += [*body, ""]
    png = results / f"{name}.png"
    if png.is_file():
        figures.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, figures / png.name)
        lines += [f"![{title}](figures/{png.name})", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default="benchmarks/RESULTS.md")
    args = ap.parse_args()
    results, out = Path(args.results), Path(args.out)
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/collect_results.py` from the JSON and Markdown that "
             "each benchmark script writes to `benchmarks/results/`; every table is that "
             "script's output, with the command that produced it. Each script states the "
             "machine it ran on.", ""]
    for name, title, what in BENCHMARKS:
        lines += section(results, out.parent / "figures", name, title, what)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
