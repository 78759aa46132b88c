"""Samplers: the seam between the trainer and whatever generates student tokens.

`HFSampler` uses `model.generate` in process (batched, left-padded, n samples per prompt) and runs
everywhere; a vLLM backend plugs in behind the same `Sampler` protocol.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TopPLogitsWarper,
)

from mmopd.episode import STOP_EOS, STOP_LENGTH, STOP_STRING
from mmopd.vision import VisionInputs, forward_kwargs


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
                 desc: str = "rollout",
                 vision: list[VisionInputs | None] | None = None) -> list[list[Sample]]:
        """For each prompt, `params.n` samples; `vision[i]` holds prompt i's images."""
        ...

    def load_weights(self, model: PreTrainedModel) -> None:
        """Make the next generate() use `model`'s current weights."""
        ...


def generation_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A frozen copy of `model` for generation, in `dtype` (a LoRA student's adapters merged),
    without a mixed-precision wrapper around its forward (its weights are in the compute dtype
    already)."""
    from mmopd.models import plain_copy

    copy = plain_copy(model).to(dtype).requires_grad_(False).eval()
    copy.__dict__.pop("forward", None)  # accelerate's autocast wrapper, if the model had one
    return copy


def awake(sampler: Any) -> contextlib.AbstractContextManager[None]:
    """Around one rollout batch (all its turns) or one evaluation: an engine that frees its
    memory between rollouts (vLLM's sleep mode) holds it inside and releases it on leaving;
    other samplers pass through."""
    fn = getattr(sampler, "awake", None)
    return fn() if fn is not None else contextlib.nullcontext()


class HFSampler:
    """`transformers` generate on an in-process model: the trainer's own, or (`dtype`, when the
    model's weights are in another dtype) a copy in that compute dtype, which `load_weights`
    keeps equal to the trainer's model. Generating from float32 master weights under bf16
    autocast re-casts every weight at every decode step."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 64, stop_token_ids: set[int] | None = None,
                 suppress_token_ids: set[int] | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if dtype is not None and next(model.parameters()).dtype != dtype:
            model = generation_copy(model, dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # Tokens the student must never sample (a VLM's image placeholders: a sampled one would
        # have no image behind it); their mass is dropped after log-probs are recorded.
        self.suppress_ids = sorted(suppress_token_ids or ())
        eos = set(stop_token_ids or ())
        gen_eos = model.generation_config.eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None
                   else [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)

    def load_weights(self, model: PreTrainedModel) -> None:
        """Copy `model`'s weights (a LoRA student's merged) into the sampler's own model, one
        tensor at a time; nothing when they are the same module."""
        if model is self.model:
            return
        from mmopd.models import merged_weights

        mine = self.model.state_dict()
        with torch.no_grad():
            for name, w in merged_weights(model):
                if name in mine:
                    mine[name].copy_(w)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 desc: str = "rollout",
                 vision: list[VisionInputs | None] | None = None) -> list[list[Sample]]:
        flat = [p for p in prompts for _ in range(params.n)]
        flat_vision = [v for v in (vision or [None] * len(prompts)) for _ in range(params.n)]
        out: list[Sample] = []
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(flat), desc=desc, unit="seq", leave=False,
                   disable=None if len(flat) >= 64 else True)  # None: off when not a TTY
        try:
            for s in range(0, len(flat), self.batch_size):
                out += self._generate_batch(flat[s: s + self.batch_size], params,
                                            flat_vision[s: s + self.batch_size])
                bar.update(len(flat[s: s + self.batch_size]))
        finally:
            bar.close()
            self.model.train(was_training)
        return [out[i * params.n: (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        vision: list[VisionInputs | None]) -> list[Sample]:
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token is at `width`
            ids[i, width - len(p):] = torch.tensor(p)
            att[i, width - len(p):] = 1
        greedy = params.temperature == 0
        # generate() decodes greedily over the scores the processors hand it: `_Draw` has
        # already sampled each row's token (temperature, top-p) and leaves only that one open.
        # torch.multinomial over a real vocabulary is far slower on CPU (about 0.1 s per step
        # for 32 x 152k probabilities, against 5 ms here).
        gen_cfg = GenerationConfig(
            do_sample=False, max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=pad, stop_strings=params.stop or None, return_dict_in_generate=True,
        )
        recorder = _SampledLogprobs()
        processors: list[LogitsProcessor] = [recorder]
        if self.suppress_ids:
            processors.append(_Suppress(self.suppress_ids))
        if not greedy:
            processors.append(_Draw(params.temperature, params.top_p))
        # generate() fills unset fields from model.generation_config (a checkpoint's repetition
        # penalty, say); on-policy samples must come from the model's own distribution, so a
        # neutral default stands in while generating.
        # (a peft LoRA model proxies the attribute to its base model on read only: set it there)
        owner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        saved = owner.generation_config
        owner.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=pad)
        try:
            ids = ids.to(device)
            res = self.model.generate(
                input_ids=ids, attention_mask=att.to(device),
                generation_config=gen_cfg, logits_processor=LogitsProcessorList(processors),
                # each rank samples its own episodes alone: a sharded (FSDP) student is gathered
                # around rollouts (mmopd.training.sharding), never stepped with the other ranks
                synced_gpus=False,
                tokenizer=self.tokenizer if params.stop else None,
                **forward_kwargs(self.model, ids, VisionInputs.cat(vision)))
        finally:
            owner.generation_config = saved
        new = res.sequences[:, width:]
        logp = recorder.finish(new[:, -1]).cpu()
        new = new.cpu()
        return [self._trim(new[i], logp[i], params) for i in range(len(prompts))]

    def _trim(self, ids: torch.Tensor, logp: torch.Tensor, params: SamplingParams) -> Sample:
        """Cut a generated row where it ended: the first end-of-turn token or the completion of
        a stop string, whichever comes first (rows that stop early are padded, and the pad token
        is often an end token too)."""
        toks = ids.tolist()
        is_eos = torch.isin(ids, torch.tensor(self.eos_ids))
        end_eos = int(is_eos.nonzero()[0]) + 1 if is_eos.any() else None
        for end in range(1, (end_eos or len(toks)) + 1 if params.stop else 0):
            text = self.tokenizer.decode(toks[:end])
            if any(s in text for s in params.stop):
                return Sample(toks[:end], logp[:end].tolist(), STOP_STRING)
        if end_eos is not None:
            return Sample(toks[:end_eos], logp[:end_eos].tolist(), STOP_EOS)
        return Sample(toks, logp.tolist(), STOP_LENGTH)


class _Suppress(LogitsProcessor):
    """Never sample these token ids."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.ids] = float("-inf")
        return scores


class _Draw(LogitsProcessor):
    """Samples each row's next token from softmax(scores / temperature) (top-p applied) and
    returns scores that leave only that token open, for generate()'s greedy step to take."""

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        z = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        if self.top_p is not None:
            z = self.top_p(input_ids, z)
        chosen = sample_rows(torch.softmax(z, dim=-1))
        del z  # the scores are spent: reused for the choice (few [B, V] buffers per step)
        return scores.fill_(float("-inf")).scatter_(1, chosen[:, None], 0.0)


def sample_rows(probs: torch.Tensor, block: int = 256) -> torch.Tensor:
    """One token id per row of `probs` [B, V] (rows need not be normalised), drawn by inverse
    CDF in two levels: a block of ids by the blocks' masses, then an id inside it, with
    float64 running sums. A flat float32 cumulative sum over 152k ids would round away the
    tokens far smaller than the running total; here each id is resolved against its own
    block's mass. Ids of probability 0 are never drawn. Uses torch's global RNG.

    Blocks are `block` ids, or the largest power of two down to 32 that divides V (Qwen's
    151,936 = 1,187 x 128), which needs no padded copy of `probs`."""
    b, v = probs.shape
    fit = math.gcd(v, block)
    block = fit if fit >= 32 else block
    p = (probs if v % block == 0 else
         torch.nn.functional.pad(probs, (0, -v % block))).view(b, -1, block)
    mass = p.sum(-1).double()  # [B, blocks]
    cum = mass.cumsum(-1)
    total = cum[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise RuntimeError("sampling: a row of probabilities is not finite or sums to 0 "
                           "(non-finite logits, or every token suppressed)")
    u = (1.0 - torch.rand((b, 1), dtype=torch.float64, device=probs.device)) * total  # (0, 1]
    blk = torch.searchsorted(cum, u).clamp_(max=cum.shape[1] - 1)  # first block with cum >= u
    below = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp(min=0)), 0.0)
    inner = p.gather(1, blk[:, :, None].expand(-1, -1, block)).squeeze(1).double().cumsum(-1)
    r = (u - below).clamp(min=torch.finfo(torch.float64).tiny).minimum(inner[:, -1:])
    j = torch.searchsorted(inner, r).clamp_(max=block - 1)
    return (blk * block + j).squeeze(1)


class _SampledLogprobs(LogitsProcessor):
    """Records log pi(token) of each sampled token under the model's own distribution.

    It runs before temperature / top-p and the draw (`_Draw`, the last processor) and keeps one
    [B, V] step at a time: the token chosen at step t is read from input_ids at step t + 1 (and
    from the final sequences for the last step), instead of storing every step's logits
    (B x T x V floats, which at real vocabularies and lengths does not fit in memory).
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[B, steps] log-probs, given the tokens chosen at the final step."""
        assert self.prev is not None, "generate() ran no step"
        self.out.append(self.prev.gather(-1, last_tokens[:, None]).squeeze(-1))
        return torch.stack(self.out, dim=1)
