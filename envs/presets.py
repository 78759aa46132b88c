"""Presets: the columns of common dataset formats and what each derives (GSM8K's answer after
"####", MATH's last `\\boxed{}`, verl's chat prompt and reward_model, EasyR1's image
placeholder), for `sources`."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from .answers import last_boxed


def cell_text(value: Any) -> str | None:
    """A scalar cell as stripped text (3.0 -> "3"); None for missing, empty, lists, NaN."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        value = int(value) if value.is_integer() else value
    if not isinstance(value, (str, int, float)):
        return None
    return str(value).strip() or None


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"


def _gsm8k(row: dict[str, Any]) -> dict[str, Any]:
    text = cell_text(row.get("answer"))
    if text is None or "####" not in text:
        raise ValueError("the answer has no '#### <number>' line (GSM8K format)")
    reasoning, _, final = text.rpartition("####")
    final = final.strip().replace(",", "")
    if not final:
        raise ValueError("nothing after '####' in the answer")
    steps = _GSM8K_CALC.sub("", reasoning).strip()
    return {**row, "answer": final, "solution": f"{steps}\n\\boxed{{{final}}}".strip()}


def _math(row: dict[str, Any]) -> dict[str, Any]:
    # MATH-500 stores the answer; MATH keeps it boxed in the solution
    answer = cell_text(row.get("answer"))
    solution = cell_text(row.get("solution"))
    if answer is None and solution is not None:
        answer = last_boxed(solution)
        answer = answer.strip() if answer else None
    if answer is None:
        raise ValueError("no answer column and no \\boxed{} answer in the solution (MATH format)")
    return {**row, "answer": answer}


def _aime(row: dict[str, Any]) -> dict[str, Any]:
    answer = cell_text(row.get("answer"))
    if answer is None:
        raise ValueError("no answer")
    boxed = last_boxed(answer)
    answer = (boxed or answer).strip()
    if not re.fullmatch(r"\d+", answer):
        raise ValueError(f"the answer {answer!r} is not a non-negative integer (AIME format)")
    return {**row, "answer": str(int(answer))}  # "033" -> "33"


_IMAGE_TAG = re.compile(r"\s*<image>\s*")  # a placeholder the env's own image message replaces


def _message_text(content: Any) -> str | None:
    """A chat message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type", "text") == "text") or None
    return None


def _verl(row: dict[str, Any]) -> dict[str, Any]:
    prompt = row.get("question")
    if isinstance(prompt, list):  # the chat: the last user message is the question
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("the prompt has no user message (verl format)")
        prompt = _message_text(users[-1].get("content"))
    reward = row.get("answer")
    answer = reward.get("ground_truth") if isinstance(reward, dict) else reward
    target = row.get("solution")
    if isinstance(target, list):  # LUFFY's off-policy solution, as a chat
        target = next((_message_text(m.get("content")) for m in reversed(target)
                       if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if isinstance(answer, list):  # some sets list the accepted answers; the first is kept
        answer = answer[0] if answer else None
    return {**row, "question": _IMAGE_TAG.sub(" ", prompt).strip() if isinstance(prompt, str)
            else prompt, "answer": answer, "solution": target}


def _easyr1(row: dict[str, Any]) -> dict[str, Any]:
    q = row.get("question")
    return {**row, "question": _IMAGE_TAG.sub(" ", q).strip() if isinstance(q, str) else q}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Column names of a common format (first present column wins) and what it derives."""

    fields: Mapping[str, tuple[str, ...]]
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None
    doc: str


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset({"question": ("question",), "answer": ("answer",)}, _gsm8k,
                    "openai/gsm8k (subset main): the answer follows '####' in the worked "
                    "solution; the solution (calculator notes removed) is the teacher's view"),
    "math": Preset({"question": ("problem",), "answer": ("answer",),
                    "solution": ("solution",)}, _math,
                   "MATH (e.g. EleutherAI/hendrycks_math): the answer is the last \\boxed{} "
                   "of the solution, or the answer column where there is one"),
    "math500": Preset({"question": ("problem",), "answer": ("answer",),
                       "solution": ("solution",)}, _math,
                      "HuggingFaceH4/MATH-500 (only a test split): problem, answer, solution"),
    "aime": Preset({"question": ("problem", "question"), "answer": ("answer",),
                    "solution": ("solution",)}, _aime,
                   "AIME-style sets (e.g. AI-MO/aimo-validation-aime): integer answers 0-999"),
    "verl": Preset({"question": ("prompt",), "answer": ("reward_model",),
                    "solution": ("target",), "images": ("images",)}, _verl,
                   "verl's RL parquet (LUFFY's Openr1-Math-46k and valid.parquet): the question "
                   "is the prompt chat's last user message, the answer "
                   "reward_model.ground_truth, the solution the target chat's answer"),
    "easyr1": Preset({"question": ("problem",), "answer": ("answer",), "images": ("images",)},
                     _easyr1, "EasyR1 / NoisyRollout visual sets (geometry3k): problem (its "
                     "<image> placeholder dropped), answer, images"),
    "vqa": Preset({"question": ("question",), "answer": ("answer",), "image": ("image",),
                   "images": ("images",), "bbox": ("bbox",)}, None,
                  "visual QA with a datasets Image column 'image' (or a list 'images'), "
                  "'question', 'answer' and an optional 'bbox' [x0, y0, x1, y1]"),
}
