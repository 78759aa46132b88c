"""Log pi_old, the student's log-probs under the weights that sampled the rollout batch: from
the separate scoring pass, or, when one optimiser step trains the batch, from the training forward
itself (mmopd.objectives.tokenwise); and what reads it besides the plan."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from mmopd.episode import Episode
from mmopd.objectives import Plan, TokenBatch, make_plan
from mmopd.objectives.tokenwise import plannable, token_planner
from mmopd.teachers.router import teacher_metrics
from mmopd.teachers.scorer import TokenScores
from mmopd.training.assemble import Run
from mmopd.training.losses import (
    UpdateStats,
    accumulate_gradients,
    pair_pass,
    whole_vocabulary,
)
from mmopd.training.scoring import diagnostic_metrics, diagnostic_positions, logprob_gap


def old_in_forward(run: Run, step: int) -> bool:
    """Does the training forward give log pi_old for the rollout batch starting at `step`? One
    optimiser step per batch (rho = 1), a plan made token by token at this step
    (mmopd.objectives.tokenwise), a teacher on the student's tokens and a student without
    dropout (whose training forward would differ from its rollout)."""
    cfg = run.cfg
    return (cfg.trainer.old_from_forward and cfg.rollout.minibatches == 1
            and run.teacher_scorer is not None
            and (run.objective.kind == "pg" or whole_vocabulary(run.heads.student))
            and not any(t.cross_tokenizer for t in cfg.teacher_list)
            and not has_dropout(run.model)
            and plannable(run.objective, step, cfg.trainer.steps, cfg.objective) is None)


def old_metrics(run: Run, episodes: list[Episode], slices: list[torch.Tensor],
                tb: TokenBatch, it: int) -> dict[str, float]:
    """What reads log pi_old besides the plan: the sampler's agreement (stops a drifted vLLM
    engine) and the per-teacher KL of a routed run."""
    stats = check_sync(run, episodes, tb, it)
    if run.router is not None:
        stats.update(teacher_metrics(run.router.last_routes, episodes, slices, tb.logp_old_N,
                                     tb.logp_teacher_N))
    return stats


def check_sync(run: Run, episodes: list[Episode], tb: TokenBatch, it: int) -> dict[str, float]:
    """The sampler's log-probs of its own tokens against the trainer's log pi_old: a vLLM engine
    that drifted from the student's weights stops the run before it trains on its samples."""
    if run.cache is not None:
        return {}
    gap, v = logprob_gap(episodes, tb.logp_old_N), run.cfg.rollout.vllm
    if run.cfg.rollout.backend == "vllm" and gap["rollout/logprob_gap"] > v.max_logprob_gap:
        raise RuntimeError(
            f"rollout batch {it}: the vLLM engine's sampled-token log-probs differ from the "
            f"trainer's by {gap['rollout/logprob_gap']:.4f} per token on average (max "
            f"{gap['rollout/logprob_gap_max']:.4f}; rollout.vllm.max_logprob_gap "
            f"{v.max_logprob_gap}): the engine is not sampling from the student's "
            "weights (a failed weight sync, or a dtype / kernel mismatch)")
    return gap


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or torch.equal(a, b))


def has_dropout(model: PreTrainedModel) -> bool:
    """Dropout active in training mode (a module, a LoRA adapter's, or the config's attention
    or hidden dropout): the training forward then is not the rollout's distribution."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    configs = [getattr(model, "config", None)]
    if hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    names = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop",
             "embd_pdrop")
    return any(isinstance(v := getattr(c, n, 0), float | int) and v > 0
               for c in configs for n in names)


def update_in_forward(run: Run, episodes: list[Episode], slices: list[torch.Tensor],
                       tb: TokenBatch, teach: TokenScores, mb: list[int], step: int, it: int
                       ) -> tuple[UpdateStats, Plan, dict[str, float]]:
    """`update`'s gradients with the plan made inside the loss (a divergence objective's,
    which reads no log pi_old, before it); log pi_old and the entropy of the training forward
    go into `tb`, and the whole batch's plan is made from them for the metrics. That plan must
    keep the tokens the loss kept, or the run stops before the optimiser steps."""
    cfg, device, obj = run.cfg, run.accelerator.device, run.objective
    total = cfg.trainer.steps
    before = planner = None
    if obj.kind == "pg":
        planner = token_planner(obj, tb, step, total, cfg.objective, device)
    else:
        before = make_plan(obj, tb, step, total, cfg.objective)
    tok = torch.cat([slices[i] for i in mb])
    diag = (cfg.trainer.diagnostics_tokens > 0 and run.heads.teacher is not None
            and teach.hidden_NH is not None and len(tok) > 0)
    stats: dict[str, list[torch.Tensor]] = {}
    on_hidden = None
    if diag:  # the diagnostics' tokens, from the training forward's hidden states
        at = torch.zeros(len(tb.logp_old_N), dtype=torch.bool)
        at[diagnostic_positions(len(at), cfg.trainer.diagnostics_tokens)] = True

        def on_hidden(h: torch.Tensor, rows: torch.Tensor) -> None:
            pick = at[rows]
            if pick.any():
                got = pair_pass(run.heads, h[pick.to(h.device)], teach.hidden_at(rows[pick]),
                                torch.arange(int(pick.sum())), cfg.objective.overlap_topk,
                                cfg.trainer.chunk_size)
                for k, v in got.items():
                    stats.setdefault(k, []).append(v)
    out = accumulate_gradients(
        run.student, run.accelerator, [episodes[i] for i in mb], [slices[i] for i in mb], tb,
        before, teach, obj, cfg, run.heads, run.tokenizer.pad_token_id,
        planner=planner, collect=True, on_hidden=on_hidden)
    scores = out.scores or {}
    if len(tok):
        tb.logp_old_N[tok], tb.entropy_N[tok] = scores["logp"].float(), scores["entropy"].float()
    plan = make_plan(obj, tb, step, total, cfg.objective)
    kept = (int(plan.keep_N[tok].sum()) == round(out.ratio_sum) if before is None else
            torch.equal(before.keep_N, plan.keep_N) and _same(before.weight_N, plan.weight_N))
    if not kept:
        raise RuntimeError(
            f"objective {obj.name}: its plan over the batch keeps other tokens (or weights) than "
            "the loss did with log pi_old from the training forward; its `tokens` must give "
            "each token's keep mask and advantage as its plan does (or set "
            "trainer.old_from_forward=false)")
    extra = old_metrics(run, episodes, slices, tb, it)
    if stats:
        extra.update(diagnostic_metrics({k: torch.cat(v) for k, v in stats.items()}))
    return out, plan, extra
