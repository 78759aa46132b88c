"""`train(config)`: the on-policy distillation loop, top to bottom.

Each iteration: roll out a batch of student episodes -> score every student token with the
student's own rollout-time weights (log pi_old, entropy) and with the teacher -> split the batch
into minibatches, one optimiser step each (gradient accumulation over micro-batches, token-mean
normalised by the kept-token count of the whole minibatch) -> the sampler sees the new weights ->
metrics, periodic eval, checkpoint. The losses themselves live in mmopd/losses.py.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mmopd.cache import TeacherCache
from mmopd.checkpoint import (
    load_state,
    load_student,
    resolve_resume,
    save_checkpoint,
    set_rng_state,
)
from mmopd.config import RolloutConfig, TrainConfig, dump_yaml
from mmopd.drift import DriftStopSampler
from mmopd.envs import import_env_modules, make_env
from mmopd.episode import STOP_REASONS, Episode, pad_right
from mmopd.evaluate import EnvPool, evaluate, is_correct
from mmopd.logprobs import (
    final_hidden,
    lm_head_fn,
    predicting_positions,
    target_logprobs,
)
from mmopd.losses import (
    Heads,
    accumulate_gradients,
    divergence_sum,
    needs_teacher_hidden,
    pair_pass,
)
from mmopd.metrics import JsonlLog, plot_curves, summary_line
from mmopd.models import (
    check_same_rendering,
    check_same_vision,
    check_same_vocab,
    is_lora,
    load_model,
    load_tokenizer,
    load_vision,
    merged_state_dict,
    plain_copy,
    resolve_dtype,
    save_merged,
)
from mmopd.objectives import (
    OBJECTIVES,
    TokenBatch,
    make_plan,
    needed_scores,
)
from mmopd.optim import make_accelerator, make_optimizer, make_scheduler
from mmopd.render import ChatRenderer
from mmopd.rollout import collect_episodes
from mmopd.sampler import HFSampler, Sampler, SamplingParams
from mmopd.teacher import HFScorer, Teacher, TokenScores
from mmopd.toolcalls import make_parser
from mmopd.vision import VisionInputs, forward_kwargs

_PROBLEMS, _SAMPLING, _SHUFFLE, _WARMUP = 0, 1, 2, 3  # independent random streams of the seed


def _derived_seed(seed: int, iteration: int, stream: int, i: int = 0) -> int:
    """A seed that depends only on (run seed, iteration, purpose): resumed runs replay exactly."""
    return int(np.random.SeedSequence([seed, iteration, stream, i]).generate_state(1)[0])


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


def step_flops(episodes: list[Episode], n_student: int, n_teacher: int,
               scorers: int) -> dict[str, float]:
    """Approximate FLOPs of one rollout batch (2 x params per token forward, 6 x with backward):
    rollout = one forward over every token of every episode (prompt prefill and each generated
    token); training = the student's forward + backward over the sequences, plus `scorers`
    no-grad forwards (log pi_old, the teacher, ...) counted at the teacher's size for the
    teacher."""
    tokens = sum(len(ep.input_ids) for ep in episodes)
    return {"flops_rollout": 2.0 * n_student * tokens,
            "flops_train": (6.0 * n_student + 2.0 * n_student + 2.0 * n_teacher * scorers) * tokens}


def episode_stats(episodes: list[Episode]) -> dict[str, float]:
    """Per-batch agent metrics: turns, tool use and failures, and why episodes ended."""
    n = max(len(episodes), 1)
    calls = sum(ep.metadata.get("tool_calls", 0) for ep in episodes)
    out = {
        "turns": sum(len(ep.metadata.get("completions", ())) for ep in episodes) / n,
        "tool_calls": calls / n,
        "tool_errors": sum(ep.metadata.get("tool_errors", 0) for ep in episodes) / n,
        "tool_parse_errors": sum(ep.metadata.get("parse_errors", 0) for ep in episodes) / n,
    }
    for r in STOP_REASONS:
        out[f"stop_{r}_frac"] = sum(ep.stop_reason == r for ep in episodes) / n
    return out


def _token_slices(episodes: list[Episode]) -> list[torch.Tensor]:
    """Indices of each episode's student tokens in the flat [N] layout (episode, then position)."""
    counts = [ep.num_generated for ep in episodes]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return [torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in range(len(episodes))]


def _probe_messages(env: Any) -> list[dict[str, Any]]:
    """The prompt of the first of a few episodes that starts (a bad data row is skipped; the
    rollout records such rows as failed episodes)."""
    for seed in range(8):
        try:
            return env.reset(seed=seed)[1]["messages"]
        except Exception:
            continue
    return [{"role": "user", "content": "What is 2+2?"}]


def score_batch(episodes: list[Episode], old_scorer: HFScorer, teacher_scorer: Teacher | None,
                teacher_topk: int = 0, keep_hidden: bool = False,
                negative_scorer: HFScorer | None = None, *, ref_scorer: HFScorer | None = None,
                heads: Heads | None = None, needs: frozenset[str] = frozenset(),
                diag_tokens: int = 0, overlap_k: int = 10, chunk_size: int = 256,
                ) -> tuple[TokenBatch, TokenScores, list[torch.Tensor], dict[str, float]]:
    """log pi_old and entropy from the student, log pi_T (and its entropy) from the teacher, and
    what the objective needs besides (log pi_ref, the teacher under a negative view, per-token
    KL and top-k overlap), flat over tokens; plus teacher-student diagnostics on a sample."""
    pair = bool({"kl", "overlap"} & needs) and teacher_scorer is not None
    diag = (diag_tokens > 0 and teacher_scorer is not None and heads is not None
            and heads.teacher is not None)
    old = old_scorer.score(episodes, keep_hidden=pair or diag)
    teach = (teacher_scorer.score(episodes, topk=teacher_topk,
                                  keep_hidden=keep_hidden or pair or diag)
             if teacher_scorer else old)
    negative = negative_scorer.score(episodes).logp_N if negative_scorer else None
    ref = ref_scorer.score(episodes).logp_N if ref_scorer else None
    stats: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    n = old.logp_N.numel()
    if (pair or diag) and n:
        assert heads is not None and heads.teacher is not None
        idx = (torch.arange(n) if pair else
               torch.linspace(0, n - 1, min(n, diag_tokens)).round().long().unique())
        stats = pair_pass(heads, old.hidden_NH, teach.hidden_NH, idx, overlap_k, chunk_size)
        metrics = {"diag/topk_overlap": float(stats["overlap"].mean()),
                   "diag/teacher_mass_on_student_topk": float(stats["teacher_mass"].mean()),
                   "diag/entropy_gap": float((stats["entropy_student"]
                                              - stats["entropy_teacher"]).mean()),
                   "diag/kl": float(stats["kl"].mean())}
    slices = _token_slices(episodes)
    tb = TokenBatch(
        episode_N=torch.cat([torch.full((len(s),), i) for i, s in enumerate(slices)]),
        step_N=torch.tensor([k for ep in episodes
                             for k, m in zip(ep.step_index, ep.loss_mask) if m], dtype=torch.long),
        logp_old_N=old.logp_N, logp_teacher_N=teach.logp_N, entropy_N=old.entropy_N,
        reward_E=torch.tensor([ep.reward for ep in episodes]),
        group_E=torch.tensor([ep.group for ep in episodes]), logp_negative_N=negative,
        logp_ref_N=ref, teacher_entropy_N=teach.entropy_N if teacher_scorer else None,
        kl_N=stats.get("kl") if pair else None, overlap_N=stats.get("overlap") if pair else None)
    return tb, teach, slices, metrics


def logprob_gap(episodes: list[Episode], logp_old_N: torch.Tensor) -> dict[str, float]:
    """How far the sampler's log-probs of its own tokens are from the trainer's (log pi_old):
    near zero when both run the same weights; large after a failed weight sync."""
    sampled = torch.tensor([lp for ep in episodes
                            for lp, m in zip(ep.sampled_logprobs, ep.loss_mask) if m])
    if not sampled.numel():
        return {"rollout/logprob_gap": 0.0, "rollout/logprob_gap_max": 0.0}
    diff = (sampled - logp_old_N.float()).abs()
    return {"rollout/logprob_gap": float(diff.mean()), "rollout/logprob_gap_max": float(diff.max())}


def make_vllm_sampler(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any,
                      renderer: ChatRenderer, vision: Any, out: Path) -> Sampler:
    """A colocated vLLM engine holding the student's current weights. It starts from the
    checkpoint directory when there is one; a tiny (built in memory) or separately tokenised
    student is saved under the run directory first."""
    from mmopd.vllm_sampler import VLLMSampler

    if vision is not None:
        raise NotImplementedError("rollout.backend=vllm samples text students; VLM students roll "
                                  "out with rollout.backend=hf")
    path = cfg.model.path
    if cfg.model.tiny is not None or cfg.model.tokenizer or path is None:
        path = str(out / "vllm_init")
        save_merged(model, path)
        tokenizer.save_pretrained(path)
    v = cfg.rollout.vllm
    gen_eos = model.generation_config.eos_token_id
    stop = set(renderer.stop_token_ids) | set(
        gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
    dtype = v.dtype if v.dtype != "auto" else (
        "bfloat16" if cfg.trainer.bf16 else str(model.dtype).removeprefix("torch."))
    sampler = VLLMSampler(path, tokenizer, stop_token_ids=stop, dtype=dtype,
                          gpu_memory_utilization=v.gpu_memory_utilization,
                          max_model_len=v.max_model_len, sleep=v.sleep, seed=cfg.trainer.seed,
                          enforce_eager=v.enforce_eager, cpu_kv_cache_gb=v.cpu_kv_cache_gb)
    sampler.load_weights(model)  # resumed or LoRA-merged weights, not the directory's
    return sampler


def make_served_teacher(cfg: TrainConfig, tokenizer: Any) -> Teacher:
    """The teacher behind a vLLM server, checked (reachable, same tokenizer) before training."""
    import os

    from mmopd.served import ServedTeacher

    s = cfg.teacher.served
    assert s.url is not None
    key = os.environ.get(s.api_key_env) if s.api_key_env else None
    if s.api_key_env and key is None:
        raise ValueError(f"teacher.served.api_key_env: environment variable {s.api_key_env!r} "
                         "is not set")
    teacher = ServedTeacher(s.url, model=s.model,
                            view="teacher" if cfg.teacher.view == "privileged" else "student",
                            batch_size=s.batch_size, concurrency=s.concurrency,
                            timeout_s=s.timeout_s, max_retries=s.max_retries,
                            entropy_topk=s.topk, api_key=key)
    obj = OBJECTIVES[cfg.objective.name]
    asked = max(cfg.teacher.topk, cfg.objective.topk if obj.kind == "divergence" else 0,
                cfg.objective.eopd_topk if "teacher_topk" in needed_scores(obj, cfg.objective)
                else 0)
    teacher.check(tokenizer, topk=asked)
    return teacher


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run on-policy distillation as configured; returns the final eval and the run directory."""
    tcfg, rcfg = cfg.trainer, cfg.rollout
    out = Path(tcfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(tcfg.bf16)
    device = accelerator.device
    set_seed(tcfg.seed)
    objective = OBJECTIVES[cfg.objective.name]
    if rcfg.backend == "vllm":  # a missing or too old vLLM fails before anything loads
        from mmopd.vllm_sampler import check_vllm

        check_vllm()

    # Environments first: a bad env id or data file fails before any model is loaded.
    import_env_modules(cfg.env.imports)
    train_pool = EnvPool(lambda: make_env(cfg.env.id, **cfg.env.kwargs))
    eval_pool = EnvPool(lambda: make_env(cfg.env.id, **{**cfg.env.kwargs, **cfg.env.eval_kwargs}))
    train_pool.take(1), eval_pool.take(1)

    tokenizer = load_tokenizer(cfg.model)
    vision = load_vision(cfg.model, tokenizer)  # None for text-only students
    student = load_model(cfg.model, tokenizer, trainable=True, vision=vision)
    renderer = ChatRenderer(tokenizer, vision)

    teacher_scorer: Teacher | None = None
    t_model: torch.nn.Module | None = None  # the live teacher (None: none, or a cache)
    vocab = None
    cache = None
    if objective.needs_teacher and cfg.teacher.kind == "cache":  # Lightning OPD
        cache = TeacherCache.load(cfg.teacher.cache)
        cache.check_fits(tokenizer)
        teacher_scorer = cache
    elif objective.needs_teacher and cfg.teacher.kind == "served":
        if vision is not None:
            raise NotImplementedError("teacher.kind=served scores text episodes; VLM teachers "
                                      "run in process (teacher.kind=model)")
        teacher_scorer = make_served_teacher(cfg, tokenizer)
    elif objective.needs_teacher:
        if cfg.teacher.kind in ("self", "ema"):  # the initial student (EMA: then tracking it)
            dtype = torch.float32 if cfg.teacher.kind == "ema" else resolve_dtype(cfg.model.dtype)
            t_model = plain_copy(student).to(dtype)  # LoRA: merged, a plain model
        else:
            t_tok = load_tokenizer(cfg.teacher.model, "teacher.model")
            t_vision = load_vision(cfg.teacher.model, t_tok, "teacher.model")
            t_model = load_model(cfg.teacher.model, t_tok, "teacher.model", vision=t_vision)
            check_same_vocab(tokenizer, t_tok, t_model, student)
            check_same_vision(vision, t_vision)
            if cfg.teacher.check_template:
                check_same_rendering(tokenizer, t_tok, _probe_messages(train_pool.take(1)[0]))
        t_model.requires_grad_(False).to(device)
        # Output layers are often padded past the tokenizer, differently per model size
        # (Qwen2.5: 151936 rows at 1.5B, 152064 at 7B); distributions are compared on the rows
        # both have. Sampled-token log-probs use each model's full output layer.
        vocab = min(student.get_output_embeddings().weight.shape[0],
                    t_model.get_output_embeddings().weight.shape[0])
        teacher_scorer = HFScorer(t_model, tokenizer.pad_token_id,
                                  view="teacher" if cfg.teacher.view == "privileged" else "student",
                                  micro_batch_size=tcfg.micro_batch_size,
                                  chunk_size=tcfg.chunk_size, topk_vocab=vocab)
    needs = needed_scores(objective, cfg.objective)
    ref_scorer = None
    if "ref" in needs:  # G-OPD's reference: the initial student, frozen
        ref_model = plain_copy(student).to(resolve_dtype(cfg.model.dtype)).requires_grad_(False)
        ref_scorer = HFScorer(ref_model.to(device), tokenizer.pad_token_id,
                              micro_batch_size=tcfg.micro_batch_size, chunk_size=tcfg.chunk_size)

    resume_dir = resolve_resume(tcfg.resume, out / "checkpoints")
    if resume_dir is not None:
        student = load_student(cfg.model, tokenizer, resume_dir, vision)
    if tcfg.gradient_checkpointing:
        # transformers >= 5.20 renamed it; 5.19 only has the old name
        enable = getattr(student, "activation_checkpointing_enable", None)
        (enable or student.gradient_checkpointing_enable)()
        student.config.use_cache = False
        if is_lora(student):  # frozen embeddings: reentrant checkpoints would pass no gradient
            student.enable_input_require_grads()
    # LoRA: the adapters alone (the frozen base has no gradients and needs no optimiser state)
    optimizer = make_optimizer([p for p in student.parameters() if p.requires_grad], cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, tcfg.steps)
    student.train()  # from_pretrained returns eval mode, which also disables grad checkpointing
    student, optimizer = accelerator.prepare(student, optimizer)
    model = accelerator.unwrap_model(student)
    start_step = 0
    ema = t_model if cfg.teacher.kind == "ema" else None
    if resume_dir is not None:
        state = load_state(resume_dir)
        if ema is not None:
            ema.load_state_dict(state["ema_teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        print(f"resumed from {resume_dir} at step {start_step}")
    # Under `accelerate launch` every rank rolls out its own problems; rank 0 writes the run
    # directory (its metrics describe its share of the batch) and evaluates.
    rank, main = accelerator.process_index, accelerator.is_main_process
    if main:
        (out / "config.yaml").write_text(dump_yaml(cfg))
    resumed_at = start_step if resume_dir else None
    metrics_log = JsonlLog(out / "metrics.jsonl", resumed_at, enabled=main)
    eval_log = JsonlLog(out / "eval.jsonl", resumed_at, enabled=main)

    # V-Zero: the same teacher, reading each episode's negative view
    negative_scorer = (HFScorer(t_model, tokenizer.pad_token_id, view="negative",
                                micro_batch_size=tcfg.micro_batch_size, chunk_size=tcfg.chunk_size)
                       if cfg.objective.episode_gating == "vzero" and t_model is not None else None)
    sampler = HFSampler(model, tokenizer, batch_size=rcfg.batch_size,
                        stop_token_ids=renderer.stop_token_ids,
                        suppress_token_ids=vision.special_ids if vision else None)
    old_scorer = HFScorer(model, tokenizer.pad_token_id,
                          micro_batch_size=tcfg.micro_batch_size, chunk_size=tcfg.chunk_size)
    heads = Heads(sampled=lm_head_fn(model), student=lm_head_fn(model, vocab),
                  teacher=lm_head_fn(t_model, vocab) if t_model is not None else None)
    if rcfg.backend == "vllm":
        sampler = make_vllm_sampler(cfg, model, tokenizer, renderer, vision, out)
    rollout_sampler: Sampler = sampler
    if cfg.objective.drift_stop and t_model is not None and heads.teacher is not None:
        ocfg = cfg.objective  # Prune-OPD: stop sampling replies that drift from the teacher
        rollout_sampler = DriftStopSampler(
            sampler, model, t_model, heads.student, heads.teacher, tokenizer.pad_token_id,
            threshold=ocfg.drift_threshold, patience=ocfg.drift_patience, k=ocfg.overlap_topk,
            chunk=ocfg.drift_chunk)
    params = SamplingParams(n=rcfg.samples_per_prompt, temperature=rcfg.temperature,
                            top_p=rcfg.top_p, max_new_tokens=rcfg.max_new_tokens, stop=rcfg.stop)
    need_hidden = needs_teacher_hidden(objective, cfg)
    teacher_topk = cfg.objective.topk if (objective.kind == "divergence" and not need_hidden) \
        else cfg.teacher.topk
    if "teacher_topk" in needs:
        teacher_topk = max(teacher_topk, cfg.objective.eopd_topk)

    def run_eval(step: int) -> dict[str, Any] | None:
        if not main:
            return None
        ecfg = cfg.eval
        res = evaluate(model, tokenizer, eval_pool, num_problems=ecfg.num_problems,
                       pass_k=ecfg.pass_k, temperature=ecfg.temperature,
                       max_new_tokens=ecfg.max_new_tokens or rcfg.max_new_tokens,
                       batch_size=rcfg.batch_size, seed=tcfg.seed, stop=rcfg.stop,
                       max_turns=rcfg.max_turns, max_episode_tokens=rcfg.max_episode_tokens,
                       env_id=cfg.env.id, vision=vision)
        row = {"step": step, **res}
        eval_log.write(row)
        tqdm.write(f"eval step {step}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in res.items() if k != "num_problems"))
        return row

    if cfg.warmup.steps and start_step == 0:
        assert t_model is not None
        off_policy_warmup(cfg, student, accelerator, optimizer, t_model, heads,
                          renderer, train_pool, metrics_log,
                          HFSampler(t_model, tokenizer, batch_size=rcfg.batch_size,
                                    stop_token_ids=renderer.stop_token_ids,
                                    suppress_token_ids=vision.special_ids if vision else None))
    last_eval = run_eval(0) if cfg.eval.at_start and start_step == 0 else None
    n_student = sum(p.numel() for p in model.parameters())
    n_teacher = sum(p.numel() for p in t_model.parameters()) if t_model is not None else 0
    flops_total: dict[str, float] = {}
    total, mbs = tcfg.steps, rcfg.minibatches
    step = start_step
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", disable=None)
    for it in range(start_step // mbs, total // mbs):
        # ---- rollout: the student's own episodes under its current weights
        torch.manual_seed(_derived_seed(tcfg.seed, it, _SAMPLING, rank))
        t0 = time.perf_counter()
        n_prompts = rcfg.prompts_per_batch
        starts = [{"seed": _derived_seed(tcfg.seed, it, _PROBLEMS, rank * n_prompts + i)}
                  for i in range(n_prompts)]
        prefix = prefix_len(rcfg, step)
        if cache is not None:  # Lightning OPD: fixed rollouts, scored once
            episodes = cache.batch(it, n_prompts * params.n, tcfg.seed + 7919 * rank)
        else:
            episodes = collect_episodes(
                train_pool.take(len(starts) * params.n), starts, rollout_sampler, renderer,
                dataclasses.replace(params, max_new_tokens=prefix),
                teacher_view=cfg.teacher.view == "privileged" and objective.needs_teacher,
                views=("negative",) if negative_scorer else (), max_turns=_turn_limit(rcfg, step),
                max_episode_tokens=rcfg.max_episode_tokens,
                parser=make_parser(rcfg.tool_parser), env_id=cfg.env.id)
        t_rollout = time.perf_counter() - t0
        failed = [ep for ep in episodes if not ep.input_ids]  # reset or prompt rendering failed
        if len(failed) == len(episodes):
            raise RuntimeError(f"every episode of rollout batch {it} failed to start; first "
                               f"error: {failed[0].metadata.get('error')}")
        episodes = [ep for ep in episodes if ep.input_ids]

        # ---- scoring: log pi_old and entropy from the student, log pi_T from the teacher
        t0 = time.perf_counter()
        tb, teach, slices, diagnostics = score_batch(
            episodes, old_scorer, teacher_scorer, teacher_topk, need_hidden, negative_scorer,
            ref_scorer=ref_scorer, heads=heads, needs=needs, diag_tokens=tcfg.diagnostics_tokens,
            overlap_k=cfg.objective.overlap_topk, chunk_size=tcfg.chunk_size)
        t_teacher = time.perf_counter() - t0
        gap = logprob_gap(episodes, tb.logp_old_N) if cache is None else {}
        if rcfg.backend == "vllm" and gap and (
                gap["rollout/logprob_gap"] > rcfg.vllm.max_logprob_gap):
            raise RuntimeError(
                f"rollout batch {it}: the vLLM engine's sampled-token log-probs differ from the "
                f"trainer's by {gap['rollout/logprob_gap']:.4f} per token on average (max "
                f"{gap['rollout/logprob_gap_max']:.4f}; rollout.vllm.max_logprob_gap "
                f"{rcfg.vllm.max_logprob_gap}): the engine is not sampling from the student's "
                "weights (a failed weight sync, or a dtype / kernel mismatch)")
        gen_tokens = sum(ep.num_generated for ep in episodes)
        batch_stats = {
            "env_reward": float(tb.reward_E.mean()),
            "train_accuracy": sum(map(is_correct, episodes)) / len(episodes),
            "response_tokens": gen_tokens / len(episodes),
            **episode_stats(episodes), "failed_episodes": len(failed), **diagnostics,
            "rollout_tokens_per_s": gen_tokens / max(t_rollout, 1e-9),
            "time_rollout_s": t_rollout / mbs, "time_teacher_s": t_teacher / mbs,
            "prefix_len": prefix, **gap,
        }
        if isinstance(rollout_sampler, DriftStopSampler):  # cumulative early stops
            batch_stats["drift/stopped_samples"] = rollout_sampler.stopped
            batch_stats["drift/tokens_not_sampled"] = rollout_sampler.tokens_saved
        flops = step_flops(episodes, n_student, n_teacher, int(t_model is not None))
        for k, v in flops.items():  # cumulative, so runs compare at equal compute
            flops_total[k] = flops_total.get(k, 0.0) + v
            batch_stats[k] = flops_total[k]

        # ---- minibatch updates: several optimiser steps per rollout batch (rho != 1 after one)
        shuffle = torch.Generator().manual_seed(_derived_seed(tcfg.seed, it, _SHUFFLE, rank))
        order = torch.randperm(len(episodes), generator=shuffle)
        for mb in order.chunk(mbs):
            t0 = time.perf_counter()
            plan = make_plan(objective, tb, step, total, cfg.objective)
            update = accumulate_gradients(
                student, accelerator, [episodes[i] for i in mb.tolist()],
                [slices[i] for i in mb.tolist()], tb, plan, teach, objective, cfg, heads,
                tokenizer.pad_token_id)
            grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema_update(ema, model, cfg.teacher.ema_decay)
            step += 1
            t_train = time.perf_counter() - t0
            n_kept = max(int(plan.keep_N[torch.cat([slices[i] for i in mb.tolist()])].sum()), 1)
            row = {"step": step, "loss": update.loss, **batch_stats, **plan.metrics,
                   "ratio_mean": update.ratio_sum / n_kept,
                   **({"ratio_clipped_frac": update.clipped / n_kept}
                      if cfg.objective.ratio_clip else {}),
                   "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                   "train_tokens_per_s": update.tokens / max(t_train, 1e-9),
                   "time_train_s": t_train}
            metrics_log.write(row)
            bar.update(1)
            if step % tcfg.log_every == 0 or step == total:
                tqdm.write(summary_line(row, total))
        sampler.load_weights(model)  # the next rollout uses the updated student

        # ---- periodic eval and checkpoint (at rollout-batch boundaries)
        if _crossed(step, mbs, cfg.eval.every) or step == total:
            last_eval = run_eval(step)
        if (_crossed(step, mbs, tcfg.save_every) or step == total) and main:
            extra = {"ema_teacher": ema.state_dict()} if ema is not None else {}
            save_checkpoint(out / "checkpoints", step, model, tokenizer,
                            {"optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), **extra}, tcfg.keep_last,
                            processor=vision)
        accelerator.wait_for_everyone()
    bar.close()
    if main:
        plot_curves(metrics_log.rows(), eval_log.rows(), out / "curves.png")
    return {"run_dir": str(out), "eval": last_eval, "step": step}


def off_policy_warmup(cfg: TrainConfig, student: torch.nn.Module, accelerator: Accelerator,
                      optimizer: torch.optim.Optimizer, teacher: torch.nn.Module, heads: Heads,
                      renderer: ChatRenderer, pool: EnvPool, log: JsonlLog,
                      teacher_sampler: HFSampler) -> None:
    """The sparse-to-dense bridge: `cfg.warmup.steps` optimiser steps on episodes the teacher
    samples from the student's prompts, with cross-entropy on the teacher's tokens ("sft") or
    the forward KL to the teacher's full distribution at each of them ("fkl"). The learning-rate
    schedule of the on-policy phase starts after it."""
    wcfg, rcfg, tcfg = cfg.warmup, cfg.rollout, cfg.trainer
    device, pad = accelerator.device, renderer.tokenizer.pad_token_id
    unwrapped = accelerator.unwrap_model(student)
    scorer = HFScorer(teacher, pad, micro_batch_size=tcfg.micro_batch_size,
                      chunk_size=tcfg.chunk_size)
    params = SamplingParams(n=1, temperature=rcfg.temperature, top_p=rcfg.top_p,
                            max_new_tokens=rcfg.max_new_tokens, stop=rcfg.stop)
    for k in tqdm(range(wcfg.steps), desc="warm-up", unit="step", disable=None):
        starts = [{"seed": _derived_seed(tcfg.seed, k, _WARMUP, i)}
                  for i in range(wcfg.prompts_per_batch)]
        episodes = [ep for ep in collect_episodes(
            pool.take(len(starts)), starts, teacher_sampler, renderer, params,
            max_turns=rcfg.max_turns, max_episode_tokens=rcfg.max_episode_tokens,
            parser=make_parser(rcfg.tool_parser), env_id=cfg.env.id, desc="warm-up rollout")
            if ep.num_generated]
        if not episodes:
            continue
        teach = scorer.score(episodes, keep_hidden=wcfg.kind == "fkl")
        slices = _token_slices(episodes)
        denom = max(sum(ep.num_generated for ep in episodes), 1)
        total = 0.0
        mb = tcfg.micro_batch_size
        for s in range(0, len(episodes), mb):
            eps, tok = episodes[s: s + mb], torch.cat(slices[s: s + mb])
            batch = pad_right([e.input_ids for e in eps], [e.loss_mask for e in eps], pad, device)
            vision = VisionInputs.cat(e.vision for e in eps)
            hidden = final_hidden(student, batch.input_ids, batch.attention_mask,
                                  **forward_kwargs(unwrapped, batch.input_ids, vision))
            rows, cols = predicting_positions(batch.loss_mask)
            h = hidden[rows, cols - 1]
            if wcfg.kind == "sft":
                loss_sum = -target_logprobs(heads.sampled, h, batch.input_ids[rows, cols],
                                            tcfg.chunk_size).sum()
            else:
                loss_sum = divergence_sum("fkl", 0, cfg, heads.student, heads.teacher, h, teach,
                                           tok, torch.ones(len(tok)))
            accelerator.backward(loss_sum / denom)
            total += loss_sum.item() / denom
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.write({"step": 0, "warmup_step": k + 1, "warmup_kind": wcfg.kind, "loss": total,
                   "grad_norm": float(grad_norm),
                   "response_tokens": denom / len(episodes)})


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta_T <- decay * theta_T + (1 - decay) * theta_S, parameter by parameter (a LoRA
    student: its merged weights, by name)."""
    if is_lora(model):
        merged = merged_state_dict(model)
        for name, p_t in ema.named_parameters():
            p_t.mul_(decay).add_(merged[name].to(p_t.dtype), alpha=1 - decay)
        return
    for p_t, p_s in zip(ema.parameters(), model.parameters(), strict=True):
        p_t.mul_(decay).add_(p_s.detach().to(p_t.dtype), alpha=1 - decay)

