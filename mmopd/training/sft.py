"""`sft(config)`: supervised fine-tuning on an environment's worked solutions.

Used to make teachers for the tiny worlds (and weak starting students): the loss is the token
mean of -log p over the assistant reply only, computed in chunks like every other log-prob.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mmopd.config import ConfigError, SFTConfig, dump_yaml
from mmopd.envs import import_env_modules, make_env
from mmopd.episode import pad_right
from mmopd.logprobs import final_hidden, predicting_positions, projection
from mmopd.models import load_model, load_tokenizer, load_vision
from mmopd.rollout.agent_loop import collect_demonstrations
from mmopd.rollout.evaluate import EnvPool, evaluate
from mmopd.rollout.render import ChatRenderer
from mmopd.training.fused import nll_sum
from mmopd.training.metrics import JsonlLog
from mmopd.training.optim import make_accelerator, make_optimizer, make_scheduler
from mmopd.vision import VisionInputs, forward_kwargs

# token ids, loss mask (1 on the assistant replies), images (VLMs)
Example = tuple[list[int], list[int], VisionInputs | None]


class SFTDataError(ValueError):
    """The env cannot provide supervised examples."""


def _has_expert(env: gym.Env) -> bool:
    try:
        return callable(env.get_wrapper_attr("expert_reply"))
    except AttributeError:
        return False


class TeacherViewMix(gym.Wrapper):
    """Shows a seeded fraction of episodes in the env's teacher view: reset() swaps
    info["messages"] for info["teacher_messages"] (the crop instead of the full image, say)."""

    def __init__(self, env: gym.Env, frac: float) -> None:
        super().__init__(env)
        self.frac = frac

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        if random.Random(f"view-{seed}").random() < self.frac:
            if "teacher_messages" not in info:
                raise SFTDataError("data.teacher_view_frac > 0 needs an env with a teacher view "
                                   "(info['teacher_messages'])")
            info = {**info, "messages": info["teacher_messages"]}
        return obs, info


def build_examples(cfg: SFTConfig, renderer: ChatRenderer) -> list[Example]:
    """(token ids, loss mask, images) per example: mask 1 on the assistant replies and their end
    tokens.

    Envs with `expert_reply` give multi-turn demonstrations played through the agent loop (tools
    run for real); single-turn envs give their worked solution (info["solution"]).
    """
    env_cfg = cfg.data.env
    frac = cfg.data.teacher_view_frac

    def make() -> gym.Env:
        env = make_env(env_cfg.id, **env_cfg.kwargs)
        return TeacherViewMix(env, frac) if frac else env

    env = make()
    seeds = [cfg.seed * 1_000_003 + i for i in range(cfg.data.num_examples)]
    if _has_expert(env):
        envs = [env] + [make() for _ in range(63)]
        out = []
        for s in range(0, len(seeds), len(envs)):
            chunk = seeds[s: s + len(envs)]
            eps = collect_demonstrations(envs, [{"seed": x} for x in chunk], renderer,
                                         max_turns=cfg.max_turns, env_id=env_cfg.id)
            bad = [ep for ep in eps if not ep.input_ids]
            if bad:
                raise SFTDataError(f"{env_cfg.id}: a demonstration failed to start: "
                                   f"{bad[0].metadata.get('error')}")
            out += [(ep.input_ids, ep.loss_mask, ep.vision) for ep in eps]
        return out
    closer = renderer.turn_closer
    out = []
    for i, seed in enumerate(seeds):
        _, info = env.reset(seed=seed)
        solution = info.get("solution")
        if not solution:
            raise SFTDataError(f"{env_cfg.id}: problem {info.get('problem_id', i)} has no worked "
                               "solution; SFT needs info['solution'] from reset()")
        msgs = info["messages"]
        prompt = renderer.prompt(msgs)
        full = renderer.render(msgs + [{"role": "assistant", "content": solution}],
                               generation_prompt=False)
        ids = full.ids
        if ids[: len(prompt)] != prompt:
            raise SFTDataError("the chat template renders the prompt differently once an "
                               "assistant reply follows; cannot locate the reply tokens")
        end = len(ids) - len(closer) + 1 if closer else len(ids)  # keep <|im_end|>, drop "\n"
        mask = [0] * len(prompt) + [1] * (end - len(prompt)) + [0] * (len(ids) - end)
        out.append((ids, mask, full.vision))
    return out


def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune, save the model + tokenizer to `output_dir`, return held-out accuracy."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_config.yaml").write_text(dump_yaml(cfg))
    set_seed(cfg.seed)
    accelerator = make_accelerator()
    if accelerator.is_fsdp2:  # its saving and evaluation run unsharded, on every rank
        raise ConfigError("launch: mmopd sft runs in one process or under DDP "
                          "(configs/accelerate/ddp.yaml); FSDP2 sharding is for mmopd train")
    import_env_modules(cfg.data.env.imports)
    tokenizer = load_tokenizer(cfg.model)
    vision = load_vision(cfg.model, tokenizer)
    model = load_model(cfg.model, tokenizer, trainable=True, vision=vision)
    renderer = ChatRenderer(tokenizer, vision)
    examples = build_examples(cfg, renderer)
    steps_per_epoch = (len(examples) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    head = projection(unwrapped)
    log = JsonlLog(out / "sft_log.jsonl")
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=total, desc="sft", unit="step", disable=None)
    step, t_start = 0, time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        for idx in torch.randperm(len(examples), generator=gen).split(cfg.batch_size):
            batch = pad_right([examples[i][0] for i in idx], [examples[i][1] for i in idx],
                              tokenizer.pad_token_id, accelerator.device)
            images = VisionInputs.cat(examples[i][2] for i in idx)
            hidden = final_hidden(model, batch.input_ids, batch.attention_mask,
                                  **forward_kwargs(unwrapped, batch.input_ids, images))
            rows, cols = predicting_positions(batch.loss_mask)
            loss = nll_sum(head, hidden[rows, cols - 1], batch.input_ids[rows, cols],
                           256) / max(len(rows), 1)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_val = loss.item()
            log.write({"step": step, "epoch": epoch, "loss": loss_val,
                       "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}")
    bar.close()
    unwrapped.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if vision is not None:
        vision.save_pretrained(out)
    result: dict[str, Any] = {"model_dir": str(out), "steps": step,
                              "seconds": time.perf_counter() - t_start}
    if cfg.eval_problems:
        ev = cfg.data.env
        pool = EnvPool(lambda: make_env(ev.id, **{**ev.kwargs, **ev.eval_kwargs}))
        result.update(evaluate(unwrapped, tokenizer, pool, num_problems=cfg.eval_problems,
                               max_new_tokens=cfg.max_new_tokens, max_turns=cfg.max_turns,
                               env_id=ev.id, vision=vision))
        tqdm.write(f"sft eval: accuracy {result['accuracy']:.3f} on {cfg.eval_problems} "
                   "held-out problems")
    return result
