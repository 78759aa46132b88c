"""Every example under examples/ runs: two optimiser steps on tiny models through its seam."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, out: Path, monkeypatch) -> list[dict]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    result = importlib.import_module(name).main(str(out))
    assert result["step"] == 2
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    return rows


def test_examples_are_all_tested():
    tested = {"custom_env", "custom_tool", "custom_objective", "custom_teacher"}
    assert {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")} == tested


def test_custom_env(tmp_path, monkeypatch):
    rows = _run("custom_env", tmp_path, monkeypatch)
    assert "train_accuracy" in rows[0]
    assert "id: examples/LetterCount-v0" in (tmp_path / "run" / "config.yaml").read_text()


def test_custom_tool(tmp_path, monkeypatch):
    from mmopd.tools import call_tool, make_tool

    rows = _run("custom_tool", tmp_path, monkeypatch)
    assert "tool_calls" in rows[0] and "tool_parse_errors" in rows[0]
    res = call_tool(make_tool("word_count"), {"text": "a b c"})
    assert res.text.strip() == "3"


def test_custom_objective_from_yaml(tmp_path, monkeypatch):
    rows = _run("custom_objective", tmp_path, monkeypatch)
    assert 0 < rows[0]["teacher_confidence"] <= 1  # the custom plan's own metric
    assert "name: confident_opd" in (tmp_path / "run" / "config.yaml").read_text()


def test_custom_teacher(tmp_path, monkeypatch):
    rows = _run("custom_teacher", tmp_path, monkeypatch)
    assert math.isfinite(rows[0]["distill_reward"])
    assert "kind: custom" in (tmp_path / "run" / "config.yaml").read_text()


def test_custom_teacher_bad_factory(tmp_path, monkeypatch):
    from mmopd.config import ConfigError
    from mmopd.training.loop import train

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from _tiny import tiny_config

    with pytest.raises(ConfigError, match="teacher.factory.*module:function"):
        tiny_config(tmp_path, ["teacher.kind=custom", "teacher.factory=custom_teacher"])
    cfg = tiny_config(tmp_path, ["teacher.kind=custom", "teacher.factory=no_such_mod:make",
                                 "objective.name=opd"])
    with pytest.raises(ConfigError, match="cannot load 'no_such_mod:make'"):
        train(cfg)
    with pytest.raises(ConfigError, match="needs the teacher's full distribution"):
        tiny_config(tmp_path, ["teacher.kind=custom", "teacher.factory=custom_teacher:make_teacher",
                               "objective.name=rkl"])


def test_unknown_objective_after_imports_is_one_clear_error(tmp_path, monkeypatch):
    from mmopd.config import ConfigError

    monkeypatch.syspath_prepend(str(EXAMPLES))
    from _tiny import tiny_config

    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        tiny_config(tmp_path, ["objective.name=nope", "env.imports=[custom_objective]"])
    with pytest.raises(ConfigError, match="env.imports: cannot import module 'no_such_module'"):
        tiny_config(tmp_path, ["objective.name=nope", "env.imports=[no_such_module]"])

