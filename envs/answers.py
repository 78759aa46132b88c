"""Grading a model's math answer against a gold answer with math-verify, safely and quickly."""

from __future__ import annotations

import logging
import re
import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

# math-verify's timeout uses signal.alarm, which only works in the main thread (elsewhere parse
# and verify raise ValueError). Off the main thread we pass None (no timeout) and rely on the
# input caps and the _EXPLOSIVE guard below to keep sympy from hanging.
_MAIN_THREAD_TIMEOUT_S = 2
_MAX_ANSWER_CHARS = 500  # a boxed "answer" longer than this is not an answer
_FALLBACK_TAIL_CHARS = 1000  # final answers sit at the end; bounds regex/parse cost
_MAX_BOXED_TRIES = 8  # bounds the scan on text full of unbalanced "\boxed{"

_INT = re.compile(r"[+-]?\d+")
# Expressions whose exact evaluation can take minutes in sympy (power towers, huge exponents,
# big factorials): only the main-thread alarm would stop verify, so grade them everywhere by
# exact string match instead. Rewards then do not depend on which thread graded them.
_EXPLOSIVE = re.compile(
    r"\^\s*\{[^{}]*\^|\^\s*\w+\s*\^"  # power towers: 10^{10^{10}}, 9^9^9
    r"|\^\s*\{?\s*[+-]?\d{4,}"  # huge exponents: 2^{100000}
    r"|\d{4,}\s*!|!\s*!|\\binom\s*\{\s*\d{4,}"  # huge factorials / binomials
)


class _DropDisabledTimeoutWarning(logging.Filter):
    # We disable math-verify's timeout on purpose off the main thread (see above), so its
    # "Timeout is disabled ... you must provide the logic" warning is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def _timeout() -> int | None:
    return _MAIN_THREAD_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> list:
    return parse(text, parsing_timeout=_timeout())


def last_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...} in text, or None."""
    end = len(text)
    for _ in range(_MAX_BOXED_TRIES):
        start = text.rfind("\\boxed", 0, end)
        if start < 0:
            return None
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, min(len(text), i + _MAX_ANSWER_CHARS + 2)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
        end = start  # unbalanced or too long: try the previous \boxed
    return None


def _grade(completion: str, gold: str) -> tuple[bool, str | None]:
    gold = gold.strip().strip("$").strip()
    gold = last_boxed(gold) or gold  # datasets sometimes store the gold as "\\boxed{...}"
    boxed = last_boxed(completion)
    if boxed is not None:
        pred = boxed.strip()
        if not pred:
            return False, None
        parsed = None  # parsed below, after the cheap checks
    else:
        parsed = _parse(completion[-_FALLBACK_TAIL_CHARS:])
        if not parsed:
            return False, None
        pred = parsed[-1] if isinstance(parsed[-1], str) else str(parsed[0])
    if len(pred) > _MAX_ANSWER_CHARS:
        return False, pred[:_MAX_ANSWER_CHARS]
    # Fast path: integer vs integer needs no sympy (~100x faster, the common case in training).
    if _INT.fullmatch(pred) and _INT.fullmatch(gold):
        return int(pred) == int(gold), pred
    if _EXPLOSIVE.search(pred):
        return pred == gold, pred
    if parsed is None:
        parsed = _parse("\\boxed{" + pred + "}")
    gold_parsed = _parse("\\boxed{" + gold + "}")
    if not parsed or not gold_parsed:
        return pred == gold, pred
    return bool(verify(gold_parsed, parsed, timeout_seconds=_timeout())), pred


def check_answer(completion: str, gold: str) -> tuple[bool, str | None]:
    """(is the completion's final answer equal to gold, the extracted answer or None).

    Uses the last balanced \\boxed{...} if there is one, else math-verify's default extraction
    over the end of the text. Never raises on any string input; safe to call from any thread.
    """
    if not isinstance(completion, str) or not isinstance(gold, str):
        raise TypeError(
            f"check_answer expects (str, str), got ({type(completion).__name__}, "
            f"{type(gold).__name__})"
        )
    try:
        return _grade(completion, gold)
    except (Exception, TimeoutException):  # adversarial text must grade as wrong, not crash
        return False, None
