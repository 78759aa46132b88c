"""What the loop does when a run meets a fault instead of a clean step.

- Non-finite values: a teacher's log-prob of -inf (a token its sampler would never emit, a masked
  logit) is floored to `teacher.logp_floor` and counted; a minibatch whose teacher or student
  log-probs hold NaN/inf is not trained on, nor is one whose loss or gradient norm comes out
  non-finite: the optimiser step is skipped (no update, the scheduler not advanced, the gradients
  dropped), counted and logged with the quantity that was not finite. After
  `trainer.max_skipped_steps` skipped steps in a row the run stops with `NonFiniteError`; the
  weights are those of the last good step and the checkpoints are untouched.
- Preemption: SIGTERM or SIGINT (a scheduler ending the job, Ctrl-C) asks the loop to stop at the
  next step boundary; it writes a checkpoint and returns, and `trainer.resume=auto` continues
  from there. A second signal stops at once.

Every decision that changes what the ranks do next is agreed across ranks (a sum over ranks of
each rank's flags), so all of them skip or stop together.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from mmopd.objectives import TokenBatch


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row were skipped for non-finite values."""


def floor_teacher_logprobs(tb: TokenBatch, floor: float | torch.Tensor) -> int:
    """Raise the teacher's log-probs below `floor` (-inf included; one number, or one per token)
    to it, in place; NaN stays NaN (the guard skips those steps). Returns how many tokens were
    floored."""
    t = tb.logp_teacher_N
    f = torch.as_tensor(floor, dtype=t.dtype).expand_as(t)
    low = t < f
    n = int(low.sum())
    if n:
        tb.logp_teacher_N = torch.where(low, f, t)
    return n


def agreed(accelerator: Any, flags: list[bool]) -> list[bool]:
    """Each flag set on any rank (one all-reduce; nothing to agree on in a single process)."""
    if accelerator.num_processes == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(t, "sum").tolist()]


def nonfinite_inputs(tb: TokenBatch, tok: torch.Tensor) -> list[bool]:
    """[teacher log-probs, student log-probs] not all finite on the minibatch's tokens `tok`."""
    return [not bool(torch.isfinite(tb.logp_teacher_N[tok]).all()),
            not bool(torch.isfinite(tb.logp_old_N[tok]).all())]


INPUTS = ("teacher_logp", "student_logp")
OUTPUTS = ("loss", "grad_norm")


class SkipCounter:
    """Skipped optimiser steps, in all and in a row."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.total = 0
        self.in_row = 0
        self.last: list[str] = []

    def good(self) -> None:
        self.in_row = 0

    def skip(self, step: int, what: list[str]) -> None:
        self.total += 1
        self.in_row += 1
        self.last = what
        tqdm.write(f"step {step} skipped: non-finite {', '.join(what)} (no update; "
                   f"{self.in_row} in a row, {self.total} in all; trainer.max_skipped_steps "
                   f"{self.max_in_row})")

    def stop(self, step: int, newest_checkpoint: str | None) -> None:
        """Raise NonFiniteError: `max_in_row` steps in a row were skipped, the last `step`."""
        raise NonFiniteError(
            f"{self.in_row} optimiser steps in a row were skipped for non-finite values (the "
            f"last at step {step}: {', '.join(self.last)}). The student's weights are those "
            f"after step {step - self.in_row}; the newest checkpoint is "
            f"{newest_checkpoint or 'none'}. A teacher that returns NaN, an fp16 overflow or a "
            "learning rate that diverged are the usual causes (trainer.max_skipped_steps raises "
            "the limit)")


class StopSignals:
    """Within `with`: the first SIGTERM / SIGINT sets `received` (the loop stops at its next
    boundary); a second one restores the default handling and is delivered again, so it stops
    at once. The same signal again within `echo_s` seconds counts as the first: a scheduler
    signals the whole process group, and a launcher (torchrun, accelerate) forwards the same
    signal to its ranks milliseconds later. Outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, echo_s: float = 1.0) -> None:
        self.received: str | None = None
        self.echo_s = echo_s
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._first = name, time.monotonic()
            tqdm.write(f"received {name}: stopping at the next step boundary with a checkpoint "
                       f"(send it again to stop at once)")
            return
        if name == self.received and time.monotonic() - self._first < self.echo_s:
            return  # the launcher's forwarded copy of the signal already being handled
        self.__exit__()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)

    def stop_now(self, accelerator: Any) -> bool:
        """Has any rank received a stop signal (agreed across ranks)?"""
        return agreed(accelerator, [self.received is not None])[0]
