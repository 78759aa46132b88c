"""The `optim:`, `warmup:`, `eval:` and `trainer:` sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .base import ConfigError, _check


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant or cosine decay."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass
class WarmupConfig:
    """Off-policy warm-up: before on-policy distillation, `steps` optimiser steps on episodes the
    teacher samples itself (one per prompt), to raise the initial teacher-student overlap: "sft"
    (cross-entropy on the teacher's tokens) or "fkl" (forward KL to the teacher's distribution at
    every one of its tokens). Needs a separate teacher model (teacher.kind=model)."""

    steps: int = 0
    kind: Literal["sft", "fkl"] = "fkl"
    prompts_per_batch: int = 16

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "warmup.steps", "must be >= 0 (0: no warm-up)")
        _check(self.prompts_per_batch > 0, "warmup.prompts_per_batch", "must be positive")


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy and pass@k."""

    every: int = 0  # optimiser steps between evals (0 = only at the start and the end)
    num_problems: int = 100
    pass_k: int = 4  # samples per problem for pass@k (0 = greedy only)
    # the sampled replies' (pass@k) sampling: REOPOLD's paper evaluates math and visual
    # reasoning at 0.6 / 0.95, its agentic tool use at 1.0 / 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # defaults to rollout.max_new_tokens
    max_turns: int | None = None  # defaults to rollout.max_turns (the paper: 2 in training, 5 here)
    at_start: bool = True

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "eval.temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _check(self.max_turns is None or self.max_turns > 0, "eval.max_turns",
               "must be positive")


@dataclass
class TrainerConfig:
    """The loop: how many optimiser steps, batching, precision, where results go."""

    steps: int = 30  # optimiser steps
    micro_batch_size: int = 16  # sequences per forward/backward (gradient accumulation below it)
    output_dir: str = "runs/default"
    seed: int = 0
    resume: str = "never"  # "never", "auto" (newest complete checkpoint), or a checkpoint dir
    save_every: int = 0  # optimiser steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    bf16: bool = False
    gradient_checkpointing: bool = False
    chunk_size: int = 256  # positions per chunk when turning hidden states into log-probs
    log_every: int = 1
    # teacher-student diagnostics (top-k overlap, teacher mass on the student's top-k, entropy
    # gap, KL) on at most this many tokens per rollout batch (0 = off)
    diagnostics_tokens: int = 2048
    # optimiser steps skipped in a row (NaN/inf log-probs, loss or gradient norm) before the run
    # stops with an error
    max_skipped_steps: int = 3
    # experiment trackers: "auto" (tensorboard when installed), "none", or a list of
    # tensorboard / wandb / trackio / mlflow; metrics.jsonl and eval.jsonl are written either way
    report_to: str | list[str] = "auto"
    # micro-batches hold at most micro_batch_size episodes (and, when > 0, about
    # micro_batch_tokens tokens), their token counts balanced; with `packing` the episodes of a
    # micro-batch run without padding between them (text models; VLMs' rows are padded): in one
    # row under flash-attention; under SDPA / eager, which attend over a whole row, in the rows
    # whose forward costs least (mmopd.episode.packed_width)
    micro_batch_tokens: int = 0
    packing: bool = True
    # with one optimiser step per rollout batch (rollout.minibatches 1, so rho = 1), take
    # log pi_old and the entropy from the training forward instead of a separate student pass,
    # where the objective's plan reads them token by token (mmopd.training.old_policy)
    old_from_forward: bool = True

    def batching(self) -> dict[str, Any]:
        """How an in-process scorer (HFScorer) groups its forwards: these micro-batch settings."""
        return {"micro_batch_size": self.micro_batch_size, "chunk_size": self.chunk_size,
                "micro_batch_tokens": self.micro_batch_tokens,
                "packed": None if self.packing else False}

    def __post_init__(self) -> None:
        _check(self.steps > 0, "trainer.steps", "must be positive")
        _check(self.micro_batch_size > 0, "trainer.micro_batch_size", "must be positive")
        _check(self.chunk_size > 0, "trainer.chunk_size", "must be positive")
        _check(self.micro_batch_tokens >= 0, "trainer.micro_batch_tokens", "must be >= 0")
        _check(self.keep_last >= 1, "trainer.keep_last", "must be >= 1")
        _check(self.max_skipped_steps >= 1, "trainer.max_skipped_steps", "must be >= 1")
        from mmopd.training.tracking import resolve_report_to

        try:  # a missing tracker package fails here, before any model loads
            resolve_report_to(self.report_to)
        except ValueError as e:
            raise ConfigError(f"trainer.report_to: {e}") from None
