"""Problem sources through `datasets`: presets, fields, splits, bad rows and offline hub ids."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import datasets
import pytest

from mmopd.envs import make_env
from mmopd.envs.math_text import MathTextEnv
from mmopd.envs.sources import PRESETS, DatasetError, load_source, source_spec

MATH = "mmopd/MathText-v0"

GSM8K = {
    "question": ["Natalia sold clips to 48 friends in April, and half as many in May. How many "
                 "clips did she sell altogether?", "Weng earns $12 an hour. How much for 50 min?",
                 "A broken row"],
    "answer": ["In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n"
               "#### 72", "12/60 = <<12/60=0.2>>0.2 per minute; 0.2*50 = <<0.2*50=10>>10\n"
               "#### 1,010", "no final line here"],
}
MATH_ROWS = {
    "problem": ["What is $1+1$?", "Simplify $\\frac{2}{4}$.", "Unboxed"],
    "solution": ["It is $\\boxed{2}$.", "Halve both: $\\boxed{\\frac{1}{2}}$.", "no box"],
    "level": ["Level 1", "Level 2", "Level 1"],
}


def _save(tmp_path, name: str, columns: dict, splits=("train", "test")) -> str:
    folder = tmp_path / name
    data = datasets.Dataset.from_dict(columns)
    datasets.DatasetDict({s: data for s in splits}).save_to_disk(str(folder))
    return str(folder)


def test_gsm8k_preset_from_a_save_to_disk_folder(tmp_path):
    src = _save(tmp_path, "gsm8k", GSM8K)
    with pytest.warns(UserWarning, match=r"skipped 1 unusable row\(s\) of 3: gsm8k\[test\]:2: "
                      r"the answer has no '#### <number>' line"):
        env = MathTextEnv(source=src, split="test", preset="gsm8k")
    assert env.num_problems == 2 and env.row_errors == ("gsm8k[test]:2: the answer has no "
                                                         "'#### <number>' line (GSM8K format)",)
    first = env.problem(0)
    assert first.answer == "72" and first.id == "gsm8k[test]:0"
    assert "<<" not in first.solution and first.solution.endswith("\\boxed{72}")
    assert env.problem(1).answer == "1010"  # thousands separators dropped
    obs, info = env.reset(options={"index": 0})
    assert obs.startswith("Natalia") and "Reference solution" in info["teacher_messages"][-1][
        "content"]
    assert env.step("so \\boxed{72}")[1] == 1.0


def test_math_preset_takes_the_boxed_answer_and_math500_its_column(tmp_path):
    src = _save(tmp_path, "math", MATH_ROWS, splits=("train",))
    with pytest.warns(UserWarning, match="no answer column and no \\\\boxed"):
        env = MathTextEnv(source=src, preset="math")
    assert [env.problem(i).answer for i in range(2)] == ["2", "\\frac{1}{2}"]
    env.reset(options={"index": 1})
    assert env.step("\\boxed{0.5}")[1] == 1.0
    m500 = _save(tmp_path, "m500", {"problem": ["2+3?"], "answer": ["5"],
                                     "solution": ["$\\boxed{6}$ (the column wins)"]},
                 splits=("test",))
    env = MathTextEnv(source=m500, preset="math500", split="test")
    assert env.problem(0).answer == "5"
    with pytest.raises(DatasetError, match=r"no split 'train'; its splits: test \(set the env's "
                       "source_split\\)"):
        MathTextEnv(source=m500, preset="math500")  # train split of a test-only set
    assert MathTextEnv(source=m500, preset="math500", source_split="test").num_problems == 1


def test_aime_preset_csv_and_fields(tmp_path):
    csv = tmp_path / "aime.csv"
    csv.write_text('problem,answer\n"Find x.",033\n"Find y.",\\boxed{7}\n"Find z.",1.5\n')
    with pytest.warns(UserWarning, match=r"aime.csv:2: the answer '1.5' is not a non-negative"):
        problems = MathTextEnv(source=str(csv), preset="aime")
    assert [problems.problem(i).answer for i in range(2)] == ["33", "7"]
    # fields: any column names, any file type datasets reads
    pq = tmp_path / "own.parquet"
    datasets.Dataset.from_dict({"prompt": ["1+2?"], "gold": [3]}).to_parquet(str(pq))
    env = make_env(MATH, source=str(pq), fields={"question": "prompt", "answer": "gold"})
    assert env.unwrapped.problem(0).answer == "3"
    with pytest.raises(DatasetError, match=r"fields name column\(s\) the data does not have: "
                       r"answer='ans'; its columns: prompt, gold"):
        make_env(MATH, source=str(pq), fields={"question": "prompt", "answer": "ans"})


def test_verl_preset_reads_luffys_parquet_layout(tmp_path):
    """verl's RL parquet, as LUFFY ships Openr1-Math-46k and valid.parquet: the question is
    the prompt chat's user message, the answer reward_model.ground_truth."""
    pq = tmp_path / "verl.parquet"
    datasets.Dataset.from_dict({
        "data_source": ["openr1", "openr1"],
        "prompt": [[{"role": "system", "content": "Think first."},
                    {"role": "user", "content": "What is $2+2$? Put it in \\boxed{}."}],
                   [{"role": "system", "content": "Think first."}]],
        "target": [[{"role": "assistant", "content": "2+2 = \\boxed{4}"}], []],
        "reward_model": [{"ground_truth": "4", "style": "rule"},
                         {"ground_truth": "1", "style": "rule"}],
    }).to_parquet(str(pq))
    with pytest.warns(UserWarning, match=r"verl.parquet:1: the prompt has no user message"):
        env = MathTextEnv(source=str(pq), preset="verl")
    p = env.problem(0)
    assert (p.question, p.answer, p.solution) == ("What is $2+2$? Put it in \\boxed{}.", "4",
                                                  "2+2 = \\boxed{4}")


def test_easyr1_preset_drops_the_image_placeholder(tmp_path):
    from PIL import Image

    folder = tmp_path / "geo"
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    datasets.Dataset.from_dict(
        {"images": [[img]], "problem": ["<image>Find the angle $x$."], "answer": ["30"]},
        features=datasets.Features({"images": datasets.Sequence(datasets.Image()),
                                    "problem": datasets.Value("string"),
                                    "answer": datasets.Value("string")}),
    ).save_to_disk(str(folder))
    rows = load_source(source_spec(str(folder), preset="easyr1"), ("question", "answer")).rows
    assert rows[0]["question"] == "Find the angle $x$." and rows[0]["answer"] == "30"
    assert len(rows[0]["images"]) == 1


def test_bad_arguments_fail_before_any_io(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown preset 'gsm9k'; presets: aime, easyr1"):
        source_spec("anything", preset="gsm9k")
    with pytest.raises(DatasetError, match=r"fields: unknown name\(s\) \['prompt'\]"):
        source_spec("anything", fields={"prompt": "q"})
    with pytest.raises(DatasetError, match="no such file or folder"):
        make_env(MATH, source=str(tmp_path / "missing_folder"))
    with pytest.raises(DatasetError, match=r"fields must be a mapping of names to columns, got "
                       r"\['q'\]"):
        make_env(MATH, source=str(tmp_path / "x.csv"), question_key="prompt", fields=["q"])
    assert set(PRESETS) >= {"gsm8k", "math", "math500", "aime", "vqa"}


def test_every_row_bad_is_one_error(tmp_path):
    src = _save(tmp_path, "bad", {"question": ["a", "b"], "answer": ["no", "hash"]})
    with pytest.raises(DatasetError, match=r"no usable row of 2; first problems:\n  bad\[train\]"
                       r":0: the answer has no '####"):
        MathTextEnv(source=src, preset="gsm8k")


def test_a_loaded_source_is_read_once_per_process(tmp_path):
    src = _save(tmp_path, "once", GSM8K)
    spec = source_spec(src, split="train", preset="gsm8k")
    with pytest.warns(UserWarning):
        first = load_source(spec)
    assert load_source(spec) is first  # cached: an env pool of many instances reads it once


def test_offline_hub_id_is_an_immediate_clear_error():
    code = ("from mmopd.envs.math_text import MathTextEnv\n"
            "MathTextEnv(source='openai/gsm8k', subset='main', preset='gsm8k')")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0
    assert "DatasetError: openai/gsm8k: HF_HUB_OFFLINE is set and the dataset is not in the " \
           "local cache" in p.stderr
    assert "save_to_disk" in p.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("preset, columns", [("gsm8k", GSM8K), ("math", MATH_ROWS)])
def test_two_training_steps_on_a_local_dataset(tiny_overrides, tmp_path, preset, columns):
    import json
    import warnings

    from mmopd.config import TrainConfig, load_config
    from mmopd.training.loop import train

    src = _save(tmp_path, preset, columns)
    run = tmp_path / f"run-{preset}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the one unusable row of each set
        train(load_config(TrainConfig, None, [
            *tiny_overrides, f"env.kwargs={{source: {src}, preset: {preset}}}",
            "eval.num_problems=2", "eval.pass_k=0", f"trainer.output_dir={run}"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite: a real update on dataset rows
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals and evals[-1]["num_problems"] == 2


def test_toolmath_poses_a_datasets_word_problems(tmp_path):
    src = _save(tmp_path, "gsm8k", GSM8K)
    with pytest.warns(UserWarning, match="skipped 1 unusable row"):
        env = make_env("mmopd/ToolMath-v0", source=src, preset="gsm8k", split="test")
    assert env.unwrapped.num_problems == 2
    obs, info = env.reset(options={"index": 0})
    assert obs.startswith("Natalia") and info["answer"] == "72" and info["tools"] == ["calculator"]
    assert info["problem_id"] == "gsm8k[test]:0"
    assert env.step("Answer: 72")[1] == 1.0
    with pytest.raises(RuntimeError, match="no expert demonstration"):
        env.reset(options={"index": 1})
        env.unwrapped.expert_reply(info["messages"])
