"""The real loop on tiny random models: run directory, every objective, exact gradient
accumulation, deterministic resume, and the CLI's errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmopd.config import TrainConfig, load_config
from mmopd.objectives import OBJECTIVES
from mmopd.train import train


def _cfg(overrides: list[str], extra: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, None, list(overrides) + list(extra))


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_run_directory_contents(tiny_overrides, tmp_path):
    res = train(_cfg(tiny_overrides, ["eval.at_start=true"]))
    run = Path(res["run_dir"])
    assert (run / "config.yaml").is_file() and (run / "curves.png").stat().st_size > 1000
    metrics = _rows(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("loss", "env_reward", "distill_reward", "kept_frac", "phase", "floor_frac",
                "entropy_threshold", "student_entropy", "kl_estimate", "train_tokens_per_s",
                "time_rollout_s", "time_teacher_s", "time_train_s", "ratio_mean", "grad_norm"):
        assert key in metrics[0], key
    # several minibatch updates per rollout batch: the second one is off-policy (rho != 1)
    assert metrics[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics[1]["ratio_mean"] != pytest.approx(1.0, abs=1e-7)
    evals = _rows(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2] and "pass@2" in evals[0]
    ckpt = run / "checkpoints" / "step-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer_config.json").is_file()
    assert (ckpt / "trainer_state.pt").is_file()
    assert not list((run / "checkpoints").glob(".*tmp"))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains_two_steps(name, tiny_overrides):
    extra = [f"objective.name={name}"]
    res = train(_cfg(tiny_overrides, extra))
    rows = _rows(Path(res["run_dir"]) / "metrics.jsonl")
    assert len(rows) == 2 and all(r["loss"] is not None for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows) or name == "grpo"


@pytest.mark.parametrize("extra", [
    ["objective.name=jsd", "objective.topk=5", "objective.topk_source=teacher"],
    ["objective.name=rkl", "objective.topk=5", "objective.topk_source=student"],
    ["objective.name=opd", "teacher.kind=self", "teacher.view=privileged"],
    ["trainer.gradient_checkpointing=true", "trainer.bf16=true"],
])
def test_variants_run(extra, tiny_overrides):
    res = train(_cfg(tiny_overrides, extra))
    assert len(_rows(Path(res["run_dir"]) / "metrics.jsonl")) == 2


def _first_step_weights(overrides, micro: int, name: str) -> dict[str, torch.Tensor]:
    cfg = _cfg(overrides, [f"trainer.micro_batch_size={micro}", "rollout.minibatches=1",
                           "trainer.steps=1", f"objective.name={name}", "optim.lr=1e-2",
                           "optim.max_grad_norm=1e9", "eval.pass_k=0", "eval.num_problems=1"])
    res = train(cfg)
    from safetensors.torch import load_file

    return load_file(Path(res["run_dir"]) / "checkpoints" / "step-1" / "model.safetensors")


@pytest.mark.parametrize("name", ["reopold", "rkl"])
def test_gradient_accumulation_is_exact(name, tiny_overrides):
    """Token-mean over the whole minibatch: 1 sequence per micro-batch == all at once."""
    a = _first_step_weights(tiny_overrides, 1, name)
    b = _first_step_weights(tiny_overrides, 8, name)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_reproduces_uninterrupted_run(tiny_overrides, tmp_path):
    common = ["trainer.steps=6", "trainer.save_every=2", "trainer.keep_last=5",
              "rollout.minibatches=2", "eval.pass_k=0", "eval.num_problems=2"]
    full = train(_cfg(tiny_overrides, common + [f"trainer.output_dir={tmp_path / 'a'}"]))
    part_dir = tmp_path / "b"
    train(_cfg(tiny_overrides, common + [f"trainer.output_dir={part_dir}", "trainer.steps=4"]))
    # simulate a crash after step 2: newest checkpoint gone, metrics past it still logged
    import shutil

    shutil.rmtree(part_dir / "checkpoints" / "step-4")
    resumed = train(_cfg(tiny_overrides, common + [f"trainer.output_dir={part_dir}",
                                                   "trainer.resume=auto"]))
    a = _rows(Path(full["run_dir"]) / "metrics.jsonl")
    b = _rows(Path(resumed["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "env_reward", "distill_reward", "kl_estimate", "kept_frac"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmopd", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_train_two_steps(tiny_overrides, tmp_path):
    cfg = Path(__file__).parent.parent / "configs" / "tiny" / "reopold.yaml"
    p = _cli("train", str(cfg), *tiny_overrides)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step 2/2" in p.stdout + p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["eval"]["step"] == 2


@pytest.mark.parametrize("extra, match", [
    (["env.id=mmopd/MathTxt-v0"], "did you mean 'mmopd/MathText-v0'"),
    (["objective.name=nope"], "unknown objective 'nope'"),
    (["trainer.steps=abc"], "trainer.steps: expected an integer"),
    (["model.path=/does/not/exist"], "model.path: '/does/not/exist' is not a directory"),
    (["env.kwargs={source: /no/such/file.jsonl}"], "file.jsonl"),
])
def test_cli_bad_input_is_one_clear_error(extra, match, tiny_overrides):
    p = _cli("train", str(Path(__file__).parent.parent / "configs" / "tiny" / "reopold.yaml"),
             *tiny_overrides, *extra)
    assert p.returncode == 2, p.stderr[-3000:]
    assert match in p.stderr and "Traceback" not in p.stderr


def test_tokenizer_mismatch_is_rejected(tiny_overrides, tmp_path, teacher_dir):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    p = _cli("train", str(Path(__file__).parent.parent / "configs" / "tiny" / "reopold.yaml"),
             *tiny_overrides, f"teacher.model.path={other}")
    assert p.returncode == 2 and "tokenizer differs from the student's" in p.stderr


def test_cli_lists(tmp_path):
    p = _cli("envs")
    assert p.returncode == 0 and "mmopd/MathText-v0" in p.stdout
    p = _cli("objectives")
    assert p.returncode == 0 and all(n in p.stdout for n in OBJECTIVES)


@pytest.mark.parametrize("name", ["reopold", "opd", "rkl"])
def test_student_moves_towards_teacher(name, tiny_overrides):
    """Not just running: a few updates on the student's own samples shrink the teacher-student
    KL (sampled-token estimate under the rollout policy)."""
    res = train(_cfg(tiny_overrides, [f"objective.name={name}", "trainer.steps=16",
                                      "rollout.prompts_per_batch=8", "rollout.minibatches=2",
                                      "optim.lr=3e-3", "eval.pass_k=0", "eval.num_problems=1",
                                      "objective.switch_step=8"]))
    kl = [r["kl_estimate"] for r in _rows(Path(res["run_dir"]) / "metrics.jsonl")]
    first, last = sum(kl[:4]) / 4, sum(kl[-4:]) / 4
    assert last < 0.8 * first, (first, last)
