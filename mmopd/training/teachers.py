"""Building a run's teachers from its config: one teacher (in process, self / EMA, served,
cached, custom, or with another tokenizer), or several named ones behind a router. Every check
that can fail (a server that does not answer, a tokenizer or template that differs, a route
that names no environment) runs here, before the first rollout."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import warnings
from typing import Any

import torch

from mmopd.config import ConfigError, TeacherConfig, TrainConfig
from mmopd.models import (
    check_same_rendering,
    check_same_vision,
    check_same_vocab,
    load_model,
    load_tokenizer,
    load_vision,
    plain_copy,
    resolve_dtype,
)
from mmopd.objectives import OBJECTIVES, Objective, needed_scores
from mmopd.rollout.evaluate import EnvPool
from mmopd.teachers.cache import TeacherCache
from mmopd.teachers.cross import CrossTokenizerTeacher
from mmopd.teachers.router import RoutedTeacher
from mmopd.teachers.scorer import HFScorer, Teacher
from mmopd.vision import VisionProcessor


@dataclasses.dataclass
class Teachers:
    """What the run keeps of its teachers."""

    scorer: Teacher | None  # what scores each rollout batch (a RoutedTeacher for several)
    model: torch.nn.Module | None  # the one live same-vocabulary teacher (None: none or several)
    cache: TeacherCache | None  # Lightning OPD: fixed rollouts, scored once
    vocab: int | None  # output rows student and teacher distributions compare on
    ema: torch.nn.Module | None = None  # kind=ema: the teacher the loop moves after each step
    ema_decay: float = 0.0
    n_params: int = 0  # parameters of the largest live teacher, for the FLOPs estimate


def build_teachers(cfg: TrainConfig, objective: Objective, student: torch.nn.Module,
                   tokenizer: Any, vision: VisionProcessor | None, train_pool: EnvPool,
                   device: torch.device) -> Teachers:
    """The run's teacher(s), checked."""
    if not objective.needs_teacher:
        return Teachers(None, None, None, None)
    entropy = "teacher_entropy" in needed_scores(objective, cfg.objective)
    if not cfg.teachers:
        scorer, model, cache, vocab = one_teacher(cfg, cfg.teacher, student, tokenizer, vision,
                                                  train_pool, device, entropy)
        live = None if cfg.teacher.cross_tokenizer else model  # no logits on the student's ids
        return Teachers(scorer, live, cache, vocab,
                        ema=model if cfg.teacher.kind == "ema" else None,
                        ema_decay=cfg.teacher.ema_decay, n_params=_params(model))
    check_routes(cfg, train_pool)
    scorers: dict[str, Teacher] = {}
    ema, decay, n = None, 0.0, 0
    for t in cfg.teachers:
        scorer, model, _, _ = one_teacher(cfg, t, student, tokenizer, vision, train_pool, device,
                                          entropy)
        scorers[t.name] = scorer
        n = max(n, _params(model))
        if t.kind == "ema":
            ema, decay = model, t.ema_decay
    r = cfg.routing
    router = RoutedTeacher(scorers, r.key, r.routes, r.default, env_id=cfg.env.id)
    return Teachers(router, None, None, None, ema=ema, ema_decay=decay, n_params=n)


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _params(model: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


def check_routes(cfg: TrainConfig, train_pool: EnvPool) -> None:
    """`routing.by: env`: every environment of the run has a route (or there is a default)."""
    r = cfg.routing
    if r.by != "env" or r.default is not None:
        return
    from mmopd.envs.mixture import MixtureEnv

    env = train_pool.take(1)[0].unwrapped
    ids = env.ids if isinstance(env, MixtureEnv) else [cfg.env.id]
    missing = [i for i in ids if i not in r.routes]
    if missing:
        raise ConfigError(f"routing.routes: no teacher for environment(s) {missing}; routes "
                          f"cover {sorted(r.routes)} (add a route or a routing.default)")


def one_teacher(cfg: TrainConfig, t: TeacherConfig, student: torch.nn.Module, tokenizer: Any,
                vision: VisionProcessor | None, train_pool: EnvPool, device: torch.device,
                entropy: bool = True,
                ) -> tuple[Teacher, torch.nn.Module | None, TeacherCache | None, int | None]:
    """One teacher's scorer, its live model (self / EMA / in process), the cache it reads from
    (Lightning OPD), and the vocabulary rows student and teacher distributions compare on.
    `entropy`: an in-process teacher computes its entropy at each position (else NaN)."""
    tcfg = cfg.trainer
    if t.kind == "cache":
        cache = TeacherCache.load(t.cache)
        cache.check_fits(tokenizer)
        return cache, None, cache, None
    if t.kind == "served":
        return make_served_teacher(cfg, tokenizer, t, vision), None, None, None
    if t.kind == "custom":
        return make_custom_teacher(cfg, tokenizer, t), None, None, None
    if t.kind in ("self", "ema"):  # the initial student (EMA: then tracking it)
        dtype = torch.float32 if t.kind == "ema" else resolve_dtype(cfg.model.dtype)
        t_model = plain_copy(student).to(dtype)  # LoRA: merged, a plain model
    else:
        assert t.model is not None
        t_tok = load_tokenizer(t.model, "teacher.model")
        t_vision = load_vision(t.model, t_tok, "teacher.model")
        # sharded: rank 0 reads the checkpoint, the others get their shards from it
        t_model = load_model(t.model, t_tok, "teacher.model", vision=t_vision,
                             meta=t.shard and not _is_rank0())
        if t.cross_tokenizer:
            if vision is not None or t_vision is not None:
                raise NotImplementedError("teacher.cross_tokenizer aligns text; VLM students "
                                          "and teachers share a tokenizer (cross_tokenizer="
                                          "false)")
            t_model.requires_grad_(False).to(device)
            cross = CrossTokenizerTeacher(t_model, t_tok, tokenizer,
                                          micro_batch_size=tcfg.micro_batch_size,
                                          chunk_size=tcfg.chunk_size)
            cross.check(_probe_messages(train_pool.take(1)[0]))
            return cross, t_model, None, None
        check_same_vocab(tokenizer, t_tok, t_model, student)
        check_same_vision(vision, t_vision)
        if t.check_template:
            check_same_rendering(tokenizer, t_tok, _probe_messages(train_pool.take(1)[0]))
    t_model.requires_grad_(False)
    if not t.shard:  # a sharded teacher goes to the device block by block (shard_frozen)
        t_model.to(device)
    # Output layers are often padded past the tokenizer, differently per model size
    # (Qwen2.5: 151936 rows at 1.5B, 152064 at 7B); distributions are compared on the rows
    # both have. Sampled-token log-probs use each model's full output layer.
    vocab = min(student.get_output_embeddings().weight.shape[0],
                t_model.get_output_embeddings().weight.shape[0])
    scorer = HFScorer(t_model, tokenizer.pad_token_id,
                      view="teacher" if t.view == "privileged" else "student",
                      topk_vocab=vocab, entropy=entropy, **tcfg.batching())
    return scorer, t_model, None, vocab


def make_served_teacher(cfg: TrainConfig, tokenizer: Any, t: TeacherConfig | None = None,
                        vision: VisionProcessor | None = None) -> Teacher:
    """The teacher behind a vLLM server, checked (reachable, same tokenizer; for a VLM student
    the same image processing) before training."""
    from mmopd.teachers.served import ServedTeacher

    t = t or cfg.teacher
    s = t.served
    assert s.url is not None
    obj = OBJECTIVES[cfg.objective.name]
    needs = needed_scores(obj, cfg.objective)
    entropy = "teacher_entropy" in needs
    if entropy:
        warnings.warn(
            f"objective {obj.name} gates on the teacher's entropy; a served teacher gives a "
            f"lower bound of it from its top-{s.topk} (teacher.served.topk), so the gate opens "
            "on fewer tokens than with the exact entropy. An in-process teacher gives it exactly; "
            "a larger teacher.served.topk (up to vllm serve --max-logprobs) tightens the bound",
            stacklevel=2)
    key = os.environ.get(s.api_key_env) if s.api_key_env else None
    if s.api_key_env and key is None:
        raise ValueError(f"teacher.served.api_key_env: environment variable {s.api_key_env!r} "
                         "is not set")
    teacher = ServedTeacher(s.url, model=s.model,
                            view="teacher" if t.view == "privileged" else "student",
                            batch_size=s.batch_size, concurrency=s.concurrency,
                            timeout_s=s.timeout_s, max_retries=s.max_retries,
                            backoff_s=s.backoff_s, max_backoff_s=s.max_backoff_s,
                            entropy_topk=s.topk if entropy else 0, api_key=key,
                            vision=vision)
    asked = max(t.topk, cfg.objective.topk if obj.kind == "divergence" else 0,
                cfg.objective.eopd_topk if "teacher_topk" in needs else 0)
    teacher.check(tokenizer, topk=asked)
    return teacher


def make_custom_teacher(cfg: TrainConfig, tokenizer: Any,
                        t: TeacherConfig | None = None) -> Teacher:
    """`teacher.kind=custom`: the teacher `teacher.factory` ("module:function") builds from the
    config (whose `teacher` is this one) and the student's tokenizer."""
    t = t or cfg.teacher
    module, _, name = str(t.factory).partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"teacher.factory: cannot load {t.factory!r} "
                          f"({type(e).__name__}: {e}); it must name an importable module and a "
                          "function in it") from None
    if t is not cfg.teacher:  # a routed teacher: the factory reads cfg.teacher
        cfg = copy.copy(cfg)
        cfg.teacher = t
    teacher = factory(cfg, tokenizer)
    if not callable(getattr(teacher, "score", None)):
        raise ConfigError(f"teacher.factory: {t.factory!r} returned "
                          f"{type(teacher).__name__}, which has no score(episodes, topk=...) "
                          "method (the Teacher protocol, mmopd.teachers.scorer)")
    return teacher


def _probe_messages(env: Any) -> list[dict[str, Any]]:
    """The prompt of the first of a few episodes that starts (a bad data row is skipped; the
    rollout records such rows as failed episodes)."""
    for seed in range(8):
        try:
            return env.reset(seed=seed)[1]["messages"]
        except Exception:
            continue
    return [{"role": "user", "content": "What is 2+2?"}]
