"""The off-policy warm-up (`warmup:`): a few steps on the teacher's own samples before the
on-policy phase, with cross-entropy on its tokens or the forward KL to its distribution."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from mmopd.config import TrainConfig
from mmopd.episode import pad_right
from mmopd.logprobs import final_hidden, predicting_positions
from mmopd.rollout.agent_loop import collect_episodes
from mmopd.rollout.evaluate import EnvPool
from mmopd.rollout.render import ChatRenderer
from mmopd.rollout.sampler import HFSampler, SamplingParams
from mmopd.rollout.seeds import WARMUP, derived_seed
from mmopd.rollout.toolcalls import make_parser
from mmopd.teachers.scorer import HFScorer
from mmopd.training.fused import nll_sum
from mmopd.training.losses import Heads, divergence_sum
from mmopd.training.metrics import JsonlLog
from mmopd.training.scoring import token_slices
from mmopd.vision import VisionInputs, forward_kwargs


def off_policy_warmup(cfg: TrainConfig, student: torch.nn.Module, accelerator: Accelerator,
                      optimizer: torch.optim.Optimizer, teacher: torch.nn.Module, heads: Heads,
                      renderer: ChatRenderer, pool: EnvPool, log: JsonlLog,
                      teacher_sampler: HFSampler) -> None:
    """The sparse-to-dense bridge: `cfg.warmup.steps` optimiser steps on episodes the teacher
    samples from the student's prompts, with cross-entropy on the teacher's tokens ("sft") or
    the forward KL to the teacher's full distribution at each of them ("fkl"). The learning-rate
    schedule of the on-policy phase starts after it."""
    wcfg, rcfg, tcfg = cfg.warmup, cfg.rollout, cfg.trainer
    device, pad = accelerator.device, renderer.tokenizer.pad_token_id
    unwrapped = accelerator.unwrap_model(student)
    scorer = HFScorer(teacher, pad, **tcfg.batching())
    params = SamplingParams(n=1, temperature=rcfg.temperature, top_p=rcfg.top_p,
                            max_new_tokens=rcfg.max_new_tokens, stop=rcfg.stop)
    for k in tqdm(range(wcfg.steps), desc="warm-up", unit="step", disable=None):
        starts = [{"seed": derived_seed(tcfg.seed, k, WARMUP, i)}
                  for i in range(wcfg.prompts_per_batch)]
        episodes = [ep for ep in collect_episodes(
            pool.take(len(starts)), starts, teacher_sampler, renderer, params,
            max_turns=rcfg.max_turns, max_episode_tokens=rcfg.max_episode_tokens,
            parser=make_parser(rcfg.tool_parser), env_id=cfg.env.id, desc="warm-up rollout",
            env_timeout_s=rcfg.env_timeout_s)
            if ep.num_generated]
        if not episodes:
            continue
        teach = scorer.score(episodes, keep_hidden=wcfg.kind == "fkl")
        slices = token_slices(episodes)
        denom = max(sum(ep.num_generated for ep in episodes), 1)
        total = 0.0
        mb = tcfg.micro_batch_size
        for s in range(0, len(episodes), mb):
            eps, tok = episodes[s: s + mb], torch.cat(slices[s: s + mb])
            batch = pad_right([e.input_ids for e in eps], [e.loss_mask for e in eps], pad, device)
            vision = VisionInputs.cat(e.vision for e in eps)
            hidden = final_hidden(student, batch.input_ids, batch.attention_mask,
                                  **forward_kwargs(unwrapped, batch.input_ids, vision))
            rows, cols = predicting_positions(batch.loss_mask)
            h = hidden[rows, cols - 1]
            if wcfg.kind == "sft":
                loss_sum = nll_sum(heads.sampled, h, batch.input_ids[rows, cols],
                                   tcfg.chunk_size)
            else:
                loss_sum = divergence_sum("fkl", 0, cfg, heads, h, teach, tok,
                                          torch.ones(len(tok)))
            accelerator.backward(loss_sum / denom)
            total += loss_sum.item() / denom
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.write({"step": 0, "warmup_step": k + 1, "warmup_kind": wcfg.kind, "loss": total,
                   "grad_norm": float(grad_norm),
                   "response_tokens": denom / len(episodes)})
