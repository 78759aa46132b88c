"""`train(config)`: the on-policy distillation loop, top to bottom.

`assemble` builds the run's parts; then each iteration: roll out a batch of student episodes ->
score every student token with the student's own rollout-time weights (log pi_old, entropy) and
with the teacher -> split the batch into minibatches, one optimiser step each (gradient
accumulation over micro-batches, token-mean normalised by the kept-token count of the whole
minibatch) -> the sampler sees the new weights -> metrics, periodic eval, checkpoint. Every stage
is a named function below; the losses live in `mmopd.training.losses`, the handling of faults
(non-finite steps, SIGTERM / SIGINT) in `mmopd.training.faults`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mmopd.config import RolloutConfig, TrainConfig
from mmopd.episode import STOP_TIMEOUT, Episode
from mmopd.objectives import TokenBatch, make_plan, reward_weights
from mmopd.rollout.agent_loop import collect_episodes
from mmopd.rollout.drift import DriftStopSampler
from mmopd.rollout.evaluate import (
    evaluation_episodes,
    is_correct,
    outcomes,
    summarise_outcomes,
)
from mmopd.rollout.sampler import HFSampler, awake
from mmopd.rollout.seeds import PROBLEMS, SAMPLING, SHUFFLE, derived_seed
from mmopd.rollout.toolcalls import make_parser
from mmopd.teachers.ema import ema_update
from mmopd.teachers.router import kept_by_teacher
from mmopd.teachers.scorer import TokenScores
from mmopd.training.assemble import Run, assemble
from mmopd.training.checkpoint import checkpoint_problem, newest_checkpoint, save_checkpoint
from mmopd.training.faults import (
    INPUTS,
    OUTPUTS,
    SkipCounter,
    StopSignals,
    agreed,
    floor_teacher_logprobs,
    nonfinite_inputs,
)
from mmopd.training.losses import accumulate_gradients
from mmopd.training.metrics import episode_stats, plot_curves, step_flops, summary_line
from mmopd.training.old_policy import (
    Sources,
    iteration,
    old_metrics,
    replanner,
    sources,
    update_from_forward,
)
from mmopd.training.scoring import batch_gather, score_batch
from mmopd.training.sharding import (
    full_state_dict,
    full_weights,
    is_sharded,
    save_optimizer,
    staged_optimizer,
)
from mmopd.training.warmup import off_policy_warmup


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run on-policy distillation as configured; returns the final eval and the run directory."""
    run = assemble(cfg)
    try:
        with StopSignals() as signals:
            return _train(run, signals)
    finally:  # flush and close the experiment trackers (end_training would also destroy the
        for tracker in run.accelerator.trackers:  # process group, which vLLM or a caller owns)
            tracker.finish()


def _train(run: Run, signals: StopSignals) -> dict[str, Any]:
    cfg = run.cfg
    tcfg, rcfg = cfg.trainer, cfg.rollout
    if cfg.warmup.steps and run.start_step == 0:
        warm_up(run)
    last_eval = run_eval(run, 0) if cfg.eval.at_start and run.start_step == 0 else None
    flops_total: dict[str, float] = {}
    skips = SkipCounter(tcfg.max_skipped_steps)
    total, mbs = tcfg.steps, rcfg.minibatches
    step = run.start_step
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=None)
    for it in range(run.start_step // mbs, total // mbs):
        if signals.stop_now(run.accelerator):  # before this batch's rollout: nothing is lost
            return stop_early(run, step, signals, last_eval, bar)
        # ---- rollout: the student's own episodes under its current weights (a sharded
        # student gathered on every rank until they are scored: forwards differ per rank)
        t0 = time.perf_counter()
        with full_weights(run.model):
            episodes, failed, prefix = rollout(run, it, step)
            t_rollout = time.perf_counter() - t0
            stop = signals.stop_now(run.accelerator)
            # ---- scoring: log pi_old and entropy from the student (or, trained by one step,
            # from the training forward: old_policy), log pi_T from the teacher
            t0 = time.perf_counter()
            src = sources(run, step)
            one = src.old_from_forward
            if not stop:
                tb, teach, slices, diagnostics = score_batch(
                    episodes, None if one else run.old_scorer, run.teacher_scorer,
                    run.teacher_topk,
                    run.need_hidden, run.negative_scorer, ref_scorer=run.ref_scorer,
                    heads=run.heads, needs=run.needs, diag_tokens=tcfg.diagnostics_tokens,
                    overlap_k=cfg.objective.overlap_topk, chunk_size=tcfg.chunk_size)
            t_teacher = time.perf_counter() - t0
        if stop:  # the batch is abandoned; a resume redoes it
            return stop_early(run, step, signals, last_eval, bar)
        tb.gather = batch_gather(run.accelerator)  # batch statistics over every rank's share
        floored = (floor_teacher_logprobs(tb, teacher_floor(run, slices))
                   if run.teacher_scorer is not None else 0)
        tb = reward_weights(tb, cfg.objective)[0]  # once per batch; its plans read them
        stats = batch_stats(run, episodes, tb, flops_total, failed=failed, prefix=prefix,
                            diagnostics=diagnostics, t_rollout=t_rollout, t_teacher=t_teacher)
        if not one:
            stats.update(old_metrics(run, episodes, slices, tb, it))
        stats["teacher_logp_floored"] = floored

        # ---- minibatch updates: several optimiser steps per rollout batch (rho != 1 after one)
        shuffle = torch.Generator().manual_seed(derived_seed(tcfg.seed, it, SHUFFLE, run.rank))
        for mb in minibatches([ep.group for ep in episodes], mbs, shuffle):
            row = {"step": step + 1, **stats,
                   **update(run, episodes, slices, tb, teach, mb, step, skips, src, it)}
            step += 1
            run.metrics_log.write(row)
            bar.update(1)
            if step % tcfg.log_every == 0 or step == total:
                tqdm.write(summary_line(row, total))
            if skips.in_row >= skips.max_in_row:
                newest = newest_checkpoint(run.out / "checkpoints", report=False)
                skips.stop(step, str(newest) if newest else None)

        # ---- weight sync: the next rollout samples from the updated student
        run.sampler.load_weights(run.model)

        # ---- periodic eval and checkpoint (at rollout-batch boundaries)
        if _crossed(step, mbs, cfg.eval.every) or step == total:
            last_eval = run_eval(run, step)
        if _crossed(step, mbs, tcfg.save_every) or step == total:
            checkpoint(run, step)
        run.accelerator.wait_for_everyone()
    bar.close()
    if run.main:
        plot_curves(run.metrics_log.rows(), run.eval_log.rows(), run.out / "curves.png")
    return {"run_dir": str(run.out), "eval": last_eval, "step": step}


def stop_early(run: Run, step: int, signals: StopSignals, last_eval: dict[str, Any] | None,
               bar: Any) -> dict[str, Any]:
    """Stop at a rollout-batch boundary after SIGTERM / SIGINT: checkpoint the weights of `step`
    (unless that checkpoint exists already) so `trainer.resume=auto` continues from there."""
    bar.close()
    ckpt = run.out / "checkpoints" / f"step-{step}"
    missing = step > 0 and (not ckpt.is_dir() or checkpoint_problem(ckpt) is not None)
    if agreed(run.accelerator, [missing])[0]:  # every rank saves a sharded student
        checkpoint(run, step)
    run.accelerator.wait_for_everyone()
    if run.main:
        plot_curves(run.metrics_log.rows(), run.eval_log.rows(), run.out / "curves.png")
    return {"run_dir": str(run.out), "eval": last_eval, "step": step,
            "stopped": signals.received or "a stop signal on another rank",
            "checkpoint": str(ckpt) if step > 0 else None}


def rollout(run: Run, it: int, step: int) -> tuple[list[Episode], list[Episode], int]:
    """Rollout batch `it`: this rank's problems, `samples_per_prompt` episodes each (a teacher
    cache replays its fixed episodes). Returns the episodes that started, those that failed to
    start (their reset raised or timed out), and the reply length sampled (Prefix OPD)."""
    cfg, rcfg = run.cfg, run.cfg.rollout
    torch.manual_seed(derived_seed(cfg.trainer.seed, it, SAMPLING, run.rank))
    n_prompts, n = rcfg.prompts_per_batch, run.params.n
    prefix = prefix_len(rcfg, step)
    if run.cache is not None:  # Lightning OPD: fixed rollouts, scored once
        episodes = run.cache.batch(it, n_prompts * n, cfg.trainer.seed + 7919 * run.rank)
    else:
        starts = [{"seed": derived_seed(cfg.trainer.seed, it, PROBLEMS, run.rank * n_prompts + i)}
                  for i in range(n_prompts)]
        with awake(run.sampler):  # every turn of the batch's episodes, then the engine sleeps
            episodes = collect_episodes(
                run.train_pool.take(len(starts) * n), starts, run.rollout_sampler, run.renderer,
                dataclasses.replace(run.params, max_new_tokens=prefix),
                teacher_view=run.objective.needs_teacher and any(
                    t.view == "privileged" for t in cfg.teacher_list),
                views=("negative",) if run.negative_scorer else (),
                max_turns=_turn_limit(rcfg, step), max_episode_tokens=rcfg.max_episode_tokens,
                parser=make_parser(rcfg.tool_parser), env_id=cfg.env.id,
                env_timeout_s=rcfg.env_timeout_s)
    failed = [ep for ep in episodes if not ep.input_ids]  # reset or prompt rendering failed
    if len(failed) == len(episodes):
        raise RuntimeError(f"every episode of rollout batch {it} failed to start; first "
                           f"error: {failed[0].metadata.get('error')}")
    return [ep for ep in episodes if ep.input_ids], failed, prefix


def minibatches(groups: list[int], mbs: int, generator: torch.Generator) -> list[list[int]]:
    """A shuffled split of the episodes (their query groups given) into exactly `mbs`
    minibatches of whole queries, as the paper's minibatches of prompts (query counts differ
    by at most one; empty minibatches when there are fewer queries): every rank takes the same
    number of optimiser steps per rollout batch even when episodes failed to start
    (torch.chunk would give fewer pieces)."""
    keys = list(dict.fromkeys(groups))
    order = torch.randperm(len(keys), generator=generator).tensor_split(mbs)
    return [[i for i, g in enumerate(groups) if g in chosen]
            for chosen in ({keys[int(k)] for k in part} for part in order)]


def batch_stats(run: Run, episodes: list[Episode], tb: TokenBatch, flops_total: dict[str, float],
                *, failed: list[Episode], prefix: int, diagnostics: dict[str, float],
                t_rollout: float, t_teacher: float) -> dict[str, float]:
    """The rollout batch's metrics, logged with each of its optimiser steps (times per step);
    FLOPs cumulative, so runs compare at equal compute."""
    mbs = run.cfg.rollout.minibatches
    gen_tokens = sum(ep.num_generated for ep in episodes)
    stats = {
        "env_reward": float(tb.reward_E.mean()),
        "train_accuracy": sum(map(is_correct, episodes)) / len(episodes),
        "response_tokens": gen_tokens / len(episodes),
        **episode_stats(episodes), "failed_episodes": len(failed),
        "env_timeouts": sum(ep.stop_reason == STOP_TIMEOUT for ep in episodes + failed),
        **diagnostics,
        "rollout_tokens_per_s": gen_tokens / max(t_rollout, 1e-9),
        "time_rollout_s": t_rollout / mbs, "time_teacher_s": t_teacher / mbs,
        "prefix_len": prefix,
    }
    if isinstance(run.rollout_sampler, DriftStopSampler):  # cumulative early stops
        stats["drift/stopped_samples"] = run.rollout_sampler.stopped
        stats["drift/tokens_not_sampled"] = run.rollout_sampler.tokens_saved
    for k, v in step_flops(episodes, run.n_student, run.n_teacher,
                           int(run.n_teacher > 0)).items():
        flops_total[k] = flops_total.get(k, 0.0) + v
        stats[k] = flops_total[k]
    return stats


def update(run: Run, episodes: list[Episode], slices: list[torch.Tensor], tb: TokenBatch,
           teach: TokenScores, mb: list[int], step: int, skips: SkipCounter, src: Sources,
           it: int) -> dict[str, float]:
    """One optimiser step on the minibatch `mb` (episode indices) of rollout batch `it`;
    returns its metrics. A minibatch with non-finite log-probs, loss or gradient norm is
    skipped (see faults). `src` says where the log-probs come from (old_policy.sources): with
    log pi_old from the training forward, the metrics reading it come after the loss (a
    drifted vLLM engine still stops the run before the optimiser steps)."""
    one = src.old_from_forward
    cfg = run.cfg
    t0 = time.perf_counter()
    idle = not mb  # no episode for this step here: a stand-in at zero weight keeps the ranks
    mb = mb or [0]  # in step (each reduces gradients in every optimiser step)
    tok = torch.cat([slices[i] for i in mb])
    bad = nonfinite_inputs(tb, tok)
    bad = agreed(run.accelerator, bad[:1] + [False] if one else bad)
    if any(bad):  # nothing to learn from: no forward, no backward
        return _skipped(run, step, skips, [n for n, b in zip(INPUTS, bad) if b])
    eps, sl, extra = [episodes[i] for i in mb], [slices[i] for i in mb], {}
    if not one:
        now, total = iteration(cfg, step)
        plan = make_plan(run.objective, tb, now, total, cfg.objective)
        replan = replanner(run.objective, tb, now, total, cfg) if src.replan else None
        out = accumulate_gradients(run.student, run.accelerator, eps, sl, tb, plan, teach,
                                   run.objective, cfg, run.heads, run.tokenizer.pad_token_id,
                                   replan=replan, idle=idle)
    else:
        out, plan, extra = update_from_forward(run, episodes, slices, tb, teach, mb, step, it)
    grad_norm = float(run.accelerator.clip_grad_norm_(run.student.parameters(),
                                                      cfg.optim.max_grad_norm))
    # each rank's share of the token mean, summed: the minibatch's loss over all ranks
    out = out._replace(loss=float(run.accelerator.reduce(
        torch.tensor(out.loss, device=run.accelerator.device), "sum")))
    bad = agreed(run.accelerator, [not math.isfinite(out.loss), not math.isfinite(grad_norm)])
    if any(bad):
        run.optimizer.zero_grad(set_to_none=True)
        return {"loss": out.loss, "grad_norm": grad_norm,
                **_skipped(run, step, skips, [n for n, b in zip(OUTPUTS, bad) if b])}
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    skips.good()
    if run.ema is not None:
        ema_update(run.ema, run.model, run.ema_decay)
    t_train = time.perf_counter() - t0
    n_kept = max(out.kept * (not idle), 1)
    per_teacher = (kept_by_teacher(run.router.last_routes, slices, mb, plan.keep_N)
                   if run.router is not None else {})
    return {"loss": out.loss, **plan.metrics, **extra, **per_teacher,
            "ratio_mean": out.ratio_sum / n_kept,
            "update_kept_frac": out.kept / max(len(tok) * (not idle), 1),
            **({"ratio_clipped_frac": out.clipped / n_kept}
               if cfg.objective.form.ratio_clip else {}),
            "grad_norm": grad_norm, "lr": run.scheduler.get_last_lr()[0],
            "train_tokens_per_s": out.tokens / max(t_train, 1e-9), "time_train_s": t_train,
            "train_padding_frac": out.padding / max(out.tokens + out.padding, 1),
            "skipped_steps": skips.total}


def teacher_floor(run: Run, slices: list[torch.Tensor]) -> float | torch.Tensor:
    """The teacher log-prob floor: one number, or per token the floor of its episode's
    teacher when several teachers share the batch."""
    if run.router is None:
        return run.cfg.teacher.logp_floor
    floors = {t.name: t.logp_floor for t in run.cfg.teachers}
    return torch.cat([torch.full((len(s),), floors[name])
                      for s, name in zip(slices, run.router.last_routes)])


def _skipped(run: Run, step: int, skips: SkipCounter, what: list[str]) -> dict[str, float]:
    """Count and report a skipped step; its metrics."""
    skips.skip(step + 1, what)
    return {"skipped": 1, **{f"nonfinite/{n}": 1 for n in what}, "skipped_steps": skips.total,
            "lr": run.scheduler.get_last_lr()[0]}


def run_eval(run: Run, step: int) -> dict[str, Any] | None:
    """Held-out evaluation, split across ranks (each its share of the problems, a sharded student
    gathered on every rank) and gathered to rank 0, which logs it to eval.jsonl and the
    console."""
    cfg, ecfg, rcfg = run.cfg, run.cfg.eval, run.cfg.rollout
    share = (run.rank, run.accelerator.num_processes)
    with full_weights(run.model), awake(run.sampler):  # the run's own sampler (vLLM too)
        greedy, sampled = evaluation_episodes(
            run.model, run.tokenizer, run.eval_pool, num_problems=ecfg.num_problems,
            pass_k=ecfg.pass_k, temperature=ecfg.temperature, top_p=ecfg.top_p,
            max_new_tokens=ecfg.max_new_tokens or rcfg.max_new_tokens,
            batch_size=rcfg.batch_size, seed=cfg.trainer.seed, stop=rcfg.stop,
            max_turns=ecfg.max_turns or rcfg.max_turns, max_episode_tokens=rcfg.max_episode_tokens,
            env_id=cfg.env.id, vision=run.vision, env_timeout_s=rcfg.env_timeout_s, share=share,
            sampler=run.sampler)
    mine = outcomes(greedy, sampled, ecfg.pass_k)
    rows = gather_object(mine) if share[1] > 1 else mine
    if not run.main:
        return None
    res = summarise_outcomes(rows, ecfg.pass_k)
    row = {"step": step, **res}
    run.eval_log.write(row)
    tqdm.write(f"eval step {step}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in res.items() if k != "num_problems"))
    return row


def checkpoint(run: Run, step: int) -> None:
    """The student (a `save_pretrained` folder), optimiser, scheduler and EMA teacher state,
    written by rank 0. Every rank calls it: a sharded student's weights are gathered to rank 0
    and its optimiser state written in shards by every rank."""
    root, state = run.out / "checkpoints", {"scheduler": run.scheduler.state_dict(),
                                            "world_size": run.accelerator.num_processes}
    weights = shards = None
    if is_sharded(run.model):
        weights = full_state_dict(run.model)
        shards = staged_optimizer(root, step, run.accelerator)
        save_optimizer(run.model, run.optimizer, shards)
    else:
        state["optimizer"] = run.optimizer.state_dict()
    if run.ema is not None:
        state["ema_teacher"] = run.ema.state_dict()
    if run.main:
        save_checkpoint(root, step, run.model, run.tokenizer, state, run.cfg.trainer.keep_last,
                        processor=run.vision, state_dict=weights, optimizer_dir=shards)
    run.accelerator.wait_for_everyone()


def warm_up(run: Run) -> None:
    """The off-policy warm-up on the teacher's own samples (`warmup.steps`)."""
    assert run.t_model is not None
    rcfg = run.cfg.rollout
    teacher_sampler = HFSampler(run.t_model, run.tokenizer, batch_size=rcfg.batch_size,
                                stop_token_ids=run.renderer.stop_token_ids,
                                suppress_token_ids=run.vision.special_ids if run.vision else None)
    off_policy_warmup(run.cfg, run.student, run.accelerator, run.optimizer, run.t_model,
                      run.heads, run.renderer, run.train_pool, run.metrics_log, teacher_sampler)


def _crossed(step: int, advanced: int, every: int) -> bool:
    """Did the last `advanced` steps pass a multiple of `every` (0 = never)?"""
    return every > 0 and step // every > (step - advanced) // every


def _turn_limit(rcfg: RolloutConfig, step: int) -> int:
    """Turns rolled out at optimiser step `step`: max_turns, or TCOD's 1 + step // c."""
    if rcfg.curriculum == "tcod":
        return min(rcfg.max_turns, 1 + step // rcfg.tcod_c)
    return rcfg.max_turns


def prefix_len(rcfg: RolloutConfig, step: int) -> int:
    """Prefix OPD: tokens sampled per reply at optimiser step `step` (max_new_tokens when off)."""
    if not rcfg.prefix_tokens:
        return rcfg.max_new_tokens
    return min(rcfg.max_new_tokens, rcfg.prefix_tokens + int(rcfg.prefix_growth * step))
