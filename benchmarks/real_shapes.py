"""One training step at real model shapes on this CPU: mmopd (this checkout, or another commit's
through `--python`) and TRL's DistillationTrainer on the same episodes.

A Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher (the published configs, random
weights built here, V = 151,936), bf16 compute (the student's master weights float32, the teacher
loaded in bf16), the character tokenizer. Episodes: `--episodes` prompts of the math world with
scripted replies of mixed lengths (`--lengths`; every system trains on the same reply ids: mmopd's
HF sampler and TRL's generation return them), one optimiser step per rollout batch, micro-batches
of `--micro-batch` episodes. Each system runs `--warmup` steps and one measured step in its own
process (`_real_shapes_child.py`); reported: the measured step's teacher-scoring and update time
(mmopd's metrics; for TRL its whole step, which scores inside the loss), the padding the
update's forwards computed per real token, peak RSS (VmHWM) and peak extra (VmHWM less RSS once
the models and trainer exist), and HF generation tokens/s of real replies on the run's sampler.
Objectives: `reopold` (the default: sampled-token reward) and `rkl` (full-vocabulary reverse KL,
TRL's loss with beta 1).

    python benchmarks/real_shapes.py [--systems mmopd-reopold mmopd-rkl trl] [--label after]
        [--python PATH] [--episodes 8] [--micro-batch 4] [--warmup 1]

`--label` names this run's column in the table (results of other labels are kept, so a run of
an older commit, `--python` of a venv where it is installed, sits beside this one). Writes
benchmarks/results/real_shapes.{json,md}. Needs TRL for the trl system (`pip install -e
".[bench]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import command, describe, written_utc  # the script's folder is on sys.path

CHILD = Path(__file__).with_name("_real_shapes_child.py")
ENV_KWARGS = {"level": 2}
LENGTHS = (40, 120, 250, 400, 560, 700, 830, 940)  # reply tokens, episodes of <= 1,024 tokens


def build_models(root: Path) -> tuple[Path, Path]:
    """Qwen2.5-0.5B-shaped student (float32) and 1.5B-shaped teacher (bf16), random weights,
    the character tokenizer; built once under `root`."""
    import torch
    from transformers import AutoModelForCausalLM

    from mmopd.plan import known_config
    from mmopd.tokenizer import build_char_tokenizer

    dirs = []
    for name, hub, dtype in (("student", "Qwen/Qwen2.5-0.5B", torch.float32),
                             ("teacher", "Qwen/Qwen2.5-1.5B", torch.bfloat16)):
        out = root / name
        dirs.append(out)
        if (out / "config.json").is_file():
            continue
        tok = build_char_tokenizer(out)
        cfg = known_config(hub)
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = (tok.pad_token_id,
                                                                 tok.eos_token_id, None)
        cfg.max_position_embeddings = 2048
        torch.manual_seed(len(dirs))
        AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(out)
        tok.save_pretrained(out)
    return dirs[0], dirs[1]


def episodes(student: Path, n: int) -> dict:
    """The prompts (the math world's first n problems, rendered) and scripted replies."""
    import torch

    from mmopd.config import ModelConfig
    from mmopd.envs import make_env
    from mmopd.models import load_tokenizer
    from mmopd.rollout.render import ChatRenderer

    tok = load_tokenizer(ModelConfig(path=str(student)))
    env, r = make_env("mmopd/MathText-v0", **ENV_KWARGS), ChatRenderer(tok)
    messages = [env.reset(seed=i)[1]["messages"] for i in range(n)]
    g = torch.Generator().manual_seed(0)
    chars = tok.convert_tokens_to_ids(list("0123456789+-= abcdefghij\n"))
    end = r.turn_closer[:1]
    lengths = [LENGTHS[i % len(LENGTHS)] for i in range(n)]
    replies = [[chars[int(j)] for j in torch.randint(0, len(chars), (m - 1,), generator=g)] + end
               for m in lengths]
    return {"messages": messages, "prompt_ids": [r.prompt(m) for m in messages],
            "reply_ids": replies}


def run_child(python: str, system: str, spec: dict, tmp: Path) -> dict:
    """One system's measured step in its own process. A result of the same spec already in
    `tmp` (one folder per --label, so per interpreter) is read back; a child that fails gives
    {"failed": why} (a system that runs out of memory is a result too), its stderr's tail
    printed."""
    spec_path, out = tmp / f"{system}.spec.json", tmp / f"{system}.result.json"
    spec = {**spec, "out_dir": str(tmp / system)}
    if (out.is_file() and spec_path.is_file()
            and json.loads(spec_path.read_text()) == spec):
        print(f"{system}: read back from {out}", flush=True)
        return json.loads(out.read_text())
    out.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONPATH": str(Path(__file__).parent)}
    t0 = time.perf_counter()
    p = subprocess.run([python, str(CHILD), system, str(spec_path), str(out)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        why = (f"killed by signal {-p.returncode}" + (" (SIGKILL: on Linux, usually the "
               "kernel's out-of-memory killer)" if p.returncode == -9 else "")
               if p.returncode < 0 else f"exit status {p.returncode}")
        print(f"{system} failed after {time.perf_counter() - t0:.0f} s ({python}): {why}\n"
              f"{p.stderr[-3000:]}", flush=True)
        return {"failed": why, "after_s": time.perf_counter() - t0}
    print(f"{system}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"One step at real shapes: a Qwen2.5-0.5B-shaped student from a Qwen2.5-1.5B-shaped "
             f"teacher (V = 151,936, random weights), bf16, {meta['episodes']} episodes of "
             f"{meta['tokens']:,} tokens (prompts of the math world; replies of "
             f"{meta['lengths']} tokens), micro-batches of {meta['micro_batch']}, "
             f"{meta['machine']}.", "",
             "| run | system | teacher scoring s | update s | step s | padding / real token "
             "| peak RSS GB | peak extra GB | HF generate tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, systems in results["runs"].items():
        for system, r in systems.items():
            if "failed" in r:
                lines.append(f"| {label} | {system} | failed after {r['after_s'] / 60:.1f} min: "
                             f"{r['failed']} | | | | | | |")
                continue
            if system == "trl":
                step, teach, upd = r["step_s"], "(in the loss)", "-"
            else:
                teach, upd = f"{r['time_teacher_s']:.1f}", f"{r['time_train_s']:.1f}"
                step = r["time_teacher_s"] + r["time_train_s"]
            pad = r.get("padding_per_token")
            lines.append(
                f"| {label} | {system} | {teach} | {upd} | {step:.1f} | "
                f"{'-' if pad is None else f'{pad:.2f}'} | {r['peak_rss_mb'] / 1024:.1f} | "
                f"{(r['peak_rss_mb'] - r['base_rss_mb']) / 1024:.1f} | "
                f"{r['gen_tokens'] / r['gen_s']:.0f} |" if system != "trl" else
                f"| {label} | trl | {teach} | {upd} | {step:.1f} | - | "
                f"{r['peak_rss_mb'] / 1024:.1f} | "
                f"{(r['peak_rss_mb'] - r['base_rss_mb']) / 1024:.1f} | - |")
    return "\n".join(lines) + "\n"


def padding_per_token(spec: dict, packed_frac: float | None, micro_batch: int) -> float:
    """Padding positions per real token of the update's forwards: the run's own metric where it
    has one, else that of right-padded micro-batches of the episodes in the order an mmopd
    without that metric takes them (its shuffle of the measured batch)."""
    import torch

    from mmopd.rollout.seeds import SHUFFLE, derived_seed

    if packed_frac is not None:
        return packed_frac / max(1 - packed_frac, 1e-9)
    lens = [len(p) + len(r) for p, r in zip(spec["prompt_ids"], spec["reply_ids"])]
    order = torch.randperm(len(lens), generator=torch.Generator().manual_seed(
        derived_seed(0, spec["warmup"], SHUFFLE, 0))).tolist()
    lens = [lens[i] for i in order]
    pad = sum(max(lens[i: i + micro_batch]) * len(lens[i: i + micro_batch])
              - sum(lens[i: i + micro_batch]) for i in range(0, len(lens), micro_batch))
    return pad / sum(lens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", nargs="+", default=["mmopd-reopold", "mmopd-rkl", "trl"])
    ap.add_argument("--label", default="after")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs the "
                    "children (a venv with another commit installed)")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--models", default="runs/real_shapes/models")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    student, teacher = build_models(Path(args.models))
    eps = episodes(student, args.episodes)
    spec = {"student": str(student), "teacher": str(teacher), "env_kwargs": ENV_KWARGS,
            "max_reply": max(len(r) for r in eps["reply_ids"]), "micro_batch": args.micro_batch,
            "warmup": args.warmup, "gen_tokens": args.gen_tokens, "threads": args.threads, **eps}
    tmp = Path(args.models).parent / f"runs-{args.label}"
    tmp.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "real_shapes.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    results["runs"][args.label] = mine = {}
    tokens = sum(len(p) + len(r) for p, r in zip(eps["prompt_ids"], eps["reply_ids"]))
    for system in args.systems:
        res = run_child(args.python, system, spec, tmp)
        if system != "trl" and "failed" not in res:
            res["padding_per_token"] = padding_per_token(spec, res.get("train_padding_frac"),
                                                         args.micro_batch)
        mine[system] = res
        # written after each system: a later one that takes the machine down loses nothing
        results["meta"] = {"machine": describe(args.threads), "episodes": args.episodes,
                           "tokens": tokens, "lengths": [len(r) for r in eps["reply_ids"]],
                           "micro_batch": args.micro_batch, "command": command(),
                           "written_utc": written_utc()}
        path.write_text(json.dumps(results, indent=2))
        text = markdown(results)
        (out / "real_shapes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
