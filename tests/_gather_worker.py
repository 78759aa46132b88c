"""One rank of tests/test_distributed.py's batch-statistics check: this rank's share of a rollout
batch's entropies (ranks hold different numbers of tokens), REOPOLD's refinement plan made with
`TokenBatch.gather` over the ranks, written to OUT_DIR/rank{R}.pt.

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/_gather_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from mmopd.config import ObjectiveConfig
from mmopd.objectives import OBJECTIVES, TokenBatch, make_plan
from mmopd.training.optim import make_accelerator
from mmopd.training.scoring import batch_gather


def share(rank: int) -> torch.Tensor:
    """Rank r's entropies: rank 0 few and low, rank 1 many and high (a per-rank threshold keeps
    rank 0's top 20 % although they are all below the batch's)."""
    g = torch.Generator().manual_seed(rank)
    return torch.rand(50 if rank == 0 else 450, generator=g) + 2.0 * rank


def main(out_dir: str) -> None:
    accelerator = make_accelerator()
    rank = accelerator.process_index
    h = share(rank)
    n = len(h)
    tb = TokenBatch(episode_N=torch.zeros(n, dtype=torch.long), logp_old_N=torch.zeros(n),
                    logp_teacher_N=torch.zeros(n), entropy_N=h, reward_E=torch.zeros(1),
                    group_E=torch.zeros(1, dtype=torch.long),
                    gather=batch_gather(accelerator))
    plan = make_plan(OBJECTIVES["reopold"], tb, 9, 10, ObjectiveConfig(name="reopold"))
    torch.save({"tau": plan.metrics["entropy_threshold"], "keep": plan.keep_N},
               Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)
