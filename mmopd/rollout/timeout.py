"""A wall-clock bound on a call (an environment's reset() or step()) without threads.

An interval timer (SIGALRM) raises `CallTimeout` inside the call when the bound passes, so the
call stops where it is: no thread is left running the hung code, nothing keeps a reference to a
half-finished env. Python code is interrupted at once (a loop, a sleep, a blocking socket or
subprocess wait); C code that does not return to the interpreter is interrupted when it returns.
Signals reach only the main thread: elsewhere (and on platforms without SIGALRM) the call runs
unbounded, with one warning.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class CallTimeout(Exception):
    """A bounded call ran past its time limit."""


_warned = False


@contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Raise `CallTimeout` in the body if it runs longer than `seconds` (None or 0: unbounded)."""
    global _warned
    if not seconds:
        yield
        return
    main = threading.current_thread() is threading.main_thread()
    if not (main and hasattr(signal, "setitimer")):
        if not _warned:
            _warned = True
            warnings.warn("rollout.env_timeout_s is enforced with SIGALRM, which only the main "
                          "thread receives: env calls off the main thread run unbounded",
                          stacklevel=3)
        yield
        return
    armed = [True]

    def _expire(signum, frame):
        if armed[0]:  # a late alarm after the body finished is ignored
            raise CallTimeout(f"{what} did not return within {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, _expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # someone else's timer was running: give it back what it has left
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 1e-3))
