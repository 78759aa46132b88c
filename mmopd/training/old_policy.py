"""Where each optimiser step's log-probs come from, decided in one place (`sources`).

log pi_old, the student's log-probs under the weights that sampled the rollout batch, has two
sources: the separate no-grad pass of the student over the batch (scoring), or, when one
optimiser step trains the batch (rho = 1), the training forward itself, whose log-probs at that
step are the rollout's. The reward R = log pi_T - log pi has two: pi_old (the batch's plan, made
once per rollout batch) or the parameters being updated (REOPOLD's Eq. 4-5: each micro-batch's
plan made again from the training forward, `objective.reward_at: current`).

With the reward at the current policy, pi_old is read only by the ratio rho = pi_theta / pi_old
and by statistics of the whole batch that come before the loss (REOPOLD's entropy threshold,
token selection, SOD's per-turn means, drift and vOPD's full distributions); the separate pass
runs for those, and for rho whenever several optimiser steps train one rollout batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from mmopd.config import TrainConfig
from mmopd.episode import Episode
from mmopd.objectives import Objective, Plan, TokenBatch, make_plan, needed_scores
from mmopd.teachers.router import teacher_metrics
from mmopd.teachers.scorer import TokenScores
from mmopd.training.assemble import Run
from mmopd.training.losses import (
    Replan,
    UpdateStats,
    accumulate_gradients,
    pair_pass,
    whole_vocabulary,
)
from mmopd.training.scoring import diagnostic_metrics, diagnostic_positions, logprob_gap


@dataclass(frozen=True)
class Sources:
    """Where one rollout batch's optimiser steps take their log-probs from."""

    # log pi_old from the training forward (no separate pass); else why the pass runs
    old_from_forward: bool
    why_pass: str | None
    # plans made again on each micro-batch from the training forward (the reward at the
    # current policy, or at pi_old when the forward gives it)
    replan: bool


def sources(run: Run, step: int) -> Sources:
    """The sources for the rollout batch starting at optimiser step `step`."""
    cfg, obj = run.cfg, run.objective
    why = pass_needed(cfg, obj, step, has_dropout(run.model), run.teacher_scorer is not None,
                      whole_vocabulary(run.heads.student))
    forward = why is None
    at_current = obj.kind == "pg" and cfg.objective.form.reward_at == "current"
    return Sources(forward, why, obj.kind == "pg" and (forward or at_current))


def pass_needed(cfg: TrainConfig, obj: Objective, step: int, dropout: bool, teacher: bool,
                whole_vocab: bool) -> str | None:
    """Why log pi_old needs the separate pass at optimiser step `step` (None: the training
    forward gives it)."""
    it, total = iteration(cfg, step)
    if not cfg.trainer.old_from_forward:
        return "trainer.old_from_forward is off"
    if cfg.rollout.minibatches > 1:
        return "several optimiser steps train each rollout batch: rho needs pi_old"
    if not teacher:
        return "no teacher scores the student's tokens"
    if obj.kind != "pg" and not whole_vocab:
        return "a divergence over part of the student's output layer"
    if any(t.cross_tokenizer for t in cfg.teacher_list):
        return "a cross-tokenizer teacher's spans are spread with pi_old"
    if dropout:
        return "the student's dropout makes its training forward differ from its rollout"
    if obj.kind == "pg":  # a divergence objective's plan reads no pi_old
        return before_loss(obj, it, total, cfg)
    return None


def before_loss(obj: Objective, it: int, total: int, cfg) -> str | None:
    """Why the plan at rollout iteration `it` reads the whole batch's pi_old before the loss
    (None: each micro-batch's tokens can be planned from their own log-probs)."""
    if not obj.token_local:
        return f"objective {obj.name}'s plan is not token-local"
    if cfg.objective.step_weighting != "none":
        return "step weighting averages pi_old over each turn"
    if cfg.objective.token_selection != "none":
        return "token selection ranks the whole batch"
    if cfg.objective.drift_threshold > 0 or needed_scores(obj, cfg.objective) & {"kl",
                                                                                  "overlap"}:
        return "the plan reads the student's whole distribution next to the teacher's"
    if obj.batch_stats is not None:
        return obj.batch_stats(it, total, cfg.objective)
    return None


def iteration(cfg: TrainConfig, step: int) -> tuple[int, int]:
    """(the rollout iteration optimiser step `step` belongs to, the run's rollout iterations):
    what plans count in (REOPOLD's switch), as the paper counts them."""
    mbs = cfg.rollout.minibatches
    return step // mbs, cfg.trainer.steps // mbs


def replanner(obj: Objective, tb: TokenBatch, it: int, total: int, cfg: TrainConfig) -> Replan:
    """The plan of a micro-batch's tokens from their log-probs at the current policy (the
    reward at the parameters being updated), reading the whole batch's statistics; `tb` has
    its reward weights (objectives.reward_weights)."""
    if not tb.weighted:
        raise ValueError("plans at the current policy read the batch's reward weights: "
                         "apply objectives.reward_weights to the batch first")

    def plan(tok: torch.Tensor, logp: torch.Tensor) -> Plan:
        return make_plan(obj, tb.part(tok, logp.detach()), it, total, cfg.objective)
    return plan


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


def update_from_forward(run: Run, episodes: list[Episode], slices: list[torch.Tensor],
                        tb: TokenBatch, teach: TokenScores, mb: list[int], step: int, it: int
                        ) -> tuple[UpdateStats, Plan, dict[str, float]]:
    """`update`'s gradients with log pi_old from the training forward (one optimiser step
    trains the rollout batch): a policy-gradient plan is made on each micro-batch from its
    log-probs, a divergence objective's (which reads no log pi_old) before the loss. The
    forward's log pi_old and entropy then go into `tb`, and the whole batch's plan is made
    from them for the metrics."""
    cfg, obj = run.cfg, run.objective
    now, total = iteration(cfg, step)
    pg = obj.kind == "pg"
    before = None if pg else make_plan(obj, tb, now, total, cfg.objective)
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
        replan=replanner(obj, tb, now, total, cfg) if pg else None, old_from_forward=True,
        collect=True, on_hidden=on_hidden)
    scores = out.scores or {}
    if len(tok):
        tb.logp_old_N[tok], tb.entropy_N[tok] = scores["logp"].float(), scores["entropy"].float()
    plan = make_plan(obj, tb, now, total, cfg.objective)
    extra = old_metrics(run, episodes, slices, tb, it)
    if stats:
        extra.update(diagnostic_metrics({k: torch.cat(v) for k, v in stats.items()}))
    return out, plan, extra
