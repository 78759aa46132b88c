"""`mmopd compare A.jsonl B.jsonl`: the problems whose greedy answer flipped between two
`mmopd eval --out` files (before / after distillation, two checkpoints, two models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class CompareError(ValueError):
    """An evaluation file that cannot be read or compared; the message names the file."""


def read_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """problem_id -> row of an `mmopd eval` JSONL."""
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"{path}: no such file")
    rows: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CompareError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "problem_id" not in row or "correct" not in row:
            raise CompareError(f"{path}:{n}: not a row of `mmopd eval --out` (needs problem_id "
                               "and correct)")
        rows[str(row["problem_id"])] = row
    if not rows:
        raise CompareError(f"{path}: no rows")
    return rows


def compare(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts over the problems both files hold, and the flipped rows in A's order."""
    shared = [k for k in a if k in b]
    if not shared:
        raise CompareError("the two files share no problem_id (were they run on the same env "
                           "and source?)")
    fixed = [k for k in shared if not a[k]["correct"] and b[k]["correct"]]
    broken = [k for k in shared if a[k]["correct"] and not b[k]["correct"]]
    return {"shared": len(shared), "only_a": len(a) - len(shared), "only_b": len(b) - len(shared),
            "accuracy_a": sum(bool(a[k]["correct"]) for k in shared) / len(shared),
            "accuracy_b": sum(bool(b[k]["correct"]) for k in shared) / len(shared),
            "fixed": fixed, "broken": broken}


def _short(text: Any, width: int = 70) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_comparison(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]],
                      result: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    na, nb = names
    lines = [f"{result['shared']} shared problems: accuracy {na} {result['accuracy_a']:.3f}, "
             f"{nb} {result['accuracy_b']:.3f}; {len(result['fixed'])} fixed (wrong in {na}, "
             f"right in {nb}), {len(result['broken'])} broken (right in {na}, wrong in {nb})"]
    if result["only_a"] or result["only_b"]:
        lines.append(f"not compared: {result['only_a']} only in {na}, {result['only_b']} only "
                     f"in {nb}")
    for title, keys in (("fixed", result["fixed"]), ("broken", result["broken"])):
        if keys:
            lines.append(f"\n{title}:")
        for k in keys:
            ra, rb = a[k], b[k]
            lines.append(f"  {k}: {_short(ra.get('prompt', ''))}")
            lines.append(f"    gold {ra.get('answer')!s}; {na} {ra.get('pred')!s}, "
                         f"{nb} {rb.get('pred')!s}")
    return "\n".join(lines)
