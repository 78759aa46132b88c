"""Samplers: the seam between the trainer and whatever generates student tokens.

`HFSampler` uses `model.generate` in process (batched, left-padded, n samples per prompt) and runs
everywhere; a vLLM backend plugs in behind the same `Sampler` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from mmopd.episode import STOP_EOS, STOP_LENGTH, STOP_STRING


@dataclass
class SamplingParams:
    """Per-call sampling settings. temperature 0 means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)


@dataclass
class Sample:
    """One generated continuation of one prompt."""

    token_ids: list[int]  # exactly the sampled ids, including a final end-of-turn token if any
    logprobs: list[float]  # log pi(token) under the model's own (temperature-1) distribution
    stop_reason: str  # eos | stop | length


class Sampler(Protocol):
    """Generates continuations of token prompts and receives updated weights."""

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 desc: str = "rollout") -> list[list[Sample]]:
        """For each prompt, `params.n` samples."""
        ...

    def load_weights(self, model: PreTrainedModel) -> None:
        """Make the next generate() use `model`'s current weights."""
        ...


class HFSampler:
    """`transformers` generate on an in-process model (shared with the trainer on one device)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 64, stop_token_ids: set[int] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        eos = set(stop_token_ids or ())
        gen_eos = model.generation_config.eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None
                   else [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)

    def load_weights(self, model: PreTrainedModel) -> None:
        if model is not self.model:  # same object when trainer and sampler share the module
            self.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 desc: str = "rollout") -> list[list[Sample]]:
        flat = [p for p in prompts for _ in range(params.n)]
        out: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(flat), desc=desc, unit="seq", leave=False,
                   disable=None if len(flat) >= 64 else True)  # None: off when not a TTY
        try:
            for s in range(0, len(flat), self.batch_size):
                out += self._generate_batch(flat[s: s + self.batch_size], params)
                bar.update(len(flat[s: s + self.batch_size]))
        finally:
            bar.close()
            self.model.train(was_training)
        return [out[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at `width`
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
        greedy = params.temperature == 0
        gen_cfg = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else 0,  # 0: no hidden top-k truncation of the distribution
            max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=pad,
            return_dict_in_generate=True, output_logits=True,
            stop_strings=params.stop or None,
        )
        res = self.model.generate(
            input_ids=ids.to(device), attention_mask=att.to(device), generation_config=gen_cfg,
            tokenizer=self.tokenizer if params.stop else None)
        new = res.sequences[:, width:].cpu()
        # Raw logits (before temperature / top-p): log-probs of the model's own distribution,
        # the same quantity the trainer recomputes as log pi_old.
        logits = torch.stack(res.logits, dim=1).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new[:, :, None].to(logits.device))
        logp = logp.squeeze(-1).cpu()
        return [self._trim(new[i], logp[i], params) for i in range(len(prompts))]

    def _trim(self, ids: torch.Tensor, logp: torch.Tensor, params: SamplingParams) -> Sample:
        toks = ids.tolist()
        is_eos = torch.isin(ids, torch.tensor(self.eos_ids))
        if is_eos.any():
            end = int(is_eos.nonzero()[0]) + 1
            return Sample(toks[:end], logp[:end].tolist(), STOP_EOS)
        if params.stop:
            # generate() pads rows that hit a stop string; find where the string completed.
            for end in range(1, len(toks) + 1):
                text = self.tokenizer.decode(toks[:end])
                if any(s in text for s in params.stop):
                    return Sample(toks[:end], logp[:end].tolist(), STOP_STRING)
        return Sample(toks, logp.tolist(), STOP_LENGTH)
