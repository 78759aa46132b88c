"""One on-policy distillation step, mmopd vs TRL, in the same run on the same machine.

Identical tiny Qwen2 student (hidden 128 x 3 layers) and teacher (256 x 4), random weights (the
speed of a step does not depend on what the weights know), saved once with save_pretrained and
loaded in float32 by both systems; identical prompts (the `mmopd/MathText-v0` level-2 problems
that mmopd draws for each step, rendered by the same chat template: the prompt token ids each
system actually generated from are hashed and compared); the same batch (8 prompts x 4 samples =
32 sequences, one optimiser step per batch, 2 micro-batches of 16), max 48 new tokens,
temperature 1, top-p 1, no top-k, AdamW (lr 1e-5, betas 0.9/0.999, no weight decay, constant
schedule, grad-norm clip 1), no gradient checkpointing, no bf16, the same number of threads.

Systems (each in its own subprocess, `benchmarks/_vs_trl_child.py`; all are started, one at a
time, and then stepped round-robin: step k of every system runs alone, right after the others'
step k, so on a shared machine every system sees the same background load, and no two steps
ever overlap):

- `trl`: `trl.DistillationTrainer` (TRL 1.16: the on-policy distillation trainer TRL now
  recommends, in its stable API; `GKDTrainer` lives in `trl.experimental` and warns that
  lmbda=1 / temperature=1 runs are "fully covered by DistillationTrainer"). It always trains
  on the student's own samples, with the generalised JSD of GKD; `beta=1.0` is the reverse
  KL(student || teacher) over the full vocabulary (checked in
  `trl/kernels/chunked_divergence.py`: beta == 1 -> sum p_s (log p_s - log p_t)). It samples
  one completion per dataset row, so each prompt is `--samples` consecutive rows.
- `mmopd-rkl`: objective `rkl` with `topk 0` (full-vocabulary reverse KL per position): the same
  loss as TRL's.
- `mmopd-opd`, `mmopd-reopold`: mmopd's sampled-token objectives (plain OPD, and REOPOLD, the
  default), which need only the teacher's log-prob of each sampled token.
- `trl-gkd` (opt-in, `--systems ... trl-gkd`): `trl.experimental.gkd.GKDTrainer` with lmbda=1,
  beta=1, temperature=1 (generates per micro-batch, materialises the full [B, L, V] logits).

A step is the wall time of one optimiser step, generation, scoring and update included: for TRL
from `on_step_begin` to `on_step_end` of a TrainerCallback; for mmopd from the start of the
step's rollout (`collect_episodes`) to the moment its metrics row is written (this also counts
mmopd's per-step bookkeeping: answer checking, metrics). Generated tokens are counted from the
completions each system sampled (the end-of-turn token included) and tokens/s is generated tokens
per second of the whole step. Peak RSS is VmHWM of the child process, read at the end of the last
measured step. Every child runs with `MALLOC_MMAP_THRESHOLD_=1048576` (glibc): buffers of 1 MiB
and more are mapped and returned on free, so the peak counts live memory. With glibc's default
(a threshold that rises to 32 MiB), the [32 x 152k] float buffers of generation pile up in its
heap: in two identical runs of mmopd's rkl step, the peak during generation was 620 and
1,010 MB. "Peak extra" subtracts VmRSS once the models (and the trainer) exist, before the first
step. CPU s / step is the process's CPU time over the step (all threads), less sensitive to
other jobs than wall time. Numbers are medians over the measured steps (after warm-up) of all
`--repeats` runs.

The large-vocabulary case gives both models an output layer (tied embeddings) of `--vocab`
rows, like Qwen2.5's 151,936, while the tokenizer stays the 99-token character one: the rows
past the tokenizer are ordinary, samplable ids (random weights make the distribution almost
flat, so nearly every reply runs to the 48-token limit; neither system decodes them, except
mmopd's reward check, which drops unknown ids).

Differences that remain, by design of each system (not settings):

- Generation: both call HF `generate` on the training model in process, one call for the whole
  batch (`rollout.batch_size` = batch), KV cache on. TRL samples with `torch.multinomial`; mmopd
  draws each token in a logits processor (two-level inverse CDF, `sample_rows`) and lets
  generate take it greedily, and keeps each sampled token's log-prob (one log-softmax over
  [B, V] per decoded token).
- Scoring: mmopd runs a no-grad teacher pass before the update; TRL runs the teacher inside
  the loss, per micro-batch. With one optimiser step per batch, mmopd takes log pi_old and the
  entropy from the training forward where the objective plans token by token (`opd`; `reopold`
  before its switch step, a third of the run: steps 0-1 of a 5-step run; `rkl`, whose plan
  reads none) and runs a separate no-grad student pass otherwise (`reopold` in refinement: the
  entropy quantile). TRL has no pi_old pass.
- Loss: both build vocabulary logits chunk by chunk from hidden states and never hold
  [B, L, V]: mmopd over the completion tokens only, `trainer.chunk_size` (256) rows at a time,
  each chunk's loss and gradient in one pass (mmopd/training/fused.py);
  TRL (without Triton, i.e. on CPU) over every completion position of the right-padded batch,
  padding included, in 4096 x 32768 tiles. `trl-gkd` computes full logits of the whole sequence,
  prompt included, for student and teacher.
- mmopd's teacher-student diagnostics are off (`trainer.diagnostics_tokens=0`); TRL logs its
  own metrics each step (`logging_steps=1`) as mmopd does.
- The samples differ (each system's own RNG), so generated lengths differ a little; with 32
  sequences both decode nearly always to the 48-token limit (the slowest row sets the time).

Run (default: both vocabularies, 1 warm-up + 4 measured steps, the four systems above; 8 to 10
min on a 2-core AMD EPYC VM, recorded as `wall_s`), writing benchmarks/results/vs_trl.json and
vs_trl.md:

    python benchmarks/vs_trl.py [--vocab 0 151936] [--steps 4] [--warmup 1] [--prompts 8]
        [--samples 4] [--micro-batch 16] [--max-new-tokens 48] [--repeats 1]
        [--systems trl mmopd-rkl mmopd-opd mmopd-reopold] [--threads N]

`--vocab 0` is the character tokenizer's own size (99). Needs TRL: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import command, cpu_name  # the script's folder is on sys.path
from _vs_trl_child import ENV_KWARGS, OPTIONAL, SYSTEMS, _prompt_hash

CHILD = Path(__file__).with_name("_vs_trl_child.py")

STUDENT = {"hidden": 128, "layers": 3, "seed": 1}
TEACHER = {"hidden": 256, "layers": 4, "seed": 2}


# ---------------------------------------------------------------- models and prompts

def build_models(root: Path, vocab: int) -> tuple[Path, Path, int]:
    """Tokenizer + random-init student and teacher directories with `vocab` output rows
    (0: the tokenizer's own size), and that row count. Tied embeddings, the shape of mmopd's
    tiny Qwen2."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from mmopd.tokenizer import build_char_tokenizer

    build_char_tokenizer(root / "tok")
    tok = AutoTokenizer.from_pretrained(root / "tok")
    dirs = []
    for name, spec in (("student", STUDENT), ("teacher", TEACHER)):
        h = spec["hidden"]
        config = Qwen2Config(
            vocab_size=vocab or len(tok), hidden_size=h, num_hidden_layers=spec["layers"],
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * h,
            max_position_embeddings=512, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
        torch.manual_seed(spec["seed"])
        out = root / name
        Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(out)
        tok.save_pretrained(out)
        dirs.append(out)
    return dirs[0], dirs[1], vocab or len(tok)


def step_prompts(total_steps: int, n_prompts: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """The problem seeds mmopd's trainer draws for each rollout batch (`trainer.seed`, rank 0),
    and their chat messages: the prompts both systems get, step by step."""
    from mmopd.envs import make_env
    from mmopd.rollout.seeds import PROBLEMS, derived_seed  # the trainer's own seeding

    env = make_env("mmopd/MathText-v0", **ENV_KWARGS)
    steps = []
    for it in range(total_steps):
        seeds = [derived_seed(seed, it, PROBLEMS, i) for i in range(n_prompts)]
        steps.append([{"seed": s, "messages": env.reset(seed=s)[1]["messages"]} for s in seeds])
    return steps


def expected_hashes(model_dir: Path, prompts: list[list[dict[str, Any]]],
                    samples: int) -> list[str]:
    """Per step, the fingerprint of the prompt token ids both systems should generate from:
    each prompt rendered by the tokenizer's chat template, `samples` times."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    render = lambda m: list(tok.apply_chat_template(  # noqa: E731
        m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return [_prompt_hash([render(p["messages"]) for p in step for _ in range(samples)])
            for step in prompts]


# ---------------------------------------------------------------- parent

def _machine() -> dict[str, Any]:
    cpu = f"{cpu_name()} ({platform.machine()})"
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        mem = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "mmopd"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class Child:
    """One system's subprocess, stepped by the parent through its Gate."""

    def __init__(self, system: str, spec: dict[str, Any]) -> None:
        self.system, self.spec = system, spec
        run = Path(spec["out"])
        run.parent.mkdir(parents=True, exist_ok=True)
        self.spec_file, self.log = run.with_suffix(".spec.json"), run.with_suffix(".log")
        self.spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
               "MKL_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "MALLOC_MMAP_THRESHOLD_": "1048576",
               "TRANSFORMERS_VERBOSITY": "error"}
        r, w = os.pipe()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), system, str(self.spec_file), "--ctl-fd", str(w)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                pass_fds=(w,), text=True)
        os.close(w)
        self.ctl = os.fdopen(r)
        self.expect("ready")  # models loaded, blocked before its first step

    def expect(self, word: str) -> None:
        line = self.ctl.readline().strip()
        if line != word:
            self.proc.wait()
            tail = self.log.read_text()[-4000:]
            raise SystemExit(f"{self.system} failed (expected {word!r}, got {line!r}):\n{tail}")

    def step(self, last: bool) -> None:
        """Run one optimiser step alone; return once the child waits before the next one (or,
        after the last, has exited)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.expect("done")
        if not last:
            self.expect("ready")
            return
        if self.proc.wait() != 0:
            raise SystemExit(f"{self.system} failed:\n{self.log.read_text()[-4000:]}")

    def result(self) -> dict[str, Any]:
        return json.loads(Path(self.spec["out"]).with_suffix(".result.json").read_text())


def _summarise(system: str, vocab: int, runs: list[dict[str, Any]], warmup: int,
               expected_hashes: list[str]) -> dict[str, Any]:
    measured = [s for r in runs for s in r["steps"][warmup:]]
    hashes = [[s["prompt_hash"] for s in r["steps"]] for r in runs]
    med = lambda key: statistics.median(s[key] for s in measured)  # noqa: E731
    row = {
        "vocab": vocab, "system": system, "measured_steps": len(measured),
        "step_s": med("step_s"), "cpu_s": med("cpu_s"), "rollout_s": med("rollout_s"),
        "gen_tokens_per_step": med("gen_tokens"),
        "gen_tokens_per_s": statistics.median(s["gen_tokens"] / s["step_s"] for s in measured),
        "peak_rss_mb": statistics.median(r["peak_rss"] for r in runs),
        "peak_extra_mb": statistics.median(r["peak_rss"] - r["base_rss"] for r in runs),
        "base_rss_mb": statistics.median(r["base_rss"] for r in runs),
        "same_prompts": all(h == expected_hashes for h in hashes),
        "step_s_all": [s["step_s"] for s in measured],
    }
    if system.startswith("mmopd"):
        for key in ("time_teacher_s", "time_train_s"):
            row[key] = med(key)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[0, 151_936],
                    help="output-layer rows of both models (0: the tokenizer's 99)")
    ap.add_argument("--steps", type=int, default=4, help="measured optimiser steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="optimiser steps discarded per run")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every system (interleaved)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS),
                    choices=list(SYSTEMS + OPTIONAL))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import torch

    batch = args.prompts * args.samples
    if batch % args.micro_batch:
        ap.error(f"--micro-batch {args.micro_batch} does not divide the batch of {batch}")
    threads = args.threads or torch.get_num_threads()
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = step_prompts(args.warmup + args.steps, args.prompts)
        (root / "prompts.json").write_text(json.dumps(prompts))
        for vocab in args.vocab:
            student, teacher, v = build_models(root / f"v{vocab}", vocab)
            expected = expected_hashes(student, prompts, args.samples)
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
            for rep in range(args.repeats):
                children: list[Child] = []
                total = args.warmup + args.steps
                try:
                    for system in args.systems:  # started one at a time; each waits at step 1
                        spec = {"student": str(student), "teacher": str(teacher),
                                "prompts_file": str(root / "prompts.json"),
                                "steps": args.steps, "warmup": args.warmup,
                                "prompts": args.prompts, "samples": args.samples,
                                "micro_batch": args.micro_batch,
                                "max_new_tokens": args.max_new_tokens, "lr": args.lr,
                                "threads": threads,
                                "out": str(root / f"run-{vocab}-{system}-{rep}")}
                        children.append(Child(system, spec))
                    for k in range(total):  # round-robin: step k of every system, one at a time
                        for child in children:
                            child.step(last=k == total - 1)
                        print(f"V={v:,} run {rep + 1}: step {k + 1}/{total} done", flush=True)
                except BaseException:
                    for child in children:  # never leave a started child behind
                        child.proc.kill()
                    raise
                for child in children:
                    res = child.result()
                    runs[child.system].append(res)
                    step_s = statistics.median(s["step_s"] for s in res["steps"][args.warmup:])
                    print(f"V={v:>7,} {child.system:14s} run {rep + 1}: median step "
                          f"{step_s:.2f} s, peak RSS {res['peak_rss']:.0f} MB", flush=True)
            for system in args.systems:
                rows.append(_summarise(system, v, runs[system], args.warmup, expected))
    wall = time.perf_counter() - t_start

    meta = {
        "command": command(), "machine": _machine(), "threads": threads,
        "load_avg_1m_start_end": [load_start[0], os.getloadavg()[0]], "versions": _versions(),
        "student": STUDENT, "teacher": TEACHER, "env": {"id": "mmopd/MathText-v0", **ENV_KWARGS},
        "prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
        "sequences_per_step": batch, "micro_batch": args.micro_batch,
        "max_new_tokens": args.max_new_tokens, "lr": args.lr, "warmup_steps": args.warmup,
        "measured_steps_per_run": args.steps, "repeats": args.repeats, "wall_s": wall,
        "trl_trainer": "trl.DistillationTrainer (beta=1.0: reverse KL, always on-policy)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_trl.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    m, ver = meta["machine"], meta["versions"]
    lines = [
        f"One on-policy distillation step, mmopd vs TRL ({m['cpu']}, {m['cores']} cores, "
        f"{threads} torch threads, {m['ram_gb']} GB; torch {ver['torch']}, transformers "
        f"{ver['transformers']}, trl {ver['trl']}, mmopd {ver['mmopd']}).",
        "",
        f"Student {STUDENT['hidden']} x {STUDENT['layers']} layers, teacher "
        f"{TEACHER['hidden']} x {TEACHER['layers']}, float32; {args.prompts} prompts x "
        f"{args.samples} samples = {batch} sequences per optimiser step (micro-batches of "
        f"{args.micro_batch}), up to {args.max_new_tokens} new tokens, temperature 1. Medians "
        f"of {args.steps} measured steps x {args.repeats} run(s) after {args.warmup} warm-up "
        f"steps; `trl` = `trl.DistillationTrainer`, beta = 1 (reverse KL). Load average "
        f"{load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}; whole script {wall / 60:.1f} min.",
        "",
        f"`{meta['command']}`",
        "",
        "| vocab | system / objective | s / step | CPU s / step | generated tokens / s "
        "| generated tokens / step | rollout s | peak RSS (MB) | peak extra (MB) "
        "| TRL's s / step over this | peak extra over TRL's |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    trl = {r["vocab"]: r for r in rows if r["system"] == "trl"}
    for r in rows:
        flag = "" if r["same_prompts"] else " (prompts differ!)"
        base = trl.get(r["vocab"])
        vs = (f"{base['step_s'] / r['step_s']:.2f}x | "
              f"{r['peak_extra_mb'] / base['peak_extra_mb']:.2f}x" if base else "- | -")
        lines.append(f"| {r['vocab']:,} | {r['system']}{flag} | {r['step_s']:.2f} | "
                     f"{r['cpu_s']:.2f} | {r['gen_tokens_per_s']:,.0f} | "
                     f"{r['gen_tokens_per_step']:,.0f} | {r['rollout_s']:.2f} | "
                     f"{r['peak_rss_mb']:,.0f} | {r['peak_extra_mb']:,.0f} | {vs} |")
    (out / "vs_trl.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
