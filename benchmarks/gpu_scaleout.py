"""One GPU, one short script: a bf16 REOPOLD step of a Qwen2.5-0.5B-shaped student rolled out
with HF generate vs a colocated vLLM engine in sleep mode, then the same run with the student
sharded by FSDP2 at world size 1.

Random weights, built locally (the speed of a step does not depend on what the weights know):
the student has Qwen2.5-0.5B's decoder (hidden 896, 24 layers, 14 heads, 2 key-value heads,
MLP 4864) with the character tokenizer's vocabulary, so the output layer is small next to the
real model's 151,936 rows; the teacher has twice its layers. Reported per variant, medians over
the measured steps: rollout tokens/s, rollout / scoring / update seconds, step seconds, the
update's model FLOPs utilisation (6 x parameters x tokens through the student / update time /
the card's dense bf16 peak), and the peak GPU memory (torch's allocator; vLLM's engine allocates
through it too).

    python benchmarks/gpu_scaleout.py [--steps 4] [--warmup 1] [--peak-tflops 989]

Needs CUDA and, for the vLLM variant, vLLM. The FSDP2 variant runs `mmopd train` under torchrun
with one process and configs/accelerate/fsdp.yaml's settings. Refuses to run without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import command, describe, written_utc  # the script's folder is on sys.path

QWEN05 = dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
              intermediate_size=4864, max_position_embeddings=2048)
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def _save(root: Path, tok_dir: Path, seed: int, **shape: int) -> tuple[Path, int]:
    from mmopd.config import ModelConfig, TinyModelConfig
    from mmopd.models import load_model, load_tokenizer

    cfg = ModelConfig(tiny=TinyModelConfig(seed=seed, **shape), tokenizer=str(tok_dir))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root, sum(p.numel() for p in model.parameters())


def _overrides(student: Path, teacher: Path, out: Path, steps: int) -> list[str]:
    return [f"model.path={student}", f"teacher.model.path={teacher}", "objective.name=reopold",
            "env.kwargs={level: 3}", "rollout.prompts_per_batch=64",
            "rollout.samples_per_prompt=4", "rollout.max_new_tokens=256", "rollout.batch_size=256",
            "rollout.minibatches=1", f"trainer.steps={steps}", "trainer.micro_batch_size=32",
            "trainer.bf16=true", "trainer.chunk_size=1024", f"trainer.output_dir={out}",
            "eval.at_start=false", "eval.num_problems=1", "eval.pass_k=0", "optim.lr=1e-5"]


def _summary(run: Path, warmup: int, n_student: int, peak_tflops: float,
             peak_gib: float | None, wall: float) -> dict[str, Any]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][warmup:]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    tokens = med("train_tokens_per_s") * med("time_train_s")  # tokens through the update
    return {
        "measured_steps": len(rows),
        "rollout_tokens_per_s": med("rollout_tokens_per_s"),
        "rollout_s": med("time_rollout_s"), "scoring_s": med("time_teacher_s"),
        "update_s": med("time_train_s"),
        "step_s": statistics.median(r["time_rollout_s"] + r["time_teacher_s"] + r["time_train_s"]
                                    for r in rows),
        "update_mfu": 6 * n_student * tokens / med("time_train_s") / (peak_tflops * 1e12),
        "peak_gpu_gib": peak_gib, "wall_s": wall,
    }


def _in_process(overrides: list[str]) -> tuple[float, float]:
    """`mmopd train` in this process; (wall seconds, peak GPU GiB)."""
    from mmopd.config import TrainConfig, load_config
    from mmopd.training.loop import train

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(load_config(TrainConfig, None, overrides))
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def _fsdp(overrides: list[str]) -> tuple[float, str]:
    """`mmopd train` under torchrun, one process, FSDP2; (wall seconds, its output tail)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "1", "-m", "mmopd", "train", str(Path(__file__).parent.parent / "configs" / "tiny" /
                                                "reopold.yaml"), *overrides]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **FSDP_ENV})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"FSDP2 run failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the medians")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the card's dense bf16 peak (H100 / H200 SXM: 989)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["hf", "vllm", "fsdp"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_scaleout.py measures a GPU; none is visible here")
    from mmopd.tokenizer import build_char_tokenizer

    results: dict[str, Any] = {"machine": describe(), "command": command(),
                               "written_utc": written_utc(), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        build_char_tokenizer(tmp / "tok")
        student, n_student = _save(tmp / "student", tmp / "tok", 1, **QWEN05)
        teacher, n_teacher = _save(tmp / "teacher", tmp / "tok", 2,
                                   **{**QWEN05, "num_layers": 2 * QWEN05["num_layers"]})
        results.update(student_params=n_student, teacher_params=n_teacher)
        variants = {
            "hf": ["rollout.backend=hf"],
            "vllm": ["rollout.backend=vllm", "rollout.vllm.sleep=true",
                     "rollout.vllm.gpu_memory_utilization=0.3"],
        }
        for name, extra in variants.items():
            if name in args.skip:
                continue
            out = tmp / name
            wall, peak = _in_process(_overrides(student, teacher, out, args.steps) + extra)
            results["variants"][name] = _summary(out, args.warmup, n_student, args.peak_tflops,
                                                 peak, wall)
            print(name, json.dumps(results["variants"][name]), flush=True)
        if "fsdp" not in args.skip:
            out = tmp / "fsdp"
            wall, tail = _fsdp(_overrides(student, teacher, out, args.steps))
            summary = _summary(out, args.warmup, n_student, args.peak_tflops, None, wall)
            summary["sharded"] = "student sharded with FSDP2" in tail
            results["variants"]["fsdp2 (world 1, hf rollouts)"] = summary
            print("fsdp2", json.dumps(summary), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_scaleout.json").write_text(json.dumps(results, indent=2))
    lines = [f"GPU step ({results['machine']}; REOPOLD, bf16, Qwen2.5-0.5B-shaped student "
             f"{n_student / 1e6:.0f} M parameters, teacher {n_teacher / 1e6:.0f} M, 256 episodes "
             f"of up to 256 new tokens per step, median of {args.steps - args.warmup} steps)", "",
             "| variant | rollout tok/s | rollout s | scoring s | update s | step s | update MFU "
             "| peak GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["variants"].items():
        peak = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "n/a"
        lines.append(f"| {name} | {r['rollout_tokens_per_s']:.0f} | {r['rollout_s']:.2f} | "
                     f"{r['scoring_s']:.2f} | {r['update_s']:.2f} | {r['step_s']:.2f} | "
                     f"{r['update_mfu']:.1%} | {peak} |")
    (out_dir / "gpu_scaleout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
