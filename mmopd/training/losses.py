"""Losses over the student's hidden states: the per-token divergences and auxiliary terms the
objectives ask for, teacher-student statistics, and gradient accumulation over micro-batches.

Everything works on the final hidden states of the loss positions and rebuilds logits chunk by
chunk through the output layers (`Heads`), fused (fused.py), so no [tokens x vocab] tensor of a
whole batch exists and no chunk is computed twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
from accelerate import Accelerator

from mmopd.config import TrainConfig
from mmopd.episode import Episode, balanced_parts, collate, group_parts
from mmopd.logprobs import (
    final_hidden,
    predicting_positions,
    token_logprobs,
)
from mmopd.objectives import (
    Objective,
    Plan,
    TokenBatch,
    policy_loss_sum,
    ratio_clipped,
    topk_divergence,
)
from mmopd.objectives.divergences import uld_distance
from mmopd.objectives.zoo import pair_stats, teacher_topk_fkl
from mmopd.teachers.scorer import TokenScores, attention_context, packs
from mmopd.training.fused import (
    Projection,
    SampledScores,
    full_divergence_chunks,
    fused_loss,
    gathered_chunks,
)
from mmopd.training.sharding import lockstep_count
from mmopd.vision import VisionInputs, forward_kwargs


@dataclasses.dataclass(frozen=True)
class Heads:
    """Output layers: `sampled` (the student's whole layer, for log-probs of sampled tokens) and
    `student` / `teacher` trimmed to their shared rows (for distributions)."""

    sampled: Projection
    student: Projection
    teacher: Projection | None


def divergence_sum(kind: str, k: int, cfg: TrainConfig, heads: Heads, h_NH: torch.Tensor,
                   scores: TokenScores, tok: torch.Tensor, keep_N: torch.Tensor,
                   sink: SampledScores | None = None) -> torch.Tensor:
    """sum over kept tokens of the per-token divergence `kind` (full vocabulary for k = 0, else
    top-k + tail), times its weight, fused (fused.py); `sink` receives the sampled tokens'
    log-probs and the entropies."""
    if kind == "uld":
        return _uld_sum(cfg, heads.student, h_NH, scores, tok, keep_N, sink)
    beta, dev, w = cfg.objective.jsd_beta, h_NH.device, keep_N.to(h_NH.device).float()
    if k == 0 or cfg.objective.topk_source == "student":
        assert heads.teacher is not None and scores.hidden_NH is not None
        t_head = heads.teacher
        ht = scores.hidden_NH[tok.to(scores.hidden_NH.device)]
        tw, tb = t_head.operands()

        def teacher(sl: slice) -> torch.Tensor:
            return torch.log_softmax(t_head.logits(ht[sl], tw, tb)[0].to(dev), -1)
        if k == 0:
            fn = full_divergence_chunks(kind, beta, teacher, w, sink)
        else:
            picked: dict[str, torch.Tensor] = {}

            def ids(s: torch.Tensor, sl: slice) -> torch.Tensor:
                picked["ids"] = s.topk(k, -1).indices
                with torch.no_grad():
                    picked["t"] = teacher(sl).gather(-1, picked["ids"])
                return picked["ids"]
            fn = gathered_chunks(ids, lambda lp, sl: (
                topk_divergence(kind, lp, picked["t"], beta) * w[sl]).sum(), sink=sink)
    else:
        t_ids, t_lp = scores.topk_ids_NK[tok].to(dev), scores.topk_logp_NK[tok].to(dev)
        fn = gathered_chunks(lambda s, sl: t_ids[sl], lambda lp, sl: (
            topk_divergence(kind, lp, t_lp[sl], beta) * w[sl]).sum(), sink=sink)
    return fused_loss(heads.student, h_NH, fn, cfg.trainer.chunk_size)


def _uld_sum(cfg: TrainConfig, s_proj: Projection, h_NH: torch.Tensor, scores: TokenScores,
             tok: torch.Tensor, keep_N: torch.Tensor,
             sink: SampledScores | None = None) -> torch.Tensor:
    """ULD over kept tokens: the student's top-K probabilities (K: the teacher's) against the
    teacher's, each sorted; no token ids are compared."""
    if scores.topk_logp_NK is None:
        raise ValueError("uld needs the teacher's top-k log-probs (objective.topk)")
    dev = h_NH.device
    t_lp = torch.nan_to_num(scores.topk_logp_NK[tok].to(dev).float(), nan=-math.inf)
    k, w = t_lp.shape[1], keep_N.to(dev).float()
    return fused_loss(s_proj, h_NH, gathered_chunks(
        lambda s, sl: s.topk(k, -1).indices,
        lambda lp, sl: (uld_distance(lp, t_lp[sl]) * w[sl]).sum(), sink=sink),
        cfg.trainer.chunk_size)


def aux_sum(objective: Objective, cfg: TrainConfig, heads: Heads, h_NH: torch.Tensor,
            teach: TokenScores, tok: torch.Tensor, aux_N: torch.Tensor) -> torch.Tensor:
    """An objective's auxiliary divergence, summed over the tokens where its weight is > 0:
    EOPD's forward KL over the teacher's top-k (renormalised), or AOPD's full divergence."""
    sel = (aux_N > 0).nonzero().squeeze(-1)
    if not sel.numel():
        return h_NH.sum() * 0.0  # keeps the graph connected for DDP
    dev = h_NH.device
    if objective.aux == "teacher_topk_fkl":
        k = cfg.objective.eopd_topk
        ids = teach.topk_ids_NK[tok[sel], :k].to(dev)
        tlp = teach.topk_logp_NK[tok[sel], :k].to(dev)
        w = aux_N[sel].to(dev)
        return fused_loss(heads.student, h_NH[sel.to(dev)], gathered_chunks(
            lambda s, sl: ids[sl], lambda lp, sl: (teacher_topk_fkl(lp, tlp[sl])
                                                   * w[sl]).sum()), cfg.trainer.chunk_size)
    return divergence_sum(cfg.objective.aopd_divergence, 0, cfg, heads, h_NH[sel.to(dev)],
                          teach, tok[sel], aux_N[sel])


@torch.no_grad()
def pair_pass(heads: Heads, h_old_NH: torch.Tensor, h_teacher_NH: torch.Tensor,
              idx: torch.Tensor, k: int, chunk_size: int) -> dict[str, torch.Tensor]:
    """`pair_stats` of student (pi_old) and teacher distributions at positions `idx`, rebuilt
    chunk by chunk from both models' final hidden states."""
    assert heads.teacher is not None
    (sw, sb), (tw, tb) = heads.student.operands(), heads.teacher.operands()
    parts: dict[str, list[torch.Tensor]] = {}
    for c in idx.split(chunk_size):
        out = pair_stats(heads.student.logits(h_old_NH[c.to(h_old_NH.device)], sw, sb)[0],
                         heads.teacher.logits(h_teacher_NH[c.to(h_teacher_NH.device)], tw,
                                              tb)[0].to(h_old_NH.device), k)
        for name, v in out.items():
            parts.setdefault(name, []).append(v.float().cpu())
    return {name: torch.cat(v) for name, v in parts.items()}


def whole_vocabulary(proj: Projection) -> bool:
    """Does the output layer keep all its rows (its log-probs are then the model's own, not
    renormalised over the rows a teacher shares)?"""
    return proj.vocab is None or proj.vocab >= proj.layer.weight.shape[0]


class UpdateStats(NamedTuple):
    """What one minibatch's gradient accumulation measured."""

    loss: float  # the minibatch loss (its normalised sum)
    ratio_sum: float  # sum of rho over kept tokens (policy gradient; the kept count otherwise)
    tokens: int  # non-padding tokens through the student
    clipped: int  # kept tokens that the ratio clip took out of the gradient
    # with `collect`: the training forward's log pi_old and entropy of the minibatch's tokens
    scores: dict[str, torch.Tensor] | None = None
    padding: int = 0  # padding positions the forwards computed
    kept: int = 0  # tokens in the loss (kept, or with an auxiliary term), as trained


# (the micro-batch's flat token indices, their log-probs under the weights being updated) ->
# the plan of those tokens at the current policy
Replan = Callable[[torch.Tensor, torch.Tensor], Plan]


def accumulate_gradients(student: torch.nn.Module, accelerator: Accelerator,
                         episodes: list[Episode], slices: list[torch.Tensor], tb: TokenBatch,
                         plan: Plan | None, teach: TokenScores, objective: Objective,
                         cfg: TrainConfig, heads: Heads, pad_id: int,
                         replan: Replan | None = None, old_from_forward: bool = False,
                         collect: bool = False,
                         on_hidden: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                         idle: bool = False) -> UpdateStats:
    """Accumulate gradients of one minibatch with `plan`'s tokens and advantages (made on the
    rollout batch at pi_old) or, with `replan`, each micro-batch's plan at the current policy:
    made from the log-probs of the training forward (a no-grad pass of the output layer over
    the micro-batch before its loss), the reward R = log pi_T - log pi_theta of the parameters
    being updated. `old_from_forward`: those log-probs are log pi_old too (one optimiser step
    trains the rollout batch: rho = 1). With `collect`, the training forward's log-probs and
    entropies come back (the fused path; a divergence objective's output layer must be the
    student's whole one).

    The loss is normalised per `objective.normaliser`: "query", each kept token weighs
    1 / (Q K_q) (K_q the kept tokens of its query's responses, Q the minibatch's queries over
    all ranks; micro-batches hold whole queries, so K_q is known before their loss); "batch",
    1 / K (K the minibatch's kept tokens over all ranks: known before the first micro-batch,
    or, planned at the current policy, after the last, when the gradients are divided).

    `on_hidden(h, tok)` sees each micro-batch's detached final hidden states and their token
    indices while the output layers are gathered (FSDP2). `idle`: this rank has no episode for
    this optimiser step; `episodes` is a stand-in that runs at zero weight, so every rank takes
    part in the step's gradient reduction."""
    device, world = accelerator.device, accelerator.num_processes
    unwrapped = accelerator.unwrap_model(student)
    tok_all = torch.cat(slices)
    collect = collect or old_from_forward
    found: dict[str, list[torch.Tensor]] = {"tok": [], "logp": [], "entropy": []}
    if collect and objective.kind != "pg" and not whole_vocabulary(heads.student):
        raise ValueError("log pi_old from the training forward needs a divergence over the "
                         "student's whole output layer")
    if replan is None and plan is None:
        raise ValueError("accumulate_gradients needs a plan or a replan")
    if old_from_forward and objective.kind == "pg" and replan is None:
        raise ValueError("log pi_old from the training forward needs the plan made inside the "
                         "loss (replan)")
    per_query = cfg.objective.form.normaliser == "query"
    query_N = tb.group_E[tb.episode_N]  # the query (prompt group) of each token
    denom = 1.0  # "batch" planned at the current policy: applied after the last micro-batch
    if per_query:  # the minibatch's queries over all ranks
        n_queries = 0 if idle else len({int(ep.group) for ep in episodes})
        queries = max(float(accelerator.reduce(torch.tensor(n_queries, device=device), "sum")),
                      1.0)
    elif replan is None:
        # the divisor is known before any micro-batch runs, so accumulation gives exactly the
        # full-batch gradient
        assert plan is not None
        n_keep = accelerator.reduce(plan.counted_N[tok_all].sum().to(device) * (not idle),
                                    "sum")
        denom = max(float(n_keep), 1.0)
    tcfg = cfg.trainer
    loss_total, ratio_sum, seq_tokens, clipped, padding = 0.0, 0.0, 0, 0, 0
    kept = torch.zeros((), dtype=torch.long, device=device)
    # micro-batches of at most micro_batch_size episodes (whole queries under the per-query
    # normaliser), token counts balanced, each packed without padding between sequences (text
    # students: one row under flash-attention, rows laid out by the attention's cost under SDPA
    # / eager; a VLM's rows are padded)
    lengths = [len(e.input_ids) for e in episodes]
    parts = [] if idle else (
        group_parts([int(e.group) for e in episodes], lengths, tcfg.micro_batch_size,
                    tcfg.micro_batch_tokens) if per_query else
        balanced_parts(lengths, tcfg.micro_batch_size, tcfg.micro_batch_tokens))
    packed, context = tcfg.packing and packs(unwrapped), attention_context(unwrapped)
    # FSDP: every rank runs as many sharded passes as the rank with the most micro-batches; the
    # extra ones repeat the first at zero weight (the same modules gather in the same order)
    n_parts = lockstep_count(len(parts), unwrapped)
    if idle:  # DDP reduces gradients in the last backward: every rank must run one
        n_parts = max(n_parts, 1)
    for j in range(n_parts):
        idle = j >= len(parts)
        part = parts[j] if not idle else [0]
        batch = collate([episodes[i].input_ids for i in part],
                        [episodes[i].loss_mask for i in part], pad_id, device, packed, context)
        if batch.order is not None:  # the sequences as the rows lay them out
            part = [part[k] for k in batch.order]
        eps, tok = [episodes[i] for i in part], torch.cat([slices[i] for i in part])
        sync = j == n_parts - 1
        vision = VisionInputs.cat(e.vision for e in eps)
        with accelerator.no_sync(student) if not sync else nullcontext():
            hidden = final_hidden(student, batch.input_ids, **batch.model_inputs(),
                                  **forward_kwargs(unwrapped, batch.input_ids, vision))
            rows, cols = predicting_positions(batch.loss_mask)
            h = hidden[rows, cols - 1]
            y = batch.input_ids[rows, cols]
            if on_hidden is not None and not idle:
                on_hidden(h.detach(), tok)
            sink = SampledScores(y) if collect else None
            now = None
            if replan is not None:  # the plan of these tokens at the current policy
                now = token_logprobs(heads.sampled, h.detach(), y, tcfg.chunk_size,
                                     entropy=False)["logp"]
                mine = replan(tok, now)
            else:
                assert plan is not None
                mine = Plan(plan.keep_N[tok], plan.advantage_N[tok], {},
                            plan.weight_N[tok] if plan.weight_N is not None else None,
                            plan.aux_N[tok] if plan.aux_N is not None else None)
            keep, counted = mine.keep_N, mine.counted_N
            # each counted token's share of the normaliser
            if per_query:
                q = torch.unique(query_N[tok], return_inverse=True)[1]
                k_q = torch.zeros(int(q.max()) + 1 if len(q) else 0).index_add_(
                    0, q, counted.float())
                share = (counted.float() / (queries * k_q[q].clamp(min=1.0))).to(device)
            else:
                share = torch.full((len(tok),), 1.0 / denom, device=device)
            if objective.kind == "pg":
                logp_old = now if old_from_forward else tb.logp_old_N[tok].to(device)
                adv, clip = mine.advantage_N.to(device), cfg.objective.form.ratio_clip
                weight = keep.to(device).float() * share
                loss_sum, logp = _fused_policy_loss(heads.sampled, h, y, logp_old, adv,
                                                    weight, clip, cfg,
                                                    reward_grad=not objective.stop_gradient,
                                                    sink=sink)
                with torch.no_grad():
                    k = keep.to(device)
                    ratio = float((torch.exp(logp - logp_old) * k).sum())
                    n_clipped = 0 if clip is None else int(
                        (ratio_clipped(logp, logp_old, adv, clip) & k).sum())
                if mine.aux_N is not None:
                    loss_sum = loss_sum + aux_sum(objective, cfg, heads, h, teach, tok,
                                                   mine.aux_N * share.cpu())
            else:
                weight = keep.float() if mine.weight_N is None else keep * mine.weight_N
                loss_sum = divergence_sum(objective.divergence, cfg.objective.topk, cfg,
                                          heads, h, teach, tok, weight * share.cpu(), sink)
                ratio, n_clipped = float(keep.sum()), 0
            if sink is not None and not idle:
                logp, ent = sink.result()
                found["tok"].append(tok)
                found["logp"].append(logp.cpu())
                found["entropy"].append(ent.cpu())
            loss = loss_sum * world  # DDP averages over ranks; undo it for the normalised sum
            accelerator.backward(loss * 0.0 if idle else loss)
        if not idle:
            loss_total += loss_sum.item()
            ratio_sum, clipped = ratio_sum + ratio, clipped + n_clipped
            kept += counted.sum().to(device)
            seq_tokens += sum(len(e.input_ids) for e in eps)
            padding += batch.padding
    scores = None
    if collect and found["tok"]:  # the training forward's log pi_old and entropy, in the
        at = torch.empty(int(tok_all.max()) + 1, dtype=torch.long)  # order of `slices`
        at[tok_all] = torch.arange(len(tok_all))
        order = at[torch.cat(found["tok"])]
        scores = {k: torch.empty_like(torch.cat(found[k])).index_copy_(0, order,
                                                                       torch.cat(found[k]))
                  for k in ("logp", "entropy")}
    n_kept = int(kept)
    if per_query or replan is None:
        return UpdateStats(loss_total, ratio_sum, seq_tokens, clipped, scores, padding, n_kept)
    denom = max(float(accelerator.reduce(kept, "sum")), 1.0)
    for p in student.parameters():  # the token mean, now that every rank's kept count is known
        if p.grad is not None:
            p.grad.div_(denom)
    return UpdateStats(loss_total / denom, ratio_sum, seq_tokens, clipped, scores, padding,
                       n_kept)


def _fused_policy_loss(proj: Projection, h: torch.Tensor, y: torch.Tensor,
                       logp_old: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
                       clip: tuple[float, float] | None, cfg: TrainConfig,
                       reward_grad: bool = False, sink: SampledScores | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy-gradient loss sum (each token's term times its `weight`), fused, and the
    sampled tokens' log-probs (detached); `sink` receives them and the entropies."""
    got: list[torch.Tensor] = []
    loss = fused_loss(proj, h, gathered_chunks(
        lambda s, sl: y[sl, None], lambda lp, sl: policy_loss_sum(
            lp.squeeze(-1), logp_old[sl], adv[sl], weight[sl], clip, reward_grad),
        keep=got, sink=sink), cfg.trainer.chunk_size)
    logp = torch.cat(got).squeeze(-1) if got else h.new_zeros(0)
    return loss, logp
