"""The `teacher:` section (an in-process model, the student itself (self / EMA), a served
model or an offline cache), and `teachers:` + `routing:` for several named teachers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .base import _check
from .model import ModelConfig


@dataclass
class ServedTeacherConfig:
    """A teacher behind an OpenAI-compatible vLLM server (`vllm serve MODEL`), for teachers on
    other GPUs or nodes. It returns prompt log-probs with top-k, not logits: objectives that need
    the teacher's full distribution are refused at config time."""

    url: str | None = None  # e.g. http://10.0.0.5:8000
    model: str | None = None  # the served model's name (default: the only one served)
    # top log-probs per position for the teacher-entropy bound, asked for only by objectives
    # that read the teacher's entropy (EOPD); others ask for their own top-k, or none
    topk: int = 20
    batch_size: int = 8  # episodes per request
    concurrency: int = 2  # requests in flight
    timeout_s: float = 300.0  # per request
    # per request: retries of connection errors, timeouts and 5xx, waiting backoff_s, 2 x
    # backoff_s, ... (at most max_backoff_s) between; the defaults wait about 3 minutes in all for
    # a server that died to come back
    max_retries: int = 10
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    api_key_env: str | None = None  # name of an environment variable holding the API key

    def __post_init__(self) -> None:
        w = "teacher.served"
        _check(self.url is None or self.url.startswith(("http://", "https://")), f"{w}.url",
               f"{self.url!r} is not an http(s) URL")
        for name in ("topk", "batch_size", "concurrency"):
            _check(getattr(self, name) > 0, f"{w}.{name}", "must be positive")
        _check(self.timeout_s > 0, f"{w}.timeout_s", "must be positive")
        _check(self.max_retries >= 0, f"{w}.max_retries", "must be >= 0")
        _check(self.backoff_s >= 0, f"{w}.backoff_s", "must be >= 0")
        _check(self.max_backoff_s >= self.backoff_s, f"{w}.max_backoff_s",
               "must be >= backoff_s")


# Teacher kinds that return only sampled-token log-probs (and top-k), no live model to rebuild
# full distributions from
SCORES_ONLY = ("cache", "served", "custom")


@dataclass
class TeacherConfig:
    """Who scores the student's tokens.

    kind "model": a separate in-process model. kind "self": the student's initial weights, frozen,
    usually with view "privileged" (self-distillation from a prompt that holds the solution).
    kind "ema": an exponential moving average of the student (theta_T <- d * theta_T +
    (1 - d) * theta_S after every optimiser step, d = ema_decay), as in Vision-OPD.
    kind "cache": no live teacher; batches and the teacher's scores come from a cache built by
    `mmopd cache-teacher` (Lightning OPD), directory `cache`.
    kind "served": a teacher behind a vLLM server (`served`): sampled-token log-probs and top-k.
    kind "custom": your own scorer, `factory: "module:function"`; the function takes (config,
    tokenizer) and returns an object with the Teacher protocol's `score` (mmopd.teachers.scorer):
    sampled-token log-probs (and top-k if asked), as a served teacher gives.
    view "privileged": the teacher reads the env's teacher view (info["teacher_messages"]: a worked
    solution, the question-relevant image crop, ...) instead of the student's prompt.
    """

    kind: Literal["model", "self", "ema", "cache", "served", "custom"] = "model"
    model: ModelConfig | None = None
    view: Literal["same", "privileged"] = "same"
    topk: int = 0  # also return the teacher's top-k log-probs (0 = off)
    # the teacher's sampled-token log-probs below this (-inf included: a token it would never
    # emit) are raised to it, and counted (metric teacher_logp_floored)
    logp_floor: float = -50.0
    ema_decay: float = 0.95
    # refuse a teacher whose chat template renders a probe conversation differently
    check_template: bool = True
    cache: str | None = None  # kind "cache": a directory written by `mmopd cache-teacher`
    factory: str | None = None  # kind "custom": "module:function" returning the teacher
    served: ServedTeacherConfig = field(default_factory=ServedTeacherConfig)
    # a teacher with another tokenizer and chat template (kind "model"): it reads the episode in
    # its own template and its log-probs reach the student's tokens over aligned text spans
    # (sampled-token objectives only; see docs/teachers.md)
    cross_tokenizer: bool = False
    name: str = "teacher"  # in `teachers:` lists, routes and per-teacher metrics
    # under an FSDP2 launch: shard the in-process teacher's blocks over all ranks too (its
    # scoring forwards then run in lock-step); off, every rank holds the whole teacher
    shard: bool = False

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)), "teacher.name",
               f"{self.name!r}: use letters, digits, '_', '-' or '.' (it names metrics)")
        _check(not self.cross_tokenizer or self.kind == "model", "teacher.cross_tokenizer",
               f"a teacher with its own tokenizer is a separate model (kind=model), not "
               f"kind={self.kind}")
        _check(not self.cross_tokenizer or self.view == "same", "teacher.view",
               "a cross-tokenizer teacher reads the student's own conversation (view=same)")
        _check(not self.shard or (self.kind in ("model", "self") and not self.cross_tokenizer),
               "teacher.shard", "shards an in-process teacher of the student's tokenizer "
               f"(kind=model or self), not kind={self.kind}"
               + (" with cross_tokenizer" if self.cross_tokenizer else ""))
        _check(self.topk >= 0, "teacher.topk", "must be >= 0")
        _check(self.logp_floor < 0, "teacher.logp_floor", "must be a negative log-prob")
        if self.kind == "custom":
            mod, _, fn = (self.factory or "").partition(":")
            _check(bool(mod and fn), "teacher.factory", f"kind=custom needs \"module:function\" "
                   f"(a function of (config, tokenizer) returning the teacher), got "
                   f"{self.factory!r}")
        _check(0 <= self.ema_decay < 1, "teacher.ema_decay", f"{self.ema_decay} is outside [0, 1)")
        _check(self.model is None or self.model.lora is None, "teacher.model.lora",
               "LoRA adapters train the student; a teacher is frozen (remove the setting)")


@dataclass
class RoutingConfig:
    """Which of several `teachers:` scores each episode. `by: env` reads the episode's
    environment id (metadata "env", set by `mmopd/Mixture-v0`); `by: metadata.KEY` reads another
    field the env put into the episode's info (e.g. metadata.domain). `routes` maps values to
    teacher names; `default` takes the values no route names (None: such an episode stops the
    run with an error, so no episode is scored by a teacher nobody chose)."""

    by: str = "env"
    routes: dict[str, str] = field(default_factory=dict)
    default: str | None = None

    def __post_init__(self) -> None:
        _check(self.by == "env" or (self.by.startswith("metadata.") and len(self.by) > 9),
               "routing.by", f"{self.by!r}: use env or metadata.KEY (a field of the episode's "
               "info, e.g. metadata.domain)")
        for value, name in self.routes.items():
            _check(isinstance(name, str), f"routing.routes.{value}",
                   f"expected a teacher name, got {name!r}")

    @property
    def key(self) -> str:
        """The metadata field routed on."""
        return "env" if self.by == "env" else self.by.removeprefix("metadata.")
