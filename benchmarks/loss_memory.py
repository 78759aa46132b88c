"""Peak extra memory and time of the distillation losses at a real vocabulary: naive vs chunked.

For each hidden size, a [T x H] student hidden-state batch with a trainable [V x H] output layer,
and a frozen teacher's hidden states and output layer, three losses go forward and backward:

- full-vocabulary reverse KL (`rkl`, topk 0),
- top-k reverse KL over the teacher's top-k ids plus a tail bucket (`rkl`, topk_source teacher),
- the sampled-token policy-gradient surrogate (OPD / REOPOLD: log-prob of the sampled token).

"naive" materialises the [T x V] logits of the whole batch (what a straightforward implementation
does); "autograd" is chunked autograd (tests/reference_losses.py, the reference the trainer's
losses are tested against: logits rebuilt `chunk` rows at a time under activation
checkpointing); "fused" is the trainer's loss path (`training/fused.py`: each chunk's loss and
gradient in one pass, no recompute, one output-layer gradient buffer). Every measurement runs
in a fresh subprocess; "peak extra" is the process's peak resident memory (VmHWM) minus its
resident memory once the inputs exist, so it counts what the loss itself needs (logits,
softmaxes, gradients of the hidden states and of the output layer).

    python benchmarks/loss_memory.py [--vocab 151936] [--tokens 2048] [--hidden 896 1536]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import command, describe, written_utc  # the script's folder is on sys.path

LOSSES = ("full_vocab_rkl", "topk_rkl", "sampled_token")
PATHS = ("naive", "autograd", "fused")


def _rss_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def _run_one(loss: str, path: str, vocab: int, tokens: int, hidden: int, topk: int,
             chunk: int, repeats: int) -> dict[str, float]:
    """One (loss, path) measurement in this process (called in a fresh subprocess)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import reference_losses

    from mmopd.config import TrainConfig, load_config
    from mmopd.objectives import full_vocab_divergence, topk_divergence
    from mmopd.teachers.scorer import TokenScores
    from mmopd.training.fused import Projection, nll_sum
    from mmopd.training.losses import Heads, divergence_sum

    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.empty(*shape).normal_(0.0, scale)  # in place: no temporary copies

    h_s = randn(tokens, hidden).requires_grad_(True)
    w_s = torch.nn.Parameter(randn(vocab, hidden, scale=hidden ** -0.5))
    h_t = randn(tokens, hidden)
    w_t = randn(vocab, hidden, scale=hidden ** -0.5)
    targets = torch.randint(0, vocab, (tokens,))
    with torch.no_grad():  # the teacher's top-k, as a scorer returns it (chunked, no grad)
        tk = [torch.log_softmax(h_t[i: i + chunk] @ w_t.T, -1).topk(topk, -1)
              for i in range(0, tokens, chunk)]
    topk_logp = torch.cat([t.values for t in tk])
    topk_ids = torch.cat([t.indices for t in tk])
    del tk
    scores = TokenScores(torch.zeros(tokens), torch.zeros(tokens), topk_ids, topk_logp, h_t)
    cfg = load_config(TrainConfig, None, ["model.path=x", "teacher.model.path=y",
                                          f"trainer.chunk_size={chunk}"])

    def s_head(h: torch.Tensor) -> torch.Tensor:
        return h @ w_s.T

    def t_head(h: torch.Tensor) -> torch.Tensor:
        return h @ w_t.T

    tok = torch.arange(tokens)
    ones = torch.ones(tokens)
    layer, t_layer = (torch.nn.Linear(hidden, vocab, bias=False) for _ in range(2))
    layer.weight = w_s
    t_layer.weight = torch.nn.Parameter(w_t, requires_grad=False)
    proj = Projection(layer)
    heads = Heads(proj, proj, Projection(t_layer))
    diverge = divergence_sum if path == "fused" else reference_losses.divergence_sum

    def step() -> torch.Tensor:
        if path == "naive":
            logits = s_head(h_s)
            if loss == "full_vocab_rkl":
                with torch.no_grad():
                    t_logits = t_head(h_t)
                out = full_vocab_divergence("rkl", logits, t_logits).sum()
            elif loss == "topk_rkl":
                s = torch.log_softmax(logits, -1)
                out = topk_divergence("rkl", s.gather(-1, topk_ids), topk_logp).sum()
            else:
                out = -torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum()
        elif loss == "full_vocab_rkl":
            out = diverge("rkl", 0, cfg, heads, h_s, scores, tok, ones)
        elif loss == "topk_rkl":
            cfg.objective.topk_source = "teacher"
            out = diverge("rkl", topk, cfg, heads, h_s, scores, tok, ones)
        elif path == "fused":  # -sum log p(sampled), as the other two paths
            out = nll_sum(proj, h_s, targets, chunk)
        else:
            out = -reference_losses.target_logprobs(s_head, h_s, targets, chunk).sum()
        out.backward()
        return out

    base = _rss_kb("VmRSS")
    times = []
    for _ in range(repeats):
        h_s.grad = None
        w_s.grad = None
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kb("VmHWM")
    return {"peak_extra_mb": (peak - base) / 1024, "seconds": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, nargs="+", default=[896, 1536])
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="forward+backward passes per run")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--one", nargs=3, metavar=("LOSS", "PATH", "HIDDEN"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # the subprocess side
        loss, path, hidden = args.one[0], args.one[1], int(args.one[2])
        res = _run_one(loss, path, args.vocab, args.tokens, hidden, args.topk, args.chunk,
                       args.repeats)
        print(json.dumps(res))
        return

    rows = []
    for hidden in args.hidden:
        for loss in LOSSES:
            for path in PATHS:
                cmd = [sys.executable, __file__, "--one", loss, path, str(hidden),
                       "--vocab", str(args.vocab), "--tokens", str(args.tokens),
                       "--topk", str(args.topk), "--chunk", str(args.chunk),
                       "--repeats", str(args.repeats)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"{loss}/{path}/H={hidden} failed:\n{p.stderr[-2000:]}")
                res = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append({"hidden": hidden, "loss": loss, "path": path, **res})
                print(f"H={hidden} {loss:15s} {path:6s} peak extra {res['peak_extra_mb']:8.0f} MB"
                      f"  {res['seconds']:6.2f} s", flush=True)

    machine = describe(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"vocab": args.vocab, "tokens": args.tokens, "topk": args.topk, "chunk": args.chunk,
            "repeats": args.repeats, "machine": machine, "written_utc": written_utc(),
            "command": command()}
    (out / "loss_memory.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"Loss memory at V = {args.vocab:,}, T = {args.tokens:,} tokens (top-k = "
             f"{args.topk}, chunk = {args.chunk}; {machine}); forward + backward, gradients of "
             "the hidden states and the output layer included. Peak extra memory in MB, time "
             "in seconds; \"fused\" is the trainer's loss path.", "",
             "| hidden | loss | naive MB | autograd MB | fused MB | naive s | autograd s "
             "| fused s | fused time / naive |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for hidden in args.hidden:
        for loss in LOSSES:
            n, a, f = (next(r for r in rows if r["hidden"] == hidden and r["loss"] == loss
                            and r["path"] == p) for p in PATHS)
            lines.append(f"| {hidden} | {loss} | {n['peak_extra_mb']:,.0f} | "
                         f"{a['peak_extra_mb']:,.0f} | {f['peak_extra_mb']:,.0f} | "
                         f"{n['seconds']:.2f} | {a['seconds']:.2f} | {f['seconds']:.2f} | "
                         f"{f['seconds'] / n['seconds']:.2f}x |")
    (out / "loss_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
