"""One rank of tests/test_distributed.py's sharded-teacher check: the teacher loaded as
`teacher.shard` loads it (rank 0 reads the checkpoint to the CPU, the other ranks build it on the
meta device), sharded with `shard_frozen`, then scoring episodes in lock-step. Writes
OUT_DIR/rank{R}.pt: the scores, whether this rank read weights, and its share of parameters.

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/_teacher_shard_worker.py TEACHER_DIR EPISODES.pt OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from mmopd.config import ModelConfig
from mmopd.models import load_model, load_tokenizer
from mmopd.teachers.scorer import HFScorer
from mmopd.training.optim import make_accelerator
from mmopd.training.sharding import shard_frozen


def main(teacher_dir: str, episodes: str, out_dir: str) -> None:
    accelerator = make_accelerator()
    rank = accelerator.process_index
    reads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **k):
        reads.append(a[0])
        return real(cls, *a, **k)

    AutoModelForCausalLM.from_pretrained = classmethod(spy)
    cfg = ModelConfig(path=teacher_dir)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok, meta=rank != 0).requires_grad_(False)
    meta_before = all(p.is_meta for p in model.parameters())
    shard_frozen(model, accelerator.device)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    scores = HFScorer(model, tok.pad_token_id, micro_batch_size=2).score(
        torch.load(episodes, weights_only=False))
    torch.save({"logp": scores.logp_N, "entropy": scores.entropy_N, "reads": reads,
                "meta_before": meta_before, "local": local, "total": total},
               Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    sys.stdout.flush()
    os._exit(0)
