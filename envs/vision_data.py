"""VisionQA's data: reading a JSONL of real problems (`load_rows`) and grading a reply against
the gold answer (`grade_answer`)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from .images import (
    MAX_ASPECT_RATIO,
    EncodedImage,
    clip_bbox,
    probe_image,
)
from .sources import SourceSpec, load_source
from .vision_synth import Scene

IMAGE_MARKER = "<image>"
_JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")


class VisionDatasetError(ValueError):
    """A JSONL file with no usable row; the message lists the first problems by file:line."""


# ----------------------------------------------------------------------------- files


@dataclasses.dataclass(frozen=True)
class VisionProblem:
    """One question; `bbox` marks the evidence in the first image (in its file's pixels)."""

    question: str
    answer: str
    id: str
    where: str  # "file.jsonl:LINE" or "synthetic ...": names the problem in error messages
    images: tuple[Path | EncodedImage, ...] = ()  # data rows; synthetic ones render `scene`
    sizes: tuple[tuple[int, int], ...] = ()  # header sizes of `images`
    bbox: tuple[int, int, int, int] | None = None
    scene: Scene | None = None


def _image_ref(item: Any, folder: Path, name: str) -> Path | EncodedImage:
    """A row's image: a path (relative to the data's folder), or a datasets Image cell
    ({"bytes", "path"}, or a decoded PIL image) held as its encoded bytes."""
    if isinstance(item, Image.Image):
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return EncodedImage(buf.getvalue(), name)
    if isinstance(item, dict):
        if item.get("bytes"):
            return EncodedImage(bytes(item["bytes"]), item.get("path") or name)
        if not item.get("path"):
            raise ValueError("an image cell has neither bytes nor a path")
        item = item["path"]
    path = Path(item)
    return path if path.is_absolute() else folder / path


def _row_problem(row: Any, folder: Path, where: str) -> VisionProblem:
    """A validated problem from one JSON row; ValueError (message without `where`) if bad."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("field 'question' must be a non-empty string")
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or (
            isinstance(answer, float) and not math.isfinite(answer)):
        raise ValueError(f"field 'answer' must be a string or a number, got {answer!r}")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # 3.0 -> "3", the natural gold
    if not str(answer).strip():
        raise ValueError("field 'answer' is an empty string")
    if (row.get("image") is not None) == (row.get("images") is not None):
        raise ValueError("give exactly one of 'image' (a path) or 'images' (a list of paths)")
    paths = [row["image"]] if row.get("image") is not None else row["images"]
    if not isinstance(paths, list) or not paths or not all(
            (isinstance(p, str) and p) or isinstance(p, (dict, Image.Image)) for p in paths):
        raise ValueError("'image' must be a path string and 'images' a non-empty list of them")
    markers = question.count(IMAGE_MARKER)
    if markers and markers != len(paths):
        raise ValueError(f"the question has {markers} {IMAGE_MARKER} marker(s) but the row has "
                         f"{len(paths)} image(s); use one marker per image or none")
    files = tuple(_image_ref(p, folder, f"image {i}") for i, p in enumerate(paths))
    sizes = tuple(probe_image(f)[0] for f in files)  # header only: existence, size, ratio
    bbox = None
    if row.get("bbox") is not None:
        try:
            bbox = clip_bbox(row["bbox"], sizes[0])
        except ValueError as e:
            raise ValueError(f"field 'bbox': {e} (the first image, {files[0].name})") from None
        bw, bh = bbox[2] - bbox[0], bbox[3] - bbox[1]
        if max(bw, bh) / min(bw, bh) > MAX_ASPECT_RATIO:  # its crop would be refused
            raise ValueError(f"field 'bbox': {list(bbox)} is {bw}x{bh} px, an aspect ratio over "
                             f"{MAX_ASPECT_RATIO}:1 that VLM processors refuse")
    row_id = row.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise ValueError(f"field 'id' must be a string or an int, got {row_id!r}")
    return VisionProblem(question, str(answer).strip(),
                         str(row_id) if row_id is not None else where, where, files, sizes, bbox)


def load_source_rows(spec: SourceSpec) -> tuple[list[VisionProblem], list[str], list[str]]:
    """(valid problems, every skipped row's "where: problem", those skipped for their images
    or boxes) from a dataset source (`envs/sources.py`: hub id, save_to_disk folder, Parquet,
    CSV, mapped JSON lines). Image cells hold encoded bytes or paths (relative to the data's
    folder); a question or answer that cannot be used was already counted by the source."""
    loaded = load_source(spec)
    local = Path(spec.source).expanduser()
    folder = local.parent if local.is_file() else local if local.is_dir() else Path.cwd()
    problems, image_errors = [], []
    for row in loaded.rows:
        try:
            problems.append(_row_problem(row, folder, row["where"]))
        except ValueError as e:  # includes ImageError
            image_errors.append(f"{row['where']}: {e}")
    return problems, [*loaded.errors, *image_errors], image_errors


def load_rows(path: str | os.PathLike[str]) -> tuple[list[VisionProblem], list[str]]:
    """(valid problems, one "file:LINE: problem" message per skipped row) from a JSONL file.

    A row is {"image": path} or {"images": [paths]}, "question", "answer", optional "bbox"
    [x0, y0, x1, y1] (pixels of the first image; clipped if partly outside) and "id". Relative
    paths are relative to the file's folder. `<image>` markers in the question place the images
    (one per image). Images are checked from their headers only (decoded at reset).
    """
    path = Path(path)
    if not path.is_file():
        raise VisionDatasetError(f"{path}: no such file")
    if path.suffix.lower() not in _JSONL_SUFFIXES:
        raise VisionDatasetError(f"{path}: expected a JSON-lines file "
                                 f"({', '.join(_JSONL_SUFFIXES)}), got {path.suffix!r}")
    problems, errors = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise VisionDatasetError(f"{path}: not UTF-8 text ({e})") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines are not rows
        where = f"{path.name}:{lineno}"
        try:
            problems.append(_row_problem(json.loads(line), path.parent, where))
        except json.JSONDecodeError as e:
            errors.append(f"{where}: invalid JSON ({e.msg})")
        except ValueError as e:  # includes ImageError
            errors.append(f"{where}: {e}")
    return problems, errors


# ----------------------------------------------------------------------------- grading

_ANSWER = re.compile(r"answer[\s*_]*[:：]\s*([^\n]*)", re.IGNORECASE)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def _normalise(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().lower())
    text = re.sub(r"^[\s*_`'\"$(\[]+|[\s*_`'\"$.,;:!)\]]+$", "", text)
    return re.sub(r"^(the|a|an) ", "", text)


def _as_number(text: str) -> float | None:
    """3, 3.0, "three", "3 dots" -> 3.0; anything else (e.g. "3 or 4") -> None."""
    head, *rest = text.split(" ") if text else [""]
    if not all(w.isalpha() for w in rest):
        return None
    if _NUMBER.fullmatch(head):
        return float(head)
    return float(_NUMBER_WORDS[head]) if head in _NUMBER_WORDS else None


def grade_answer(reply: str, gold: str) -> tuple[bool, str | None]:
    """(is the reply's last "Answer: X" equal to gold, X normalised or None if there is none).

    Case, articles, markdown and trailing punctuation are ignored; numbers compare numerically
    (number words count); a one-letter gold (multiple choice) accepts "B", "(B)", "B) ...".
    Other golds with digits (fractions, expressions) are graded with math-verify.
    """
    found = _ANSWER.findall(reply)
    if found:
        raw = found[-1]
    else:
        from .answers import last_boxed  # lazily: answers imports math-verify (~1 s)

        raw = last_boxed(reply)
        if raw is None:
            return False, None
    pred, want = _normalise(raw), _normalise(gold)
    if not pred:
        return False, None
    if pred == want:
        return True, pred
    gold_num = _as_number(want)
    if gold_num is not None:
        pred_num = _as_number(pred)
        return pred_num is not None and math.isclose(pred_num, gold_num, abs_tol=1e-9), pred
    if len(want) == 1 and want.isalpha():
        return bool(re.match(rf"{re.escape(want)}\b", pred)), pred
    if any(c.isdigit() for c in want):
        from .answers import check_answer

        return check_answer(f"\\boxed{{{raw.strip()}}}", gold)[0], pred
    return False, pred
