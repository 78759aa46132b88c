"""`mmopd export`: a checkpoint as a clean save_pretrained folder with a model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from mmopd.cli import main
from mmopd.config import TrainConfig, load_config
from mmopd.export import model_card
from mmopd.training.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, student_dir, teacher_dir) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train(load_config(TrainConfig, None, [
        f"model.path={student_dir}", f"teacher.model.path={teacher_dir}", "env.kwargs={level: 1}",
        "rollout.prompts_per_batch=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
        "trainer.steps=2", f"trainer.output_dir={out}", "eval.num_problems=3", "eval.pass_k=2",
        "eval.at_start=true", "trainer.report_to=none", "objective.name=reopold"]))
    return out


def test_export_writes_a_loadable_folder_and_a_model_card(run_dir, student_dir, teacher_dir,
                                                          tmp_path, capsys):
    ckpt, out = run_dir / "checkpoints" / "step-2", tmp_path / "exported"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    names = {f.name for f in out.iterdir()}
    assert not names & {"training_state.pt", "manifest.json", "adapter"}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    ids = AutoTokenizer.from_pretrained(out)("12+3=", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, trained(ids).logits)
    GenerationConfig.from_pretrained(out)

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "\ndatasets:" not in card  # generated problems: no hub dataset to name
    assert model_card({"env": {"kwargs": {"source": "openai/gsm8k"}}}, [], 1).count(
        "datasets:\n- openai/gsm8k") == 1
    assert "datasets:" not in model_card({"env": {"kwargs": {"source": "synthetic"}}}, [], 1)
    assert "datasets:" not in model_card({"env": {"kwargs": {"source": str(tmp_path)}}}, [], 1)
    assert f"base_model: {student_dir}" in card and f"`{teacher_dir}`" in card
    assert "with the `reopold` objective" in card and "| steps | 2 |" in card
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:  # before and after, as eval.jsonl has them
        assert f"| {r['step']} | {r['accuracy']:.3f} |" in card
    assert "name: reopold" in card and "| environment | `mmopd/MathText-v0` |" in card


def test_export_refuses_incomplete_checkpoints_and_full_folders(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "step-2"
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    assert main(["export", str(ckpt), "--out", str(full)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (full / "x").read_text() == "keep me"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert main(["export", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "incomplete checkpoint (no manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
