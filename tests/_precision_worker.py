"""One rank of tests/test_distributed.py's FSDP2 precision check: a student prepared as a bf16
FSDP2 launch prepares it (on gloo), and the mixed-precision policy of each sharded module
written to OUT_DIR/rank{R}.pt as {module class: (param dtype, reduce dtype)}.

    ACCELERATE_USE_CPU=true ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... \\
        python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/_precision_worker.py STUDENT_DIR OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from mmopd.config import ModelConfig
from mmopd.models import load_model, load_tokenizer
from mmopd.training.optim import make_accelerator
from mmopd.training.sharding import fsdp_modules


def main(student_dir: str, out_dir: str) -> None:
    accelerator = make_accelerator(bf16=True)
    cfg = ModelConfig(path=student_dir)
    student = load_model(cfg, load_tokenizer(cfg), trainable=True)
    student, _ = accelerator.prepare(student, torch.optim.SGD(student.parameters(), lr=0.0))
    policies = {}
    for m in fsdp_modules(accelerator.unwrap_model(student)):
        for group in m._get_fsdp_state()._fsdp_param_groups:
            mp = group.mp_policy
            policies[type(m).__name__] = (mp.param_dtype, mp.reduce_dtype)
    torch.save(policies, Path(out_dir) / f"rank{accelerator.process_index}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    sys.stdout.flush()
    os._exit(0)
