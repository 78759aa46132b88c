"""Problem sources: Hugging Face datasets (hub ids, `save_to_disk` folders, Parquet, CSV) and
JSON-lines files, mapped onto one row shape by a preset or a `fields` mapping.

A source gives canonical rows: question, answer, and optionally solution, image(s), bbox, id.
`fields` maps each canonical name to a column of the data; a preset names the columns of a
common format and derives what the format stores indirectly (GSM8K's answer after "####",
MATH's `\\boxed{}` answer inside the solution). Hub ids, `save_to_disk` folders, Parquet and CSV
load through `datasets`; JSON lines are read line by line (datasets' JSON reader refuses a
column that mixes numbers and strings, which hand-written files often do, and cannot name the
line of an error).

A row that cannot be used (no question, no answer, an answer a preset cannot parse) is skipped,
counted and reported with its index; a source where every row is bad is one `DatasetError`.
Loaded sources are cached per process: an env pool of 64 instances reads its file once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .presets import PRESETS, cell_text

CANONICAL = ("question", "answer", "solution", "image", "images", "bbox", "id")
JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
_DATASETS_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}
_SHOWN = 5  # bad rows named in a warning or error


class DatasetError(ValueError):
    """A source that cannot be loaded or has no usable row; the message names the source."""


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where rows come from and how their columns map (hashable: the load cache's key)."""

    source: str
    subset: str | None = None
    split: str | None = None  # the dataset's split; None: the only one, or "train"
    preset: str | None = None
    fields: tuple[tuple[str, str], ...] = ()  # (canonical, column)

    @property
    def name(self) -> str:
        base = Path(self.source).name if is_local_source(self.source) else self.source
        return base + (f"[{self.split}]" if self.split else "")


def source_spec(source: str | os.PathLike[str], *, subset: str | None = None,
                split: str | None = None, preset: str | None = None,
                fields: Mapping[str, str] | None = None) -> SourceSpec:
    """Validate the arguments (no I/O): unknown presets and canonical names fail here."""
    if preset is not None and preset not in PRESETS:
        raise DatasetError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    fields = dict(fields or {})
    bad = [k for k in fields if k not in CANONICAL]
    if bad:
        raise DatasetError(f"fields: unknown name(s) {bad}; fields maps {', '.join(CANONICAL)} "
                           "to columns of the data")
    for k, v in fields.items():
        if not isinstance(v, str) or not v:
            raise DatasetError(f"fields.{k} must be a column name, got {v!r}")
    for name, value in (("subset", subset), ("split", split)):
        if value is not None and (not isinstance(value, str) or not value):
            raise DatasetError(f"{name} must be a non-empty string, got {value!r}")
    return SourceSpec(str(source), subset, split, preset, tuple(sorted(fields.items())))


def env_source_spec(source: str | os.PathLike[str], env_split: str, *,
                    subset: str | None = None, source_split: str | None = None,
                    preset: str | None = None,
                    fields: Mapping[str, str] | None = None) -> SourceSpec:
    """The spec an env's arguments name: the dataset's split is `source_split`, else the
    env's own split where the source has splits (a hub id, a DatasetDict folder); a single
    file has one, which serves both of the env's splits."""
    if fields is not None and not isinstance(fields, Mapping):
        raise DatasetError(f"fields must be a mapping of names to columns, got {fields!r}")
    return source_spec(source, subset=subset, preset=preset, fields=fields,
                       split=source_split or (None if is_file_source(source) else env_split))


def is_file_source(source: str | os.PathLike[str]) -> bool:
    """A single file (one split, served to both of an env's splits), not a hub id or folder."""
    suffix = Path(str(source)).suffix.lower()
    return suffix in JSONL_SUFFIXES or suffix in _DATASETS_SUFFIXES


def is_local_source(source: str) -> bool:
    """A path on this machine (existing, or spelt like a path or a data file), not a hub id."""
    return os.path.exists(source) or source.startswith((".", "/", "~")) or is_file_source(source)


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) of each non-blank line; a line that is not JSON is recorded as
    the ValueError that reports it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from e
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((lineno, ValueError(f"invalid JSON ({e.msg})")))
    return rows


def _pick_split(data: Any, spec: SourceSpec) -> Any:
    import datasets

    if not isinstance(data, datasets.DatasetDict):
        return data
    if spec.split is None:
        if len(data) == 1:
            return next(iter(data.values()))
        if "train" in data:
            return data["train"]
    elif spec.split in data:
        return data[spec.split]
    raise DatasetError(f"{spec.source}: no split {spec.split!r}; its splits: "
                       f"{', '.join(data)} (set the env's source_split)")


def _load_datasets(spec: SourceSpec) -> Any:
    """A `datasets.Dataset` for a hub id, a save_to_disk folder, or a Parquet / CSV / JSON file."""
    import datasets

    datasets.disable_progress_bars()
    src = spec.source
    path = Path(src).expanduser()
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                return _pick_split(datasets.load_from_disk(str(path)), spec)
            raise DatasetError(f"{src}: a folder, but not one written by datasets' save_to_disk "
                               "(no dataset_dict.json or state.json)")
        suffix = path.suffix.lower()
        if suffix in _DATASETS_SUFFIXES:
            if not path.is_file():
                raise DatasetError(f"{src}: no such file")
            return datasets.load_dataset(_DATASETS_SUFFIXES[suffix], data_files=str(path),
                                         split="train")
        if is_local_source(src):
            raise DatasetError(f"{src}: no such file or folder")
        return _pick_split(datasets.load_dataset(src, spec.subset), spec)
    except DatasetError:
        raise
    except ConnectionError as e:
        hint = ("HF_HUB_OFFLINE is set and the dataset is not in the local cache"
                if os.environ.get("HF_HUB_OFFLINE") else "the Hugging Face Hub cannot be reached")
        raise DatasetError(f"{src}: {hint} ({e}); download it where there is a network "
                           "(datasets' save_to_disk) and pass that folder as the source") from e
    except Exception as e:  # not found, bad subset, a corrupt file: the library's own words
        raise DatasetError(f"{src}: cannot load ({type(e).__name__}: {e})") from e


def _records(spec: SourceSpec) -> tuple[list[tuple[str, Any]], list[str]]:
    """(where, record) pairs and the source's column names."""
    path = Path(spec.source).expanduser()
    if path.suffix.lower() in JSONL_SUFFIXES:
        if not path.is_file():
            raise DatasetError(f"{spec.source}: no such file")
        rows = _read_jsonl(path)
        columns = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
        return [(f"{path.name}:{n}", r) for n, r in rows], columns
    data = _encoded_images(_load_datasets(spec))
    return [(f"{spec.name}:{i}", r) for i, r in enumerate(data)], list(data.column_names)


def _encoded_images(data: Any) -> Any:
    """Image columns as their encoded bytes ({"bytes", "path"}), decoded only when an episode
    shows them, as image files are."""
    import datasets

    for name, feature in data.features.items():
        if isinstance(feature, datasets.Image):
            data = data.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(
                feature.feature, datasets.Image):
            data = data.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return data


def _mapping(spec: SourceSpec, columns: list[str]) -> dict[str, str]:
    """canonical name -> column; a `fields` entry naming a missing column is an error."""
    explicit = dict(spec.fields)
    missing = {k: v for k, v in explicit.items() if v not in columns}
    if missing and columns:
        raise DatasetError(f"{spec.source}: fields name column(s) the data does not have: "
                           + ", ".join(f"{k}={v!r}" for k, v in missing.items())
                           + f"; its columns: {', '.join(columns)}")
    out: dict[str, str] = {}
    preset = PRESETS[spec.preset] if spec.preset else None
    for name in CANONICAL:
        if name in explicit:
            out[name] = explicit[name]
        elif preset is not None:
            found = [c for c in preset.fields.get(name, ()) if c in columns]
            if found:
                out[name] = found[0]
        elif name in columns:
            out[name] = name
    if not columns:  # no row is an object (JSON lines): each row reports its own problem
        return {name: explicit.get(name, name) for name in CANONICAL}
    if "question" not in out:
        raise DatasetError(f"{spec.source}: no question column (its columns: "
                           f"{', '.join(columns) or 'none'}); map one with fields.question")
    return out


@dataclasses.dataclass(frozen=True)
class Loaded:
    rows: tuple[dict[str, Any], ...]  # canonical rows, each with "where" ("name:index")
    errors: tuple[str, ...]  # "where: problem" for each skipped row
    total: int


@functools.lru_cache(maxsize=16)
def _load(spec: SourceSpec, required: tuple[str, ...], stamp: float) -> Loaded:
    records, columns = _records(spec)
    mapping = _mapping(spec, columns)
    derive = PRESETS[spec.preset].derive if spec.preset else None
    rows, errors = [], []
    for where, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            if not isinstance(record, dict):
                raise ValueError("expected a JSON object")
            row = {name: record.get(col) for name, col in mapping.items()}
            if derive is not None:
                row = derive(row)
            for name in ("question", "answer", "solution"):
                if name in row and row[name] is not None:
                    text = cell_text(row[name])
                    if text is None and name in required:
                        raise ValueError(f"field {name!r} must be a non-empty string or a "
                                         f"number, got {row[name]!r}")
                    row[name] = text
            absent = [n for n in required if row.get(n) is None]
            if absent:
                raise ValueError(f"missing field {absent[0]!r}"
                                 + (f" (column {mapping[absent[0]]!r})" if absent[0] in mapping
                                    else ""))
            rows.append({**row, "where": where})
        except ValueError as e:
            errors.append(f"{where}: {e}")
    if not rows:
        shown = "\n  ".join(errors[:_SHOWN]) or "the source has no rows"
        raise DatasetError(f"{spec.source}: no usable row of {len(records)}; first problems:"
                           f"\n  {shown}")
    return Loaded(tuple(rows), tuple(errors), len(records))


def _stamp(source: str) -> float:
    """Modification time of a local source (a changed file is read again), 0 for hub ids."""
    try:
        return os.stat(Path(source).expanduser()).st_mtime
    except OSError:
        return 0.0


_reported: set[tuple[SourceSpec, float]] = set()


def load_source(spec: SourceSpec, required: Iterable[str] = ("question", "answer")) -> Loaded:
    """The usable rows of a source; skipped rows are warned about once per process."""
    stamp = _stamp(spec.source)
    loaded = _load(spec, tuple(required), stamp)
    if loaded.errors and (spec, stamp) not in _reported:
        _reported.add((spec, stamp))
        more = len(loaded.errors) - _SHOWN
        warnings.warn(f"{spec.source}: skipped {len(loaded.errors)} unusable row(s) of "
                      f"{loaded.total}: " + "; ".join(loaded.errors[:_SHOWN])
                      + (f"; ... and {more} more" if more > 0 else "")
                      + " (all of them: env.unwrapped.row_errors)", stacklevel=3)
    return loaded
