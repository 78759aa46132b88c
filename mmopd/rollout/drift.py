"""Prune-OPD's optional early stop: sample replies in chunks and stop a sample once its
teacher-student top-k overlap has stayed below a threshold for `patience` tokens.

`DriftStopSampler` wraps another Sampler. After each chunk of `chunk` tokens it runs the student
and the teacher over every still-running sample (prompt and reply so far, no gradients), takes
the per-token top-k overlap of their distributions on the reply, and ends the samples whose reply
has drifted (`drift_weights` finds a run of `patience` low-overlap tokens) with stop reason
"drift". The tokens after the drift start are not sampled any further — that is the rollout
compute saved; the ones already sampled are down-weighted by the objective's drift control.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import PreTrainedModel

from mmopd.episode import STOP_DRIFT, STOP_LENGTH, pad_right
from mmopd.logprobs import Head, final_hidden, predicting_positions
from mmopd.objectives.zoo import drift_weights, pair_stats
from mmopd.rollout.sampler import Sample, Sampler, SamplingParams
from mmopd.vision import VisionInputs, forward_kwargs


class DriftStopSampler:
    """A Sampler that stops drifted samples early (see the module docstring)."""

    def __init__(self, sampler: Sampler, student: PreTrainedModel, teacher: PreTrainedModel,
                 student_head: Head, teacher_head: Head, pad_id: int, *, threshold: float,
                 patience: int, k: int, chunk: int) -> None:
        self.sampler = sampler
        self.student, self.teacher = student, teacher
        self.heads = (student_head, teacher_head)
        self.pad_id = pad_id
        self.threshold, self.patience, self.k, self.chunk = threshold, patience, k, chunk
        self.stopped = 0  # samples stopped for drift so far
        self.tokens_saved = 0  # upper bound: the budget those samples did not use

    def load_weights(self, model: PreTrainedModel) -> None:
        self.sampler.load_weights(model)

    def generate(self, prompts: list[list[int]], params: SamplingParams, desc: str = "rollout",
                 vision: list[VisionInputs | None] | None = None) -> list[list[Sample]]:
        n = params.n
        flat = [p for p in prompts for _ in range(n)]
        flat_vision = [v for v in (vision or [None] * len(prompts)) for _ in range(n)]
        out = [Sample([], [], STOP_LENGTH) for _ in flat]
        active = list(range(len(flat)))
        left = params.max_new_tokens
        one = replace(params, n=1)
        while active and left > 0:
            step = min(self.chunk, left)
            got = self.sampler.generate(
                [flat[i] + out[i].token_ids for i in active], replace(one, max_new_tokens=step),
                desc=desc, vision=[flat_vision[i] for i in active] if vision else None)
            still = []
            for i, (s,) in zip(active, got):
                out[i].token_ids += s.token_ids
                out[i].logprobs += s.logprobs
                out[i].stop_reason = s.stop_reason
                if s.stop_reason == STOP_LENGTH:
                    still.append(i)
            left -= step
            if still and left > 0:
                drifted = self._drifted([flat[i] for i in still], [out[i].token_ids for i in still],
                                        [flat_vision[i] for i in still])
                for i, d in zip(still, drifted):
                    if d:
                        out[i].stop_reason = STOP_DRIFT
                        self.stopped += 1
                        self.tokens_saved += left
                still = [i for i, d in zip(still, drifted) if not d]
            active = still
        return [out[j * n:(j + 1) * n] for j in range(len(prompts))]

    @torch.no_grad()
    def _drifted(self, prompts: list[list[int]], replies: list[list[int]],
                 vision: list[VisionInputs | None]) -> list[bool]:
        seqs = [p + r for p, r in zip(prompts, replies)]
        masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, replies)]
        device = self.student.device
        batch = pad_right(seqs, masks, self.pad_id, device)
        rows, cols = predicting_positions(batch.loss_mask)
        images = VisionInputs.cat(vision)
        logits = []
        for model, head in zip((self.student, self.teacher), self.heads):
            was = model.training
            model.eval()
            try:
                h = final_hidden(model, batch.input_ids.to(model.device),
                                 batch.attention_mask.to(model.device),
                                 **forward_kwargs(model, batch.input_ids.to(model.device), images))
            finally:
                model.train(was)
            logits.append(head(h[rows.to(h.device), cols.to(h.device) - 1]))
        overlap = pair_stats(logits[0], logits[1].to(logits[0].device), self.k)["overlap"]
        _, start_E = drift_weights(overlap.cpu(), rows.cpu(), self.threshold, self.patience, 0.0)
        return [bool(x >= 0) for x in start_E.tolist()] + [False] * (len(seqs) - len(start_E))
