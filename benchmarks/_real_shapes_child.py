"""The child side of `benchmarks/real_shapes.py`: one system's run on the spec's models and
episodes, in its own process (peak memory is the process's).

    python benchmarks/_real_shapes_child.py SYSTEM SPEC.json OUT.json

mmopd systems run `mmopd train` for `warmup + 1` optimiser steps on scripted episodes
(HFSampler.generate returns the spec's replies, the i-th to the i-th prompt of the batch, so
every system and code version trains on replies of the same lengths and ids) and time the last
step's stages from its metrics row; then HF generation of
real replies on the run's own sampler. `trl` runs TRL's DistillationTrainer (reverse KL over the
full vocabulary, as mmopd's `rkl`) with its generation returning the same replies. Uses only
interfaces older mmopd versions have too, so `--python` of real_shapes.py can run a checkout of
another commit.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any


def _rss_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def run_mmopd(objective: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import mmopd.training.loop as loop
    from mmopd.config import TrainConfig, load_config
    from mmopd.rollout import sampler as samplers

    torch.set_num_threads(spec["threads"])
    replies = spec["reply_ids"]
    real_generate = samplers.HFSampler.generate
    scripted = {"on": True}

    def generate(self, prompts, params, desc="rollout", vision=None):
        if not scripted["on"]:
            return real_generate(self, prompts, params, desc, vision)
        return [[samplers.Sample(list(replies[i]), [0.0] * len(replies[i]), "eos")
                 for _ in range(params.n)] for i in range(len(prompts))]

    samplers.HFSampler.generate = generate
    state: dict[str, Any] = {}
    real_assemble = loop.assemble

    def assemble(cfg):
        run = real_assemble(cfg)
        state["run"], state["base_rss"] = run, _rss_mb("VmRSS")
        return run

    loop.assemble = assemble
    n = len(spec["prompt_ids"])
    cfg = load_config(TrainConfig, None, [
        f"model.path={spec['student']}", f"teacher.model.path={spec['teacher']}",
        "teacher.model.dtype=bfloat16", f"objective.name={objective}", "objective.topk=0",
        f"env.kwargs={json.dumps(spec['env_kwargs'])}", f"rollout.prompts_per_batch={n}",
        "rollout.samples_per_prompt=1", f"rollout.max_new_tokens={spec['max_reply']}",
        f"rollout.batch_size={n}", "rollout.minibatches=1",
        f"trainer.steps={spec['warmup'] + 1}", f"trainer.micro_batch_size={spec['micro_batch']}",
        "trainer.bf16=true", f"trainer.output_dir={spec['out_dir']}",
        "trainer.diagnostics_tokens=0", "trainer.seed=0", "trainer.report_to=none",
        "optim.lr=1e-6", "eval.at_start=false", "eval.num_problems=0", "eval.pass_k=0",
        "eval.every=0"])
    t0 = time.perf_counter()
    loop.train(cfg)
    wall = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    rows = [json.loads(x) for x in (Path(spec["out_dir"]) / "metrics.jsonl").read_text()
            .splitlines()]
    last = rows[-1]
    # HF generation of real replies on the run's sampler, the spec's prompts
    scripted["on"] = False
    run = state["run"]
    params = samplers.SamplingParams(n=1, temperature=1.0, max_new_tokens=spec["gen_tokens"])
    prompts = [list(p) for p in spec["prompt_ids"]]
    torch.manual_seed(0)
    g0 = time.perf_counter()
    out = run.sampler.generate(prompts, params)
    gen_s = time.perf_counter() - g0
    gen_tokens = sum(len(s.token_ids) for g in out for s in g)
    return {"step": last["step"], "time_teacher_s": last.get("time_teacher_s"),
            "time_train_s": last.get("time_train_s"),
            "train_padding_frac": last.get("train_padding_frac"),
            "loss": last.get("loss"), "base_rss_mb": state["base_rss"], "peak_rss_mb": peak,
            "wall_s": wall, "gen_tokens": gen_tokens, "gen_s": gen_s,
            "sampler_dtype": str(next(run.sampler.model.parameters()).dtype)}


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(spec["threads"])
    replies = spec["reply_ids"]
    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.bfloat16)
    n = len(spec["prompt_ids"])
    rows = [{"prompt": m} for _ in range(spec["warmup"] + 1) for m in spec["messages"]]
    steps: list[dict[str, Any]] = []
    state: dict[str, Any] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            state["base_rss"] = _rss_mb("VmRSS")

        def on_step_begin(self, args, st, control, **kw):
            steps.append({"t0": time.perf_counter()})

        def on_step_end(self, args, st, control, **kw):
            steps[-1]["step_s"] = time.perf_counter() - steps[-1].pop("t0")

    args = DistillationConfig(
        output_dir=spec["out_dir"], max_steps=spec["warmup"] + 1,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=n // spec["micro_batch"], learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=1.0, bf16=True, fp16=False, gradient_checkpointing=False, use_cpu=True,
        temperature=1.0, beta=1.0, seed=0, report_to="none", save_strategy="no",
        logging_steps=1, dataloader_pin_memory=False, max_completion_length=spec["max_reply"],
        top_p=1.0, top_k=0, shuffle_dataset=False)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tok,
                                  callbacks=[Timer()])
    seen: list[int] = []

    def single_turn(prompt_ids, *a, **k):  # the spec's replies, in order, for a micro-batch
        out = [list(replies[(len(seen) + i) % n]) for i in range(len(prompt_ids))]
        seen.extend(len(r) for r in out)
        return out

    trainer._generate_single_turn = single_turn
    t0 = time.perf_counter()
    trainer.train()
    return {"step_s": steps[-1]["step_s"], "base_rss_mb": state["base_rss"],
            "peak_rss_mb": _rss_mb("VmHWM"), "wall_s": time.perf_counter() - t0,
            "replies_seen": len(seen)}


def main() -> None:
    system, spec_path, out = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    res = run_trl(spec) if system == "trl" else run_mmopd(system.removeprefix("mmopd-"), spec)
    Path(out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
