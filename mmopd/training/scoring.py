"""Scoring a rollout batch: the student's rollout-time log-probs (log pi_old) and entropy, the
teacher's log-probs, and whatever else the objective asks for, flat over the batch's student
tokens (episode, then position) as the objectives' TokenBatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mmopd.episode import Episode
from mmopd.objectives import TokenBatch
from mmopd.teachers.cross import spread_spans
from mmopd.teachers.scorer import HFScorer, Teacher, TokenScores
from mmopd.training.losses import Heads, pair_pass


def token_slices(episodes: list[Episode]) -> list[torch.Tensor]:
    """Indices of each episode's student tokens in the flat [N] layout (episode, then position)."""
    counts = [ep.num_generated for ep in episodes]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return [torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in range(len(episodes))]


def score_batch(episodes: list[Episode], old_scorer: HFScorer | None,
                teacher_scorer: Teacher | None,
                teacher_topk: int = 0, keep_hidden: bool = False,
                negative_scorer: HFScorer | None = None, *, ref_scorer: HFScorer | None = None,
                heads: Heads | None = None, needs: frozenset[str] = frozenset(),
                diag_tokens: int = 0, overlap_k: int = 10, chunk_size: int = 256,
                ) -> tuple[TokenBatch, TokenScores, list[torch.Tensor], dict[str, float]]:
    """log pi_old and entropy from the student, log pi_T (and its entropy) from the teacher, and
    what the objective needs besides (log pi_ref, the teacher under a negative view, per-token
    KL and top-k overlap), flat over tokens; plus teacher-student diagnostics on a sample.

    Without `old_scorer` (the training forward gives log pi_old: mmopd.training.old_policy)
    log pi_old and the entropy are NaN until the caller fills them in, and the diagnostics wait
    for the training forward's hidden states (the teacher's are kept for them)."""
    pair = bool({"kl", "overlap"} & needs) and teacher_scorer is not None
    diag = (diag_tokens > 0 and teacher_scorer is not None and heads is not None
            and heads.teacher is not None)
    if old_scorer is None and (pair or teacher_scorer is None):
        raise ValueError("log pi_old from the training forward needs a teacher and no "
                         "per-token KL or overlap before the update")
    n = sum(ep.num_generated for ep in episodes)
    # the diagnostics' tokens are chosen first: only their hidden states are kept (a whole
    # batch's would stay on the device through every minibatch update)
    at: bool | torch.Tensor = pair or (diagnostic_positions(n, diag_tokens) if diag else False)
    old = old_scorer.score(episodes, keep_hidden=at) if old_scorer else None
    teach = (teacher_scorer.score(episodes, topk=teacher_topk,
                                  keep_hidden=True if keep_hidden else at)
             if teacher_scorer else old)
    assert teach is not None
    if old is None:  # filled in from the training forward
        nan = torch.full_like(teach.logp_N, float("nan"))
        old = TokenScores(logp_N=nan, entropy_N=nan.clone())
    negative = negative_scorer.score(episodes).logp_N if negative_scorer else None
    ref = ref_scorer.score(episodes).logp_N if ref_scorer else None
    stats: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    if (pair or diag) and n and old.hidden_NH is not None:
        assert heads is not None and heads.teacher is not None
        idx = torch.arange(n) if pair else at
        assert isinstance(idx, torch.Tensor)
        stats = pair_pass(heads, old.hidden_at(idx), teach.hidden_at(idx), torch.arange(len(idx)),
                          overlap_k, chunk_size)
        metrics = diagnostic_metrics(stats)
    logp_teacher = teach.logp_N
    if teacher_scorer is not None and teach.span_N is not None:  # a cross-tokenizer teacher
        logp_teacher = spread_spans(old.logp_N, teach.logp_N, teach.span_N)
    metrics.update(getattr(teacher_scorer, "last_stats", None) or {})
    slices = token_slices(episodes)
    tb = TokenBatch(
        episode_N=torch.cat([torch.full((len(s),), i) for i, s in enumerate(slices)]),
        step_N=torch.tensor([k for ep in episodes
                             for k, m in zip(ep.step_index, ep.loss_mask) if m], dtype=torch.long),
        logp_old_N=old.logp_N, logp_teacher_N=logp_teacher, entropy_N=old.entropy_N,
        reward_E=torch.tensor([ep.reward for ep in episodes]),
        group_E=torch.tensor([ep.group for ep in episodes]), logp_negative_N=negative,
        logp_ref_N=ref, teacher_entropy_N=teach.entropy_N if teacher_scorer else None,
        kl_N=stats.get("kl") if pair else None, overlap_N=stats.get("overlap") if pair else None,
        dist_mask_N=(~teach.topk_logp_NK[:, 0].isnan() if teacher_scorer is not None
                     and teach.topk_logp_NK is not None else None))
    return tb, teach, slices, metrics


def batch_gather(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`TokenBatch.gather` for a batch split over the ranks of `accelerator`: every rank's
    per-token tensor, concatenated in rank order, on every rank (a collective); None for one
    process."""
    world = accelerator.num_processes
    if world == 1:
        return None

    def gather(x_N: torch.Tensor) -> torch.Tensor:
        x = x_N.to(accelerator.device)
        counts = accelerator.gather(torch.tensor([x.numel()], device=x.device)).tolist()
        rows = accelerator.gather(accelerator.pad_across_processes(x, dim=0)).view(world, -1)
        return torch.cat([rows[r, :n] for r, n in enumerate(counts)]).to(x_N.device)
    return gather


def diagnostic_positions(n: int, diag_tokens: int) -> torch.Tensor:
    """The tokens (of n) the teacher-student diagnostics look at: at most `diag_tokens`, evenly
    spread."""
    return torch.linspace(0, n - 1, min(n, diag_tokens)).round().long().unique()


def diagnostic_metrics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Teacher-student diagnostics from `pair_pass` statistics."""
    return {"diag/topk_overlap": float(stats["overlap"].mean()),
            "diag/teacher_mass_on_student_topk": float(stats["teacher_mass"].mean()),
            "diag/entropy_gap": float((stats["entropy_student"]
                                       - stats["entropy_teacher"]).mean()),
            "diag/kl": float(stats["kl"].mean())}


def logprob_gap(episodes: list[Episode], logp_old_N: torch.Tensor) -> dict[str, float]:
    """How far the sampler's log-probs of its own tokens are from the trainer's (log pi_old):
    near zero when both run the same weights; large after a failed weight sync."""
    sampled = torch.tensor([lp for ep in episodes
                            for lp, m in zip(ep.sampled_logprobs, ep.loss_mask) if m])
    if not sampled.numel():
        return {"rollout/logprob_gap": 0.0, "rollout/logprob_gap_max": 0.0}
    diff = (sampled - logp_old_N.float()).abs()
    return {"rollout/logprob_gap": float(diff.mean()), "rollout/logprob_gap_max": float(diff.max())}
