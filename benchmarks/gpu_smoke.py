"""The first GPU run, prepared: one command, about 5 minutes on one H100 / H200, that a session
lent a GPU runs as it is. It fails loudly on any of the defects the GPU-ready work fixed and
prints what a first real run needs to know.

Models (random weights built here, the character tokenizer; speed and memory do not depend on
what the weights know): a Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher (the
published configs, V = 151,936) for the tool world, and the same text shapes as Qwen2.5-VL with a
small vision tower for the vision world. bf16 (trainer.bf16; the student's master weights
float32), colocated vLLM with sleep mode, three REOPOLD steps on a multi-turn world and three on
the vision world. The multi-turn world is FrozenLake as a text game that answers a reply without
a move with a reminder (`on_invalid: retry`), so every episode runs its three turns even with
random weights, which never call a tool: what matters is the engine generating turn after turn
of one rollout batch between two sleeps.

Checks, each an error when it fails:
- the CUDA kernels the loss path relies on: bf16 GEMMs writing float32 (`torch.mm` /
  `torch.addmm` with out_dtype) equal the float32 product of the bf16 operands;
- the fused loss at V = 151,936 in bf16 equals autograd through the same operands
  (tests/reference_losses.py) in value and gradients;
- vLLM is at or above mmopd's floor and has the calls it uses;
- sleep mode survives multi-turn rollouts (the engine sleeps once per batch, not per turn) and
  the engine's sampled log-probs follow the trainer's after every weight sync
  (`rollout/logprob_gap` below rollout.vllm.max_logprob_gap, which stops the run otherwise);
- the update runs on packed micro-batches (`train_padding_frac` 0 on the tool world where the
  student attends with flash-attention; under SDPA the packed rows' tail padding is printed);
- the student's sampler is a bf16 engine (no generation from float32 master weights).

Printed per world: rollout tokens/s, rollout / scoring / update seconds, the update's model FLOPs
utilisation (6 x student parameters x tokens / update time / `--peak-tflops`), peak GPU memory
(torch's allocator; vLLM allocates through it), the engine's log-prob gap. Written to
benchmarks/results/gpu_smoke.{json,md}.

    python benchmarks/gpu_smoke.py [--steps 3] [--peak-tflops 989]
    python benchmarks/gpu_smoke.py --smoke   # on CPU: tiny shapes, vLLM only if installed

Beside it: gpu_loss.py (the loss against Liger's at V = 152k) and gpu_scaleout.py (HF generate vs
vLLM vs FSDP2 at world size 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import command, describe, written_utc  # the script's folder is on sys.path

TEXT_05B = dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                intermediate_size=4864, max_position_embeddings=4096)
TEXT_15B = dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                intermediate_size=8960, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
            max_position_embeddings=1024)
VOCAB = 151_936


class SmokeFailure(RuntimeError):
    """A check of the GPU smoke run failed."""


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAILED ") + what, flush=True)
    if not ok:
        raise SmokeFailure(what)


def check_kernels(device: torch.device) -> None:
    """bf16 operands, float32 accumulation and output, on this device's kernels."""
    from mmopd.logprobs import addmm_fp32_, mm_fp32

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(64, 512, generator=g).to(device, torch.bfloat16)
    b = torch.randn(512, 256, generator=g).to(device, torch.bfloat16)
    ref = a.float() @ b.float()
    got = mm_fp32(a, b)
    check(got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-3, rtol=1e-4),
          f"bf16 GEMM with float32 output on {device.type}")
    acc = torch.ones(64, 256, device=device)
    addmm_fp32_(acc, a, b)
    check(torch.allclose(acc, ref + 1, atol=1e-3, rtol=1e-4),
          f"bf16 GEMM accumulated into float32 on {device.type}")


def check_loss(device: torch.device, vocab: int, hidden: int, tokens: int) -> None:
    """The fused loss at a real vocabulary in bf16 against autograd through the same
    operands."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import reference_losses

    from mmopd.config import TrainConfig, load_config
    from mmopd.teachers.scorer import TokenScores
    from mmopd.training.fused import Projection
    from mmopd.training.losses import Heads, divergence_sum

    torch.manual_seed(0)
    layer = torch.nn.Linear(hidden, vocab, bias=False, device=device)  # float32 master weight
    t_layer = torch.nn.Linear(hidden, vocab, bias=False, device=device,
                              dtype=torch.bfloat16).requires_grad_(False)
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    scores = TokenScores(torch.zeros(tokens), torch.zeros(tokens),
                         hidden_NH=torch.randn(tokens, hidden, device=device,
                                               dtype=torch.bfloat16))
    cfg = load_config(TrainConfig, None, ["model.path=x", "teacher.model.path=y",
                                          "trainer.chunk_size=512"])
    fused = Projection(layer, dtype=torch.bfloat16)
    heads = Heads(fused, fused, Projection(t_layer))
    tok, ones = torch.arange(tokens), torch.ones(tokens)
    out = {}
    for name, fn in (("fused", divergence_sum), ("autograd", reference_losses.divergence_sum)):
        layer.zero_grad()
        h.grad = None
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        loss = fn("rkl", 0, cfg, heads, h, scores, tok, ones)
        loss.backward()
        out[name] = (float(loss), h.grad.clone(), layer.weight.grad.clone())
    (lf, hf, wf), (la, ha, wa) = out["fused"], out["autograd"]
    rel = max(float((hf - ha).norm() / ha.norm()), float((wf - wa).norm() / wa.norm()))
    check(abs(lf - la) <= 1e-3 * abs(la) and rel < 2e-2,
          f"fused bf16 loss at V = {vocab:,} equals autograd (loss {lf:.4f} vs {la:.4f}, "
          f"gradients within {rel:.1e})")


def build(root: Path, smoke: bool) -> dict[str, Any]:
    """Tokenizers and random-weight checkpoints: text student and teacher, VL student and
    teacher."""
    from mmopd.config import ModelConfig, TinyModelConfig
    from mmopd.models import load_model, load_tokenizer, load_vision
    from mmopd.tokenizer import build_char_tokenizer

    build_char_tokenizer(root / "tok")
    build_char_tokenizer(root / "vtok", vision=True)
    student, teacher = (TINY, TINY) if smoke else (TEXT_05B, TEXT_15B)
    made: dict[str, Any] = {}
    for name, shape, tok_dir, arch in (
            ("student", student, "tok", "qwen2"), ("teacher", teacher, "tok", "qwen2"),
            ("vl_student", student, "vtok", "qwen2_5_vl"),
            ("vl_teacher", teacher, "vtok", "qwen2_5_vl")):
        cfg = ModelConfig(tiny=TinyModelConfig(arch=arch, seed=len(made), **shape),
                          tokenizer=str(root / tok_dir))
        tok = load_tokenizer(cfg)
        vision = load_vision(cfg, tok)
        model = load_model(cfg, tok, vision=vision)
        if not smoke and arch == "qwen2":  # the real output layer: V rows (tied embeddings)
            model.resize_token_embeddings(VOCAB)
        dtype = torch.float32 if name.endswith("student") else torch.bfloat16
        model.to(dtype).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        if vision is not None:
            vision.save_pretrained(root / name)
        made[name] = (root / name, sum(p.numel() for p in model.parameters()))
        del model
    return made


def world_overrides(world: str, made: dict[str, Any], out: Path, steps: int, vllm: bool,
                    sleep: bool, smoke: bool) -> list[str]:
    vl = world == "vision"
    student, teacher = made["vl_student" if vl else "student"], made["vl_teacher" if vl else
                                                                     "teacher"]
    env = ("env={id: mmopd/VisionQA-v0, kwargs: {task: color, image_size: 84, "
           "num_distractors: 1, system_prompt: null}}" if vl else
           "env={id: mmopd/GymText-v0, kwargs: {on_invalid: retry}}")
    n = 4 if smoke else 32
    # flash-attention where installed: packed micro-batches run as one row without padding
    attn = ([f"{m}.attn_implementation=flash_attention_2" for m in ("model", "teacher.model")]
            if not smoke and importlib.util.find_spec("flash_attn") else [])
    return [*attn, f"model.path={student[0]}", f"teacher.model.path={teacher[0]}",
            "teacher.model.dtype=bfloat16", "objective.name=reopold", env,
            f"rollout.prompts_per_batch={n}", "rollout.samples_per_prompt=4",
            f"rollout.max_new_tokens={16 if smoke else 128}",
            f"rollout.max_turns={1 if vl else 3}", "rollout.minibatches=1",
            f"rollout.backend={'vllm' if vllm else 'hf'}",
            f"rollout.vllm.sleep={str(sleep).lower()}",
            "rollout.vllm.gpu_memory_utilization=0.35", "rollout.vllm.enforce_eager=true",
            f"rollout.vllm.max_model_len={1024 if smoke else 4096}",
            f"trainer.steps={steps}", f"trainer.micro_batch_size={8 if smoke else 16}",
            f"trainer.bf16={str(not smoke).lower()}", "trainer.chunk_size=1024",
            f"trainer.output_dir={out}", "trainer.report_to=none",
            "eval.at_start=false", "eval.num_problems=8", "eval.pass_k=0", "optim.lr=1e-6"]


def run_world(world: str, overrides: list[str], n_student: int, peak_tflops: float,
              device: torch.device) -> dict[str, Any]:
    import mmopd.training.loop as loop
    from mmopd.config import TrainConfig, load_config

    seen: dict[str, Any] = {}
    real = loop.assemble

    def assemble(cfg):
        seen["run"] = run = real(cfg)
        return run

    loop.assemble = assemble
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        res = loop.train(load_config(TrainConfig, None, overrides))
    finally:
        loop.assemble = real
    wall = time.perf_counter() - t0
    out = Path(res["run_dir"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    tokens = last["train_tokens_per_s"] * last["time_train_s"]
    run = seen["run"]
    sampler_model = getattr(run.sampler, "model", None)
    summary = {
        "steps": len(rows), "wall_s": wall,
        "rollout_tokens_per_s": last["rollout_tokens_per_s"],
        "rollout_s": last["time_rollout_s"], "scoring_s": last["time_teacher_s"],
        "update_s": last["time_train_s"], "train_padding_frac": last["train_padding_frac"],
        "update_mfu": 6 * n_student * tokens / last["time_train_s"] / (peak_tflops * 1e12),
        "peak_gpu_gib": (torch.cuda.max_memory_allocated() / 2**30
                         if device.type == "cuda" else None),
        "logprob_gap_max": max(r.get("rollout/logprob_gap", 0.0) for r in rows),
        "turns_max": max(r.get("turns", 1) for r in rows),
        "attention": run.model.config._attn_implementation,
        "sampler": type(run.sampler).__name__,
        "sampler_dtype": (str(next(sampler_model.parameters()).dtype)
                          if sampler_model is not None else "engine"),
    }
    print(world, json.dumps(summary), flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the card's dense bf16 peak (H100 / H200 SXM: 989)")
    ap.add_argument("--smoke", action="store_true", help="on CPU, tiny shapes (checks the "
                    "script runs; no results written)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("gpu_smoke.py is for a GPU; none is visible here (--smoke runs it on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from mmopd.rollout.vllm import check_vllm, vllm_on_cpu

        check_vllm()
        vllm, sleep = True, not vllm_on_cpu()
    except Exception as e:  # noqa: BLE001 (named below)
        if not args.smoke:
            raise SmokeFailure(f"vLLM is needed for the GPU smoke run: {e}") from e
        print(f"vLLM unavailable here ({type(e).__name__}); the smoke run uses HF generate")
        vllm, sleep = False, False
    check(True, f"vLLM {'found, at or above the floor' if vllm else 'not used'}")
    check_kernels(device)
    check_loss(device, 1000 if args.smoke else VOCAB, 64 if args.smoke else 896,
               256 if args.smoke else 4096)
    results: dict[str, Any] = {"machine": describe(), "command": command(),
                               "written_utc": written_utc(), "worlds": {}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        made = build(tmp, args.smoke)
        for world in ("multi-turn", "vision"):
            key = "vl_student" if world == "vision" else "student"
            r = run_world(world, world_overrides(world, made, tmp / world, args.steps, vllm,
                                                 sleep, args.smoke),
                          made[key][1], args.peak_tflops, device)
            results["worlds"][world] = r
            check(r["steps"] == args.steps, f"{world}: {args.steps} steps ran")
            if world == "multi-turn":
                check(r["turns_max"] == 3, "multi-turn world: three turns per episode, one "
                      f"generate() per turn ({'sleep on' if sleep else 'no sleep'})")
                if "flash" in r["attention"]:  # one packed row per micro-batch
                    check(r["train_padding_frac"] == 0.0,
                          "multi-turn world: packed micro-batches")
                else:  # rows no longer than the longest episode, their tails padded
                    print(f"multi-turn world: {r['attention']} attention, packed rows' padding "
                          f"{r['train_padding_frac']:.2%} (0 needs flash-attention)")
            if vllm:
                check(r["logprob_gap_max"] < 0.1, f"{world}: the engine samples with the "
                      f"trainer's weights after every sync (gap {r['logprob_gap_max']:.2e})")
            elif not args.smoke:
                check(r["sampler_dtype"] == "torch.bfloat16", f"{world}: HF generate in bf16")
    if args.smoke:
        print("smoke run finished: every check passed (nothing written)")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_smoke.json").write_text(json.dumps(results, indent=2))
    lines = [f"GPU smoke run ({results['machine']}; REOPOLD, bf16, 0.5B-shaped student from a "
             f"1.5B-shaped teacher, V = {VOCAB:,}, vLLM with sleep, {args.steps} steps per "
             "world; the last step's numbers)", "",
             "| world | rollout tok/s | rollout s | scoring s | update s | update MFU | peak GiB "
             "| log-prob gap max |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for world, r in results["worlds"].items():
        lines.append(f"| {world} | {r['rollout_tokens_per_s']:.0f} | {r['rollout_s']:.2f} | "
                     f"{r['scoring_s']:.2f} | {r['update_s']:.2f} | {r['update_mfu']:.1%} | "
                     f"{r['peak_gpu_gib']:.1f} | {r['logprob_gap_max']:.1e} |")
    (out / "gpu_smoke.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
