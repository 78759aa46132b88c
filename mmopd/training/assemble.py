"""Assembling a distillation run from its config: the environments, the student, the teacher
(in process, self / EMA, served or cached) and its scorers, the reference model, the samplers,
the optimiser, the run directory's logs, and the state a resumed run continues from. The loop in
`mmopd.training.loop` only uses what `assemble` returns.

The order is deliberate: environments first (a bad env id or data file fails before any model
loads), then the models, then the optimiser, then resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from mmopd.config import ConfigError, TrainConfig, dump_yaml, to_dict
from mmopd.envs import import_env_modules, make_env
from mmopd.logprobs import projection
from mmopd.models import (
    is_lora,
    is_vlm,
    load_model,
    load_tokenizer,
    load_vision,
    plain_copy,
    resolve_dtype,
    save_merged,
)
from mmopd.objectives import OBJECTIVES, Objective, needed_scores, needs_teacher_hidden
from mmopd.rollout.agent_loop import env_tools
from mmopd.rollout.drift import DriftStopSampler
from mmopd.rollout.evaluate import EnvPool
from mmopd.rollout.render import ChatRenderer
from mmopd.rollout.sampler import HFSampler, Sampler, SamplingParams
from mmopd.teachers.cache import TeacherCache
from mmopd.teachers.router import RoutedTeacher
from mmopd.teachers.scorer import HFScorer, Teacher
from mmopd.training.checkpoint import (
    OPTIMIZER_DIR,
    check_resumable,
    load_state,
    load_student,
    resolve_resume,
    set_rng_state,
)
from mmopd.training.losses import Heads
from mmopd.training.metrics import JsonlLog
from mmopd.training.optim import make_accelerator, make_optimizer, make_scheduler
from mmopd.training.sharding import (
    check_sharded_run,
    full_state_dict,
    is_sharded,
    load_optimizer,
    shard_frozen,
)
from mmopd.training.teachers import (  # noqa: F401  (make_*_teacher: importable from here)
    build_teachers,
    make_custom_teacher,
    make_served_teacher,
)
from mmopd.training.tracking import PROJECT, flat_config, init_kwargs, resolve_report_to, scalars
from mmopd.vision import VisionProcessor


@dataclasses.dataclass
class Run:
    """Everything a distillation run uses, built once by `assemble`."""

    cfg: TrainConfig
    out: Path  # the run directory
    accelerator: Accelerator
    objective: Objective
    needs: frozenset[str]  # the per-token scores the objective asks for
    train_pool: EnvPool
    eval_pool: EnvPool
    tokenizer: Any
    vision: VisionProcessor | None  # None for text-only students
    renderer: ChatRenderer
    student: torch.nn.Module  # as prepared by accelerate (DDP-wrapped under several processes)
    model: torch.nn.Module  # the unwrapped student: sampling, scoring, saving
    optimizer: torch.optim.Optimizer
    scheduler: Any
    heads: Heads  # output layers the losses rebuild logits with
    old_scorer: HFScorer  # log pi_old: the student's rollout-time weights
    teacher_scorer: Teacher | None
    t_model: torch.nn.Module | None  # the live teacher (None: none, served or a cache)
    cache: TeacherCache | None  # Lightning OPD: fixed rollouts, scored once
    ref_scorer: HFScorer | None  # G-OPD's reference: the initial student, frozen
    negative_scorer: HFScorer | None  # V-Zero: the teacher reading the negative view
    ema: torch.nn.Module | None  # teacher.kind=ema: the teacher the loop updates
    ema_decay: float
    sampler: Sampler  # the engine that receives the new weights after each update
    rollout_sampler: Sampler  # what rolls out (the sampler, or it behind a drift stop)
    params: SamplingParams
    need_hidden: bool  # losses rebuild teacher logits from its hidden states
    teacher_topk: int  # top-k the teacher returns with its log-probs
    n_student: int  # parameters, for the FLOPs estimate
    n_teacher: int  # 0 without a live teacher (the largest of several)
    start_step: int  # 0, or the step of the checkpoint a resumed run continues from
    metrics_log: JsonlLog
    eval_log: JsonlLog

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def router(self) -> RoutedTeacher | None:
        """Several teachers: the router, which records the teacher of each episode."""
        return self.teacher_scorer if isinstance(self.teacher_scorer, RoutedTeacher) else None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def assemble(cfg: TrainConfig) -> Run:
    """Build the run's parts from the config (and from the newest checkpoint when resuming)."""
    tcfg, rcfg = cfg.trainer, cfg.rollout
    out = Path(tcfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trackers = resolve_report_to(tcfg.report_to)
    accelerator = make_accelerator(tcfg.bf16, trackers, str(out))
    if accelerator.is_fsdp2:
        check_sharded_run(cfg)
    device = accelerator.device
    set_seed(tcfg.seed)
    objective = OBJECTIVES[cfg.objective.name]
    if rcfg.backend == "vllm":  # a missing or too old vLLM fails before anything loads
        from mmopd.rollout.vllm import check_sleep, check_vllm, check_vllm_vision

        check_vllm()
        check_sleep(rcfg.vllm.sleep)
        if is_vlm(cfg.model):
            check_vllm_vision()

    import_env_modules(cfg.env.imports)
    train_pool = EnvPool(lambda: make_env(cfg.env.id, **cfg.env.kwargs))
    eval_pool = EnvPool(lambda: make_env(cfg.env.id, **{**cfg.env.kwargs, **cfg.env.eval_kwargs}))
    train_pool.take(1), eval_pool.take(1)
    env_tools(train_pool.take(1)[0], cfg.env.id)  # a tool that cannot run here stops the run now

    tokenizer = load_tokenizer(cfg.model)
    vision = load_vision(cfg.model, tokenizer)
    student = load_model(cfg.model, tokenizer, trainable=True, vision=vision)
    renderer = ChatRenderer(tokenizer, vision)
    teachers = build_teachers(cfg, objective, student, tokenizer, vision, train_pool, device)
    teacher_scorer, t_model, cache, vocab = (teachers.scorer, teachers.model, teachers.cache,
                                             teachers.vocab)
    needs = needed_scores(objective, cfg.objective)
    ref_scorer = None
    if "ref" in needs:
        ref_model = plain_copy(student).to(resolve_dtype(cfg.model.dtype)).requires_grad_(False)
        ref_scorer = HFScorer(ref_model.to(device), tokenizer.pad_token_id, **tcfg.batching())

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
    if is_sharded(model) and accelerator.is_main_process:
        print(f"student sharded with FSDP2 across {accelerator.num_processes} processes")
    if cfg.teacher.shard and t_model is not None:
        if not is_sharded(model):
            raise ConfigError("teacher.shard: the teacher is sharded beside a sharded student; "
                              "launch with FSDP2 (configs/accelerate/fsdp.yaml) or set "
                              "teacher.shard=false")
        shard_frozen(t_model, device)
        if accelerator.is_main_process:
            print(f"teacher sharded with FSDP2 across {accelerator.num_processes} processes")
    start_step = 0
    ema = teachers.ema
    if resume_dir is not None:
        state = load_state(resume_dir)
        check_resumable(state, resume_dir, accelerator.num_processes, is_sharded(model))
        if ema is not None:
            ema.load_state_dict(state["ema_teacher"])
        if is_sharded(model):
            load_optimizer(model, optimizer, resume_dir / OPTIMIZER_DIR)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        if accelerator.is_main_process:
            print(f"resumed from {resume_dir} at step {start_step}")
    # Under `accelerate launch` every rank rolls out its own problems; rank 0 writes the run
    # directory (its metrics describe its share of the batch, the loss and the evaluation all
    # ranks').
    main = accelerator.is_main_process
    if main:
        (out / "config.yaml").write_text(dump_yaml(cfg))
    if trackers:  # accelerate logs on the main process only
        accelerator.init_trackers(PROJECT, config=flat_config(to_dict(cfg)),
                                  init_kwargs=init_kwargs(trackers, out))
    resumed_at = start_step if resume_dir else None

    negative_scorer = (HFScorer(t_model, tokenizer.pad_token_id, view="negative",
                                **tcfg.batching())
                       if cfg.objective.episode_gating == "vzero" and t_model is not None else None)
    # the output layers compute in the training's compute dtype (bf16 under trainer.bf16, not
    # the float32 master weights), accumulating in float32; HF generate runs on a copy in it
    # (a sharded student is gathered in it already)
    compute = torch.bfloat16 if tcfg.bf16 else None
    sampler: Sampler = HFSampler(model, tokenizer, batch_size=rcfg.batch_size,
                                 stop_token_ids=renderer.stop_token_ids,
                                 suppress_token_ids=vision.special_ids if vision else None,
                                 dtype=None if is_sharded(model) else compute)
    old_scorer = HFScorer(model, tokenizer.pad_token_id, dtype=compute, **tcfg.batching())
    heads = Heads(sampled=projection(model, dtype=compute),
                  student=projection(model, vocab, dtype=compute),
                  teacher=projection(t_model, vocab) if t_model is not None else None)
    if rcfg.backend == "vllm":
        sampler = make_vllm_sampler(cfg, model, tokenizer, renderer, vision, out, accelerator)
    rollout_sampler = sampler
    if cfg.objective.drift_stop and t_model is not None and heads.teacher is not None:
        ocfg = cfg.objective  # Prune-OPD: stop sampling replies that drift from the teacher
        rollout_sampler = DriftStopSampler(
            sampler, model, t_model, heads.student, heads.teacher, tokenizer.pad_token_id,
            threshold=ocfg.drift_threshold, patience=ocfg.drift_patience, k=ocfg.overlap_topk,
            chunk=ocfg.drift_chunk)
    params = SamplingParams(n=rcfg.samples_per_prompt, temperature=rcfg.temperature,
                            top_p=rcfg.top_p, max_new_tokens=rcfg.max_new_tokens, stop=rcfg.stop)
    need_hidden = needs_teacher_hidden(objective, cfg.objective)
    teacher_topk = cfg.objective.topk if (objective.kind == "divergence" and not need_hidden) \
        else max(t.topk for t in cfg.teacher_list)
    if "teacher_topk" in needs:
        teacher_topk = max(teacher_topk, cfg.objective.eopd_topk)
    return Run(
        cfg=cfg, out=out, accelerator=accelerator, objective=objective, needs=needs,
        train_pool=train_pool, eval_pool=eval_pool, tokenizer=tokenizer, vision=vision,
        renderer=renderer, student=student, model=model, optimizer=optimizer,
        scheduler=scheduler, heads=heads, old_scorer=old_scorer, teacher_scorer=teacher_scorer,
        t_model=t_model, cache=cache, ref_scorer=ref_scorer, negative_scorer=negative_scorer,
        ema=ema, sampler=sampler, rollout_sampler=rollout_sampler, params=params,
        need_hidden=need_hidden, teacher_topk=teacher_topk,
        n_student=sum(p.numel() for p in model.parameters()),
        n_teacher=teachers.n_params, ema_decay=teachers.ema_decay,
        start_step=start_step,
        metrics_log=JsonlLog(out / "metrics.jsonl", resumed_at, enabled=main,
                             mirror=_tracked(accelerator, "") if trackers else None),
        eval_log=JsonlLog(out / "eval.jsonl", resumed_at, enabled=main,
                          mirror=_tracked(accelerator, "eval/") if trackers else None))


def _tracked(accelerator: Any, prefix: str) -> Any:
    """A JsonlLog mirror that hands each row's numbers to the experiment trackers."""
    def log(row: dict[str, Any]) -> None:
        accelerator.log(scalars(row, prefix), step=int(row["step"]))
    return log


def make_vllm_sampler(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any,
                      renderer: ChatRenderer, vision: Any, out: Path,
                      accelerator: Any) -> Sampler:
    """A colocated vLLM engine holding the student's current weights. It starts from the
    checkpoint directory when there is one; a tiny (built in memory) or separately tokenised
    student is saved under the run directory first."""
    from mmopd.rollout.vllm import VLLMSampler

    path = cfg.model.path
    if cfg.model.tiny is not None or cfg.model.tokenizer or path is None:
        path = str(out / "vllm_init")
        # a sharded student's weights gathered to rank 0, which writes the folder
        state = full_state_dict(model) if is_sharded(model) else None
        if accelerator.is_main_process:
            save_merged(model, path, state_dict=state)
            tokenizer.save_pretrained(path)
            if vision is not None:
                vision.save_pretrained(path)
        accelerator.wait_for_everyone()
    v = cfg.rollout.vllm
    gen_eos = model.generation_config.eos_token_id
    stop = set(renderer.stop_token_ids) | set(
        gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
    dtype = v.dtype if v.dtype != "auto" else (
        "bfloat16" if cfg.trainer.bf16 else str(model.dtype).removeprefix("torch."))
    sampler = VLLMSampler(path, tokenizer, stop_token_ids=stop, dtype=dtype, vision=vision,
                          suppress_token_ids=vision.special_ids if vision else None,
                          gpu_memory_utilization=v.gpu_memory_utilization,
                          max_model_len=v.max_model_len, sleep=v.sleep, seed=cfg.trainer.seed,
                          enforce_eager=v.enforce_eager, cpu_kv_cache_gb=v.cpu_kv_cache_gb)
    sampler.load_weights(model)  # resumed or LoRA-merged weights, not the directory's
    return sampler
