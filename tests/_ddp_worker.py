"""One rank of tests/test_distributed.py: `accumulate_gradients` through a real Accelerator on
this rank's share of a fixed minibatch, with the student wrapped in DDP and then sharded by FSDP2
(gloo, CPU).

    ACCELERATE_USE_CPU=true python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/_ddp_worker.py BUNDLE.pt OUT_DIR

BUNDLE.pt (written by the test) holds the model directories and, per case, the episodes, their
token slices, TokenBatch, Plan, teacher scores, config and which episodes each rank takes. Every
rank writes OUT_DIR/rank{R}.pt: {"ddp" | "fsdp": {case name: {parameter name: full gradient}}}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType

from mmopd.config import ModelConfig
from mmopd.logprobs import projection
from mmopd.models import load_model, load_tokenizer
from mmopd.objectives import OBJECTIVES
from mmopd.training.losses import Heads, accumulate_gradients
from mmopd.training.optim import make_accelerator


def fsdp2_on_cpu(accelerator: Accelerator) -> Accelerator:
    """accelerate enables FSDP only for GPU-like devices (on CPU the plugin is ignored); set the
    state it would have under configs/accelerate/fsdp.yaml, so `prepare` shards the student with
    accelerate's own FSDP2 code (torch `fully_shard` per decoder layer, on gloo)."""
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Qwen2DecoderLayer"], state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True, cpu_ram_efficient_loading=False)
    assert accelerator.is_fsdp2
    return accelerator


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) gradient gathered from every rank; a plain one as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


def run(mode: str, bundle: dict, fused: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    accelerator = make_accelerator()
    if mode == "fsdp":
        fsdp2_on_cpu(accelerator)
    assert accelerator.num_processes == 2, accelerator.state  # not two lone single processes
    rank = accelerator.process_index
    tok = load_tokenizer(ModelConfig(path=bundle["student"]))
    student = load_model(ModelConfig(path=bundle["student"]), tok, trainable=True)
    teacher = load_model(ModelConfig(path=bundle["teacher"]), tok).requires_grad_(False)
    student, _ = accelerator.prepare(student, torch.optim.SGD(student.parameters(), lr=0.0))
    if mode == "ddp":
        assert isinstance(student, torch.nn.parallel.DistributedDataParallel), type(student)
    else:
        assert type(student.lm_head.weight).__name__ == "DTensor"  # really sharded
    model = accelerator.unwrap_model(student)
    heads = Heads(projection(model), projection(model), projection(teacher))
    import reference_losses

    from mmopd.training import losses

    swapped = {"divergence_sum": reference_losses.divergence_sum,
               "_fused_policy_loss": reference_losses.policy_loss,
               "aux_sum": reference_losses.aux_sum} if not fused else {}
    saved = {name: getattr(losses, name) for name in swapped}
    for name, fn in swapped.items():  # the autograd references in place of the fused losses
        setattr(losses, name, fn)
    try:
        return _grads(student, accelerator, model, heads, bundle, rank, tok)
    finally:
        for name, fn in saved.items():
            setattr(losses, name, fn)


def _grads(student, accelerator, model, heads, bundle, rank, tok):
    grads = {}
    for name, case in bundle["cases"].items():
        model.zero_grad(set_to_none=True)
        mine = case["split"][rank]
        idle = not mine  # a rank without episodes in this step: a stand-in at zero weight
        mine = mine or [0]
        accumulate_gradients(student, accelerator, [case["episodes"][i] for i in mine],
                             [case["slices"][i] for i in mine], case["tb"], case["plan"],
                             case["teach"], OBJECTIVES[case.get("objective", name)],
                             case["cfg"], heads, tok.pad_token_id, idle=idle)
        grads[name] = {k: full(p.grad) for k, p in model.named_parameters()}
    return grads


def main(bundle_path: str, out_dir: str) -> None:
    bundle = torch.load(bundle_path, weights_only=False)
    result = {mode + ("-fused" if fused else ""): run(mode, bundle, fused)
              for mode in ("ddp", "fsdp") for fused in (False, True)}
    rank = torch.distributed.get_rank()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
    # Exit without interpreter teardown: gloo's process-group destructor, run from DDP's Reducer
    # as objects are freed, has been seen to hang for good (joining one of its threads).
    sys.stdout.flush()
    os._exit(0)
