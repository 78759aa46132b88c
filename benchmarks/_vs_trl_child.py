"""The child side of `benchmarks/vs_trl.py`: one system's training run, stepped by the parent.

The parent starts one subprocess per system:

    python benchmarks/_vs_trl_child.py SYSTEM SPEC.json --ctl-fd FD

It builds that system's trainer on the spec's models and prompts, reports "ready" on FD before
each optimiser step, waits for "go" on stdin, reports "done" after the step and writes the
per-step timings and peak memory to the spec's `out` with the suffix `.result.json`. What is
timed in each system is described in `vs_trl.py`'s docstring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ENV_KWARGS = {"level": 2}  # the prompts' task: mmopd/MathText-v0 level 2 (two-digit sums)
SYSTEMS = ("trl", "mmopd-rkl", "mmopd-opd", "mmopd-reopold")  # what vs_trl.py runs by default
OPTIONAL = ("trl-gkd",)  # run only when asked for


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def _prompt_hash(prompts: list[list[int]]) -> str:
    """Order-free fingerprint of a step's prompt token ids."""
    blob = json.dumps(sorted(prompts)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Gate:
    """The child's side of the round-robin: before each optimiser step it reports "ready" and
    waits for "go" on stdin; after the step it reports "done". The parent lets one system at a
    time run a step, so every system's step k runs next to the others' step k, under the same
    background load (this machine may be shared), and no two steps overlap."""

    def __init__(self, fd: int | None) -> None:
        self.ctl = os.fdopen(fd, "w", buffering=1) if fd is not None else None

    def before_step(self) -> None:
        if self.ctl:
            self.ctl.write("ready\n")
            if not sys.stdin.readline():  # the parent is gone: never run unsupervised
                raise SystemExit("benchmark parent exited")

    def after_step(self) -> None:
        if self.ctl:
            self.ctl.write("done\n")


def run_mmopd(objective: str, spec: dict[str, Any], gate: Gate) -> dict[str, Any]:
    import torch

    import mmopd.training.loop as mtrain
    from mmopd.config import TrainConfig, load_config
    from mmopd.training.metrics import JsonlLog

    total = spec["warmup"] + spec["steps"]
    batch = spec["prompts"] * spec["samples"]
    cfg: TrainConfig = load_config(TrainConfig, None, [
        f"model.path={spec['student']}", f"teacher.model.path={spec['teacher']}",
        "model.dtype=float32", "teacher.model.dtype=float32",
        f"objective.name={objective}", "objective.topk=0",
        "env.kwargs={" + ", ".join(f"{k}: {v}" for k, v in ENV_KWARGS.items()) + "}",
        f"rollout.prompts_per_batch={spec['prompts']}",
        f"rollout.samples_per_prompt={spec['samples']}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}", "rollout.temperature=1.0",
        "rollout.top_p=1.0", f"rollout.batch_size={batch}", "rollout.minibatches=1",
        f"trainer.steps={total}", f"trainer.micro_batch_size={spec['micro_batch']}",
        f"trainer.output_dir={spec['out']}", "trainer.diagnostics_tokens=0", "trainer.seed=0",
        f"optim.lr={spec['lr']}", "optim.weight_decay=0.0", "optim.schedule=constant",
        "optim.max_grad_norm=1.0",
        "eval.at_start=false", "eval.num_problems=1", "eval.pass_k=0",
    ])
    steps: list[dict[str, Any]] = []
    state: dict[str, Any] = {"base_rss": None, "peak_rss": None}
    collect = mtrain.collect_episodes
    write = JsonlLog.write

    def timed_collect(envs, starts, *a, **k):
        if state["base_rss"] is None:  # models, optimiser and trainer exist; nothing has run
            state["base_rss"] = _rss_mb("VmRSS")
        gate.before_step()
        t0, c0 = time.perf_counter(), time.process_time()
        episodes = collect(envs, starts, *a, **k)
        prompts = [ep.input_ids[:ep.prompt_len] for ep in episodes if ep.input_ids]
        steps.append({"t0": t0, "c0": c0, "rollout_s": time.perf_counter() - t0,
                      "gen_tokens": sum(ep.num_generated for ep in episodes),
                      "seeds": [s["seed"] for s in starts], "prompt_hash": _prompt_hash(prompts)})
        return episodes

    def timed_write(self, row):
        if "time_train_s" in row and self.path.name == "metrics.jsonl":
            cur = steps[-1]
            cur["step_s"] = time.perf_counter() - cur.pop("t0")
            cur["cpu_s"] = time.process_time() - cur.pop("c0")
            # mmopd's own time_rollout_s would include the wait at the gate: the wrapper's is used
            cur.update({k: row[k] for k in ("time_teacher_s", "time_train_s")})
            if len(steps) == total:
                state["peak_rss"] = _rss_mb("VmHWM")
            out = write(self, row)
            gate.after_step()
            return out
        return write(self, row)

    mtrain.collect_episodes = timed_collect
    JsonlLog.write = timed_write
    torch.set_num_threads(spec["threads"])
    mtrain.train(cfg)
    return {"steps": steps, **state}


def _trl_common(spec: dict[str, Any]) -> dict[str, Any]:
    batch = spec["prompts"] * spec["samples"]
    return dict(
        output_dir=spec["out"], max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=batch // spec["micro_batch"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, optim="adamw_torch",
        max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        temperature=1.0, beta=1.0, seed=0, report_to="none", save_strategy="no",
        logging_steps=1, dataloader_pin_memory=False)


def run_trl(spec: dict[str, Any], gate: Gate, gkd: bool = False) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(spec["threads"])
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    rows = [{"prompt": p["messages"]} for step in prompts for p in step
            for _ in range(spec["samples"])]  # one completion per row: n samples = n rows
    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    steps: list[dict[str, Any]] = []
    state: dict[str, Any] = {"base_rss": None, "peak_rss": None}
    total = spec["warmup"] + spec["steps"]

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state["base_rss"] = _rss_mb("VmRSS")

        def on_step_begin(self, args, st, control, **kw):
            gate.before_step()
            steps.append({"t0": time.perf_counter(), "c0": time.process_time(),
                          "rollout_s": 0.0, "gen_tokens": 0, "prompts": []})

        def on_step_end(self, args, st, control, **kw):
            cur = steps[-1]
            cur["step_s"] = time.perf_counter() - cur.pop("t0")
            cur["cpu_s"] = time.process_time() - cur.pop("c0")
            cur["prompt_hash"] = _prompt_hash(cur.pop("prompts"))
            if len(steps) == total:
                state["peak_rss"] = _rss_mb("VmHWM")
            gate.after_step()

    def record(prompt_ids: list[list[int]], completion_ids: list[list[int]], t0: float) -> None:
        cur = steps[-1]
        cur["rollout_s"] += time.perf_counter() - t0
        cur["gen_tokens"] += sum(len(c) for c in completion_ids)
        cur["prompts"] += [list(p) for p in prompt_ids]

    if not gkd:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**_trl_common(spec), max_completion_length=spec["max_new_tokens"],
                                  top_p=1.0, top_k=0, shuffle_dataset=False)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=Dataset.from_list(rows),
                                      processing_class=tok, callbacks=[StepTimer()])
        generate = trainer._generate

        def timed_generate(batch_prompts):
            t0 = time.perf_counter()
            out = generate(batch_prompts)
            record(out[0], out[1], t0)
            return out

        trainer._generate = timed_generate
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**_trl_common(spec), lmbda=1.0, max_new_tokens=spec["max_new_tokens"],
                         disable_dropout=True)
        # GKD's collator splits "messages" into prompt + reply; the reply is replaced on-policy
        rows = [{"messages": r["prompt"] + [{"role": "assistant", "content": ""}]} for r in rows]
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[StepTimer()])
        trainer._get_train_sampler = lambda dataset=None: torch.utils.data.SequentialSampler(
            dataset if dataset is not None else trainer.train_dataset)
        generate = trainer.generate_on_policy_outputs

        def timed_gkd(model, inputs, generation_config):
            t0 = time.perf_counter()
            ids, att, labels = generate(model, inputs, generation_config)
            width = inputs["prompts"].shape[1]
            prompts = [p[m.bool()].tolist()
                       for p, m in zip(inputs["prompts"], inputs["prompt_attention_mask"])]
            record(prompts, [r[r != -100].tolist() for r in labels[:, width:]], t0)
            return ids, att, labels

        trainer.generate_on_policy_outputs = timed_gkd
    trainer.train()
    return {"steps": steps, **state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=SYSTEMS + OPTIONAL)
    ap.add_argument("spec", type=Path, help="the run's spec, written by vs_trl.py")
    ap.add_argument("--ctl-fd", type=int, default=None,
                    help="pipe to the parent (without it the run is not gated)")
    args = ap.parse_args()
    spec = json.loads(args.spec.read_text())
    gate = Gate(args.ctl_fd)
    if args.system.startswith("mmopd-"):
        res = run_mmopd(args.system.removeprefix("mmopd-"), spec, gate)
    else:
        res = run_trl(spec, gate, gkd=args.system == "trl-gkd")
    Path(spec["out"]).with_suffix(".result.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
