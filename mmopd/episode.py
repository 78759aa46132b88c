"""The Episode: one student interaction as exact token ids with explicit per-token masks.

Per-token lists all have the length of `input_ids`; index t describes token t. Losses read only
where `loss_mask` is 1 (tokens the student sampled); everything else is context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmopd.vision import VisionInputs

# Stop reasons recorded on episodes (model output problems are data, not exceptions).
STOP_EOS = "eos"  # the student ended its turn with an end-of-turn token
STOP_STRING = "stop"  # a configured stop string appeared
STOP_LENGTH = "length"  # the per-turn token budget ran out (the generation never stopped)
STOP_ENV = "env"  # the environment terminated the episode
STOP_ERROR = "error"  # the environment raised; details in metadata["error"]
STOP_MAX_TURNS = "max_turns"  # the agent loop's turn bound ran out
STOP_BUDGET = "token_budget"  # the episode's total token budget ran out
STOP_DRIFT = "drift"  # sampling stopped early: the reply drifted away from the teacher
STOP_TIMEOUT = "env_timeout"  # reset() or step() ran past rollout.env_timeout_s
STOP_REASONS = (STOP_EOS, STOP_STRING, STOP_LENGTH, STOP_ENV, STOP_ERROR, STOP_MAX_TURNS,
                STOP_BUDGET, STOP_DRIFT, STOP_TIMEOUT)


@dataclass
class PromptView:
    """Another prompt for the same continuation (a teacher's crop view, a negative view)."""

    ids: list[int]
    """The view's prompt tokens (image placeholders expanded)."""
    vision: VisionInputs | None = None
    """The images of those prompt tokens, in order."""


@dataclass
class Episode:
    """One episode of the student: prompt, generated turns and observations."""

    input_ids: list[int]
    """Every token in order: prompt, student tokens exactly as sampled, observations."""
    loss_mask: list[int]
    """1 on tokens the student generated, 0 on prompt / observation / template tokens."""
    step_index: list[int]
    """Assistant turn number (0, 1, ...) of each student token; -1 on other tokens."""
    sampled_logprobs: list[float]
    """The sampler's log-probability of each student token (0.0 elsewhere)."""
    prompt_len: int
    """Number of tokens before the first student token (the student's prompt)."""
    reward: float = 0.0
    """Environment reward summed over the episode."""
    stop_reason: str = STOP_EOS
    """Why the episode ended: one of STOP_REASONS."""
    group: int = 0
    """Index of the prompt this episode was sampled for (samples of one prompt share it)."""
    teacher_prompt_ids: list[int] | None = None
    """Optional teacher view: different prompt tokens; the continuation is identical."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Env info (answer, problem id, correctness), error text, anything for logs."""
    vision: VisionInputs | None = None
    """Images of `input_ids` in order (prompt images, then images from later turns)."""
    prompt_images: int = 0
    """How many of those images belong to the student's prompt."""
    teacher_prompt_vision: VisionInputs | None = None
    """Images of `teacher_prompt_ids` (e.g. the question-relevant crop)."""
    views: dict[str, PromptView] = field(default_factory=dict)
    """Further named prompt views for the teacher (e.g. "negative" for V-Zero gating)."""

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if not (len(self.loss_mask) == len(self.step_index) == len(self.sampled_logprobs) == n):
            raise ValueError("Episode per-token lists must all have len(input_ids)")

    @property
    def continuation(self) -> list[int]:
        """Everything after the student's prompt (student turns and observations)."""
        return self.input_ids[self.prompt_len:]

    @property
    def continuation_vision(self) -> VisionInputs | None:
        """Images after the prompt (tool results): the same in every view."""
        return self.vision.select(self.prompt_images) if self.vision is not None else None

    def view(self, name: str) -> tuple[list[int], list[int], VisionInputs | None]:
        """(token ids, loss mask, images) of the sequence under a prompt view: "student", "teacher"
        (the teacher prompt if any, else the student's) or a name in `views`. The continuation,
        and so every loss token, is the same in each view."""
        if name == "student" or (name == "teacher" and self.teacher_prompt_ids is None):
            return self.input_ids, self.loss_mask, self.vision
        if name == "teacher":
            prompt, vision = self.teacher_prompt_ids, self.teacher_prompt_vision
        elif name in self.views:
            prompt, vision = self.views[name].ids, self.views[name].vision
        else:
            raise KeyError(f"episode has no prompt view {name!r} (views: student, teacher"
                           f"{''.join(', ' + v for v in self.views)})")
        ids = prompt + self.continuation
        mask = [0] * len(prompt) + self.loss_mask[self.prompt_len:]
        return ids, mask, VisionInputs.cat([vision, self.continuation_vision])

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)

    def append(self, ids: list[int], *, student: bool, step: int = -1,
               logprobs: list[float] | None = None, vision: VisionInputs | None = None) -> None:
        """Append tokens (and the images among them) without touching earlier ones."""
        self.input_ids += ids
        self.loss_mask += [int(student)] * len(ids)
        self.step_index += [step if student else -1] * len(ids)
        self.sampled_logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        if vision is not None:
            self.vision = VisionInputs.cat([self.vision, vision])


@dataclass
class PaddedBatch:
    """Tensors for a forward pass over several episodes: right-padded rows, or the episodes
    packed into rows without padding between them (`position_ids` restart at each sequence; no
    attention mask: transformers masks packed sequences block-diagonally from the restarts)."""

    input_ids: torch.Tensor  # [B, T] long (packed: [rows, T])
    attention_mask: torch.Tensor | None  # [B, T] long; None when packed
    loss_mask: torch.Tensor  # [B, T] bool
    position_ids: torch.Tensor | None = None  # [rows, T] long when packed
    # the sequences as laid out, row by row (None: in the order given); packed rows' tail padding
    order: list[int] | None = None
    tail_padding: int = 0

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the forward besides input_ids."""
        if self.position_ids is not None:
            return {"attention_mask": None, "position_ids": self.position_ids}
        return {"attention_mask": self.attention_mask}

    @property
    def padding(self) -> int:
        """Padding positions the forward computes."""
        if self.attention_mask is None:
            return self.tail_padding
        return self.input_ids.numel() - int(self.attention_mask.sum())


def pad_right(seqs: list[list[int]], masks: list[list[int]], pad_id: int,
              device: torch.device | str = "cpu") -> PaddedBatch:
    """Collate token lists (right padding: positions start at 0 for every row)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), t), dtype=torch.long)
    lm = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        lm[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return PaddedBatch(ids.to(device), att.to(device), lm.to(device))


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices 0..n-1 laid out first-fit decreasing in rows of at most `width` tokens (at least
    the longest sequence)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), len(rows))
        if j == len(rows):
            rows.append([])
            room.append(max(width, lengths[i]))
        rows[j].append(i)
        room[j] -= lengths[i]
    return rows


def packed_width(lengths: list[int], context: float | None) -> int:
    """The width of the packed rows whose forward costs least, in a decoder layer's FLOPs:
    each of the rows x width positions costs its linear layers plus attention over the whole
    row, 1 + width / `context` (`context`: the row length at which a token's attention costs
    as much as its linear layers, `mmopd.teachers.scorer.attention_context`). Widths tried:
    the longest sequence, doubled until one row holds them all. `context` None (attention with
    variable-length kernels, whose cost follows each sequence): one row."""
    total = sum(lengths)
    if context is None:
        return total
    best, width = (float("inf"), total), max(lengths)
    while True:
        cost = len(pack_rows(lengths, width)) * width * (1 + width / context)
        best = min(best, (cost, width))
        if width >= total:
            return best[1]
        width = min(2 * width, total)


def pack(seqs: list[list[int]], masks: list[list[int]], device: torch.device | str = "cpu",
         *, width: int | None = None, pad_id: int = 0) -> PaddedBatch:
    """Token lists packed without padding between them, positions restarting at each. A loss
    token is never a sequence's first, so the hidden state before each loss token belongs to
    its own sequence.

    `width` None, or at least their total: one row, in order. Otherwise rows from `pack_rows`
    (SDPA and eager attend over a whole row under a block-diagonal mask, at a cost quadratic in
    its length: `packed_width` weighs it against padding); each row's tail is padding whose
    positions restart too, so it is a block of its own, never attended to."""
    lengths = [len(s) for s in seqs]
    one_row = width is None or width >= sum(lengths)
    rows = [list(range(len(seqs)))] if one_row else pack_rows(lengths, width)
    t = max(sum(lengths[i] for i in r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), t), dtype=torch.long)
    lm = torch.zeros((len(rows), t), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n, m = lengths[i], masks[i]
            ids[r, at:at + n] = torch.tensor(seqs[i], dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            lm[r, at:at + len(m)] = torch.tensor([bool(x) for x in m], dtype=torch.bool)
            at += n
        pos[r, at:] = torch.arange(t - at)
    order = None if one_row else [i for r in rows for i in r]
    return PaddedBatch(ids.to(device), None, lm.to(device), pos.to(device), order,
                       ids.numel() - sum(lengths))


def collate(seqs: list[list[int]], masks: list[list[int]], pad_id: int,
            device: torch.device | str, packed: bool,
            context: float | None = None) -> PaddedBatch:
    """`pack` (at `packed_width` for attention's `context`) or `pad_right`."""
    if packed:
        return pack(seqs, masks, device, pad_id=pad_id,
                    width=packed_width([len(s) for s in seqs], context))
    return pad_right(seqs, masks, pad_id, device)


def balanced_parts(lengths: list[int], max_items: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices 0..n-1 split into as few parts as hold at most `max_items` each (and about
    `max_tokens` tokens each when > 0), the parts' token counts balanced: longest first, each
    onto the lightest part with room. Each part lists its indices in order."""
    n = len(lengths)
    if n == 0:
        return []
    k = -(-n // max_items)
    if max_tokens > 0:
        k = max(k, -(-sum(lengths) // max_tokens))
    k = min(k, n)
    parts: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        j = min((j for j in range(k) if len(parts[j]) < max_items),
                key=lambda j: (loads[j], j))
        parts[j].append(i)
        loads[j] += lengths[i]
    return [sorted(p) for p in parts]


def group_parts(groups: list[int], lengths: list[int], max_items: int,
                max_tokens: int = 0) -> list[list[int]]:
    """`balanced_parts` of whole groups (the responses to one query stay together): parts of
    at most `max_items` episodes, or of one group where a group holds more."""
    keys = list(dict.fromkeys(groups))
    members: dict[int, list[int]] = {g: [] for g in keys}
    for i, g in enumerate(groups):
        members[g].append(i)
    if not keys:
        return []
    per_part = max(1, max_items // max(len(m) for m in members.values()))
    units = balanced_parts([sum(lengths[i] for i in members[g]) for g in keys], per_part,
                           max_tokens)
    return [sorted(i for u in part for i in members[keys[u]]) for part in units]
