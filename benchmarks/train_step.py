"""Throughput of one distillation step, split into rollout / scoring / update.

Runs a short REOPOLD job on tiny models built from configs (random weights: the speed of a step
does not depend on what the weights know) and reports medians over the measured steps, after
warm-up, from the run's own metrics.jsonl. Writes JSON and a Markdown table.

    python benchmarks/train_step.py [--steps 8] [--hidden 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import command, describe  # the script's folder is on sys.path

from mmopd.config import ModelConfig, TinyModelConfig, TrainConfig, load_config
from mmopd.models import load_model, load_tokenizer
from mmopd.tokenizer import build_char_tokenizer
from mmopd.training.loop import train


def _save(root: Path, tok_dir: Path, hidden: int, layers: int, seed: int) -> Path:
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=hidden, num_layers=layers,
                                           intermediate_size=hidden * 3, seed=seed),
                      tokenizer=str(tok_dir))
    tok = load_tokenizer(cfg)
    load_model(cfg, tok).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="measured optimiser steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128, help="student hidden size")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--objective", default="reopold")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_char_tokenizer(tmp / "tok")
        student = _save(tmp / "student", tmp / "tok", args.hidden, args.layers, 1)
        teacher = _save(tmp / "teacher", tmp / "tok", args.hidden * 2, args.layers + 1, 2)
        steps = args.steps + args.warmup
        cfg: TrainConfig = load_config(TrainConfig, None, [
            f"model.path={student}", f"teacher.model.path={teacher}",
            f"objective.name={args.objective}", "env.kwargs={level: 2}",
            "rollout.prompts_per_batch=32", "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=48", "rollout.minibatches=1", f"trainer.steps={steps}",
            "trainer.micro_batch_size=64", f"trainer.output_dir={tmp / 'run'}",
            "eval.at_start=false", "eval.num_problems=1", "eval.pass_k=0",
        ])
        t0 = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[args.warmup:]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    step_s = [r["time_rollout_s"] + r["time_teacher_s"] + r["time_train_s"] for r in rows]
    result = {
        "machine": describe(torch.get_num_threads()),
        "objective": args.objective, "student_hidden": args.hidden, "layers": args.layers,
        "episodes_per_step": 128, "measured_steps": len(rows),
        "median_step_s": statistics.median(step_s),
        "median_rollout_s": med("time_rollout_s"), "median_teacher_s": med("time_teacher_s"),
        "median_train_s": med("time_train_s"),
        "median_train_tokens_per_s": med("train_tokens_per_s"),
        "median_rollout_tokens_per_s": med("rollout_tokens_per_s"),
        "wall_s": wall, "command": command(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(result, indent=2))
    table = "\n".join([
        f"Training-step throughput ({result['machine']}; {args.objective}, student hidden "
        f"{args.hidden} x {args.layers} layers, 128 episodes per step, median of "
        f"{len(rows)} steps)", "",
        "| step s | rollout s | scoring s | update s | update tokens/s | rollout tokens/s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result['median_step_s']:.3f} | {result['median_rollout_s']:.3f} | "
        f"{result['median_teacher_s']:.3f} | {result['median_train_s']:.3f} | "
        f"{result['median_train_tokens_per_s']:.0f} | "
        f"{result['median_rollout_tokens_per_s']:.0f} |",
    ])
    (out / "train_step.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
