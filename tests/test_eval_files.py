"""`mmopd eval --out` writes every generation; `mmopd compare` prints the rows that flipped."""

from __future__ import annotations

import json

import datasets
import pytest

from mmopd.cli import main
from mmopd.envs import register_env
from mmopd.envs.math_text import MathTextEnv


def _grade(prompt: str, reply: str) -> str:
    return str(sum(map(ord, prompt + reply)) % 5)


class CharSumEnv(MathTextEnv):
    """MathText's prompts, graded by a rule a tiny model meets about a fifth of the time (its
    answer is the sum of the code points of prompt and reply, mod 5; gold is "0"), so the eval
    files of tiny models hold right and wrong rows, votes and flips."""

    def step(self, action):
        pred = _grade(self._current.question, action)
        self._current = None
        return "", float(pred == "0"), True, False, {"correct": pred == "0", "pred": pred}

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return obs, {**info, "answer": "0"}


register_env("test/CharSum-v0", CharSumEnv, order_enforce=False)


def _eval(capsys, model, out, *args) -> dict:
    assert main(["eval", str(model), "--env", "test/CharSum-v0", "--env-kwargs",
                 '{"split": "test", "level": 1}', "--num-problems", "20", "--max-new-tokens", "6",
                 "--out", str(out), *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_every_generation_and_its_metrics_agree(student_dir, tmp_path, capsys):
    out = tmp_path / "student.jsonl"
    res = _eval(capsys, student_dir, out, "--samples", "3")
    rows = _rows(out)
    assert res["generations"] == str(out) and len(rows) == 20 == res["num_problems"]
    assert [r["index"] for r in rows] == list(range(20))
    for r in rows:  # each row is graded again here from its own text
        assert r["prompt"] and r["answer"] == "0" and r["stop_reason"]
        assert r["pred"] == _grade(r["prompt"], r["reply"]) and r["correct"] == (r["pred"] == "0")
        assert len(r["samples"]) == 3
        for s in r["samples"]:
            assert s["pred"] == _grade(r["prompt"], s["reply"])
            assert s["correct"] == (s["pred"] == "0")
        preds = [s["pred"] for s in r["samples"]]
        top = max(map(preds.count, preds))
        assert preds.count(r["maj_answer"]) == top
        assert r["maj_answer"] == next(p for p in preds if preds.count(p) == top)  # first seen
        assert r["maj_correct"] == (r["maj_answer"] == "0")
    assert res["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 20)
    assert res["pass@3"] == pytest.approx(
        sum(any(s["correct"] for s in r["samples"]) for r in rows) / 20)
    assert res["maj@3"] == pytest.approx(sum(r["maj_correct"] for r in rows) / 20)
    assert 0 < res["accuracy"] < 1 and 0 < res["maj@3"]  # both kinds of row are exercised


def test_compare_prints_the_flipped_rows(student_dir, sft_teacher_dir, tmp_path, capsys):
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    _eval(capsys, student_dir, before)  # random: one reply for every prompt
    _eval(capsys, sft_teacher_dir, after)  # briefly supervised: replies that follow the prompt
    a, b = _rows(before), _rows(after)
    fixed = [x["problem_id"] for x, y in zip(a, b) if not x["correct"] and y["correct"]]
    broken = [x["problem_id"] for x, y in zip(a, b) if x["correct"] and not y["correct"]]
    assert fixed and broken  # each model right where the other is wrong
    assert main(["compare", str(before), str(after)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"20 shared problems: accuracy {before} "
                           f"{sum(r['correct'] for r in a) / 20:.3f}")
    assert f"{len(fixed)} fixed" in text and f"{len(broken)} broken" in text
    for pid in fixed + broken:
        assert f"  {pid}: " in text


def test_compare_and_eval_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"index": 0}\n')
    assert main(["compare", str(bad), str(bad)]) == 2
    assert "bad.jsonl:1: not a row of `mmopd eval --out`" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text('{"problem_id": "x", "correct": true}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem_id": "y", "correct": true}\n')
    assert main(["compare", str(other), str(good)]) == 2
    assert "share no problem_id" in capsys.readouterr().err
    # a bad preset or a missing column fails before the model (which does not exist) loads
    data = tmp_path / "set"
    datasets.Dataset.from_dict({"question": ["1+1"], "answer": ["#### 2"]}).save_to_disk(str(data))
    assert main(["eval", str(tmp_path / "no-model"), "--source", str(data),
                 "--preset", "gsm9k"]) == 2
    assert "unknown preset 'gsm9k'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no-model"), "--source", str(data),
                 "--env-kwargs", '{"fields": {"question": "prompt"}}']) == 2
    assert "fields name column(s) the data does not have: question='prompt'" in \
        capsys.readouterr().err


def test_eval_samples_at_the_given_temperature_and_top_p(student_dir, tmp_path, capsys,
                                                         monkeypatch):
    """`mmopd eval --temperature 0.6 --top-p 0.95` (REOPOLD's evaluation sampling) reaches the
    sampled replies; the greedy ones stay greedy."""
    from mmopd.rollout import evaluate

    seen = []
    real = evaluate.collect_episodes
    monkeypatch.setattr(evaluate, "collect_episodes",
                        lambda envs, starts, sampler, renderer, params, **k:
                        seen.append(params) or real(envs, starts, sampler, renderer, params, **k))
    _eval(capsys, student_dir, tmp_path / "p.jsonl", "--samples", "2", "--temperature", "0.6",
          "--top-p", "0.95")
    assert [(p.n, p.temperature, p.top_p) for p in seen] == [(1, 0.0, 1.0), (2, 0.6, 0.95)]
    assert main(["eval", str(student_dir), "--top-p", "0"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
