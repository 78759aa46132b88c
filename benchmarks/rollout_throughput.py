"""Rollout throughput: HF generate (`HFSampler`) vs vLLM (`VLLMSampler`) on the same model.

Both samplers generate from the same checkpoint (random weights built from a config: the speed of
sampling does not depend on what the weights know), the same token prompts and sampling settings,
in one process. The `vl-` sizes are Qwen2.5-VL models (`vl-tiny`: the vision world's student)
sampling on the vision world's prompts, one 84 px scene each (9 image tokens after merging).
Reported: generated tokens per second, medians over repeated rounds after a warm-up round, and
the mean |log-prob| gap between the two on vLLM's samples (same weights: ~0).
Needs vLLM (on a CPU machine, the env `make setup-vllm` builds):

    .venv-vllm/bin/python benchmarks/rollout_throughput.py [--sizes tiny,small,vl-tiny,vl-small]
        [--rounds 3]

Writes benchmarks/results/rollout_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402
from _common import command, describe  # noqa: E402  (the script's folder is on sys.path)

from mmopd.config import ModelConfig, TinyModelConfig  # noqa: E402
from mmopd.models import load_model, load_tokenizer, load_vision  # noqa: E402
from mmopd.rollout.sampler import HFSampler, SamplingParams  # noqa: E402
from mmopd.tokenizer import build_char_tokenizer  # noqa: E402
from mmopd.vision import VisionInputs, forward_kwargs  # noqa: E402

# (hidden, layers, heads, kv heads, architecture); head size 64 or 32, which vLLM's CPU attention
# supports. vl-tiny is the vision world's student (mmopd.demo.VL_STUDENT).
SIZES = {"tiny": (64, 2, 2, 1, "qwen2"), "small": (512, 8, 8, 2, "qwen2"),
         "medium": (896, 24, 14, 2, "qwen2"), "vl-tiny": (96, 3, 3, 1, "qwen2_5_vl"),
         "vl-small": (512, 8, 8, 2, "qwen2_5_vl")}


def _save(root: Path, tok_dir: Path, hidden: int, layers: int, heads: int, kv: int,
          arch: str) -> Path:
    cfg = ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=hidden, num_layers=layers,
                                           num_heads=heads, num_kv_heads=kv,
                                           intermediate_size=hidden * 3,
                                           max_position_embeddings=1024, seed=0),
                      tokenizer=str(tok_dir))
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    model = load_model(cfg, tok, vision=vision).to(torch.float32)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    if vision is not None:
        vision.save_pretrained(root)
    return root


def _prompts(tok, vision, n: int) -> tuple[list[list[int]], list[VisionInputs | None] | None]:
    """n math questions (text models) or n scenes of the vision world (VLMs)."""
    if vision is None:
        return [tok.encode(f"What is {i} + {2 * i + 7}? Think step by step.",
                           add_special_tokens=False) for i in range(n)], None
    from mmopd.demo import WORLDS
    from mmopd.envs import make_env
    from mmopd.rollout.render import ChatRenderer

    world = WORLDS["vision"].env
    env, renderer = make_env(world["id"], **world["kwargs"]), ChatRenderer(tok, vision)
    rendered = [renderer.render(env.reset(seed=i)[1]["messages"]) for i in range(n)]
    return [r.ids for r in rendered], [r.vision for r in rendered]


def _timed(sampler, prompts, params, seed, vision) -> tuple[float, int, list]:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = sampler.generate(prompts, params, vision=vision)
    dt = time.perf_counter() - t0
    return dt, sum(len(s.token_ids) for g in out for s in g), out


def bench(size: str, args, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from mmopd.rollout.vllm import VLLMSampler

    hidden, layers, heads, kv, arch = SIZES[size]
    tok_dir = tmp / ("tok" if arch == "qwen2" else "vtok")
    if not tok_dir.is_dir():
        build_char_tokenizer(tok_dir, vision=arch != "qwen2")
    path = _save(tmp / size, tok_dir, hidden, layers, heads, kv, arch)
    cfg = ModelConfig(path=str(path))
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    auto = AutoModelForCausalLM if vision is None else AutoModelForImageTextToText
    model = auto.from_pretrained(path, dtype=torch.float32).eval()
    prompts, images = _prompts(tok, vision, args.prompts)
    # no end token among the samples: every sample is max_new_tokens long in both
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens)
    suppress = vision.special_ids if vision is not None else None
    threads = torch.get_num_threads()
    vllm = VLLMSampler(path, tok, stop_token_ids=set(), dtype="float32", vision=vision,
                       suppress_token_ids=suppress,
                       max_model_len=max(map(len, prompts)) + args.new_tokens + 8, seed=0)
    threads_after = torch.get_num_threads()
    hf = HFSampler(model, tok, batch_size=args.prompts * args.n, stop_token_ids=set(),
                   suppress_token_ids=suppress)
    rows = {}
    for name, sampler in (("hf", hf), ("vllm", vllm)):
        _timed(sampler, prompts, params, 0, images)  # warm-up
        runs = [_timed(sampler, prompts, params, r + 1, images) for r in range(args.rounds)]
        rows[name] = {"seconds": statistics.median(r[0] for r in runs),
                      "tokens": statistics.median(r[1] for r in runs),
                      "tokens_per_s": statistics.median(r[1] / r[0] for r in runs)}
        last = runs[-1][2]
    gaps = []  # vLLM's recorded log-probs against the HF model's, on vLLM's last samples
    with torch.no_grad():
        for i, (p, group) in enumerate(zip(prompts, last)):
            for s in group:
                ids = torch.tensor([p + s.token_ids])
                extra = forward_kwargs(model, ids, images[i] if images else None)
                logits = model(ids, **extra).logits[0, len(p) - 1: -1]
                ref = torch.log_softmax(logits.float(), -1).gather(
                    -1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
                gaps.append((torch.tensor(s.logprobs) - ref).abs())
    gap = torch.cat(gaps)
    params_m = sum(p.numel() for p in model.parameters())
    return {"size": size, "hidden": hidden, "layers": layers, "arch": arch, "params": params_m,
            "sequences": args.prompts * args.n, "new_tokens": args.new_tokens,
            "prompt_tokens": statistics.mean(map(len, prompts)),
            "hf": rows["hf"], "vllm": rows["vllm"],
            "speedup": rows["vllm"]["tokens_per_s"] / rows["hf"]["tokens_per_s"],
            "logprob_gap_mean": float(gap.mean()), "logprob_gap_max": float(gap.max()),
            "torch_threads": [threads, threads_after]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small,vl-tiny,vl-small")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    t_start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes.split(","):
            results.append(bench(size, args, tmp))
            print(json.dumps(results[-1]))
    machine = describe(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import vllm

    meta = {"machine": machine, "torch": torch.__version__, "vllm": vllm.__version__,
            "command": command(), "wall_s": time.perf_counter() - t_start}
    (out / "rollout_throughput.json").write_text(json.dumps({**meta, "results": results},
                                                            indent=2))
    lines = [f"Rollout throughput, HF generate vs vLLM, same checkpoint and prompts ({machine}; "
             f"vLLM {vllm.__version__}); medians of {args.rounds} "
             "rounds after a warm-up.", "", f"`{meta['command']}`", "",
             "| model | params | sequences x new tokens | prompt tokens | HF tokens/s | vLLM "
             "tokens/s | speed-up | log-prob gap mean / max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['size']} ({r['arch']}, hidden {r['hidden']}, {r['layers']} layers) | "
                     f"{r['params'] / 1e6:.2f}M | {r['sequences']} x {r['new_tokens']} | "
                     f"{r['prompt_tokens']:.0f} | "
                     f"{r['hf']['tokens_per_s']:.0f} | {r['vllm']['tokens_per_s']:.0f} | "
                     f"{r['speedup']:.1f}x | {r['logprob_gap_mean']:.1e} / "
                     f"{r['logprob_gap_max']:.1e} |")
    (out / "rollout_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
