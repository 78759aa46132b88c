"""One GPU: the full-vocabulary JSD loss at Qwen's vocabulary, mmopd's fused path vs chunked
autograd (tests/reference_losses.py, its test reference) vs Liger's fused linear JSD
(liger-kernel), forward + backward, time and peak memory.

A bf16 batch of 8 x 2048 tokens: student hidden states [T x 1536] with a trainable [V x 1536]
output layer (V = 151,936), a frozen teacher's hidden states and output layer of the same shape,
JSD with beta 0.5. "peak extra" is torch's peak allocated memory during the step minus what the
inputs hold. mmopd's two paths compute the same loss (checked); Liger's is reported beside them
(its normalisation is a token mean, mmopd's a sum, so the values differ by the token count).

    pip install liger-kernel   # CUDA; the Liger row is skipped without it
    python benchmarks/gpu_loss.py [--repeats 3] [--chunk 1024]

Refuses to run without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import command, describe, written_utc  # the script's folder is on sys.path


def _measure(step: Any, repeats: int, grads: list[torch.Tensor]) -> dict[str, float]:
    """Median seconds and peak extra GiB of `step()` (forward + backward; memory 0 on CPU)."""
    cuda = grads[0].is_cuda
    times, peaks, value = [], [], float("nan")
    for _ in range(repeats + 1):  # the first run warms up kernels and the allocator
        for g in grads:
            g.grad = None
        base = 0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        value = float(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peaks.append((torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else 0.0)
    return {"seconds": statistics.median(times[1:]), "peak_extra_gib": max(peaks[1:]),
            "loss": value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, default=8 * 2048)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=1024, help="mmopd's rows per chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true", help="a tiny float32 run on CPU that checks "
                    "the script works (no results written)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_loss.py measures a GPU; none is visible here")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import reference_losses

    from mmopd.config import TrainConfig, load_config
    from mmopd.teachers.scorer import TokenScores
    from mmopd.training.fused import Projection
    from mmopd.training.losses import Heads, divergence_sum

    dev, dt = torch.device("cuda"), torch.bfloat16
    T, H, V = args.tokens, args.hidden, args.vocab
    if args.smoke:
        dev, dt, T, H, V = torch.device("cpu"), torch.float32, 64, 32, 1000
    torch.manual_seed(0)
    h_s = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
    w_s = torch.nn.Parameter(torch.randn(V, H, device=dev, dtype=dt) * H ** -0.5)
    h_t = torch.randn(T, H, device=dev, dtype=dt)
    w_t = torch.randn(V, H, device=dev, dtype=dt) * H ** -0.5
    layer = torch.nn.Linear(H, V, bias=False, device=dev, dtype=dt)
    layer.weight = w_s
    cfg = load_config(TrainConfig, None, ["model.path=x", "teacher.model.path=y",
                                          f"trainer.chunk_size={args.chunk}",
                                          "objective.jsd_beta=0.5"])
    scores = TokenScores(torch.zeros(T), torch.zeros(T), None, None, h_t)
    tok, ones = torch.arange(T), torch.ones(T)

    t_layer = torch.nn.Linear(H, V, bias=False, device=dev, dtype=dt).requires_grad_(False)
    t_layer.weight.copy_(w_t)
    heads = Heads(Projection(layer), Projection(layer), Projection(t_layer))

    def mmopd_step(diverge: Any) -> Any:
        def step() -> torch.Tensor:
            out = diverge("jsd", 0, cfg, heads, h_s, scores, tok, ones)
            out.backward()
            return out.detach()
        return step

    rows: dict[str, dict[str, float]] = {
        "mmopd fused": _measure(mmopd_step(divergence_sum), args.repeats, [h_s, w_s]),
        "mmopd autograd": _measure(mmopd_step(reference_losses.divergence_sum), args.repeats,
                                   [h_s, w_s]),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as e:
        print(f"liger-kernel not importable ({e}); its row is left out", flush=True)
    else:
        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

        def liger_step() -> torch.Tensor:
            out = jsd(h_s, w_s, h_t, w_t)
            out.backward()
            return out.detach()
        rows["liger fused linear JSD"] = _measure(liger_step, args.repeats, [h_s, w_s])
    fused, auto = rows["mmopd fused"]["loss"], rows["mmopd autograd"]["loss"]
    if args.smoke:
        print(json.dumps(rows, indent=1))
        return
    result = {"machine": describe(), "command": command(), "written_utc": written_utc(),
              "tokens": T, "hidden": H, "vocab": V, "chunk": args.chunk, "rows": rows,
              "fused_vs_autograd_rel_diff": abs(fused - auto) / max(abs(auto), 1e-12)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_loss.json").write_text(json.dumps(result, indent=2))
    lines = [f"Full-vocabulary JSD (beta 0.5), bf16, {T:,} tokens, hidden {H:,}, V = {V:,} "
             f"({result['machine']}; median of {args.repeats}, forward + backward)", "",
             "| path | seconds | peak extra GiB | loss |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['seconds']:.3f} | {r['peak_extra_gib']:.2f} | {r['loss']:.4g} |"
              for name, r in rows.items()]
    (out / "gpu_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
