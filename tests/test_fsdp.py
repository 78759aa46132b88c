"""FSDP2 students on CPU (gloo, two processes), through `mmopd train` as users launch it.

accelerate sets the same environment from configs/accelerate/fsdp.yaml; on CPU processes mmopd
applies it itself (`shard_on_cpu`), so the sharded run is the one a GPU launch takes: the student
sharded per decoder layer, rollouts and log pi_old scoring on gathered weights, training forwards
in lock-step, a gathered `save_pretrained` checkpoint with sharded optimiser state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _torchrun

HERE = Path(__file__).parent
CONFIG = str(HERE.parent / "configs" / "tiny" / "reopold.yaml")
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true"}
SHARDED = "student sharded with FSDP2 across 2 processes"

pytestmark = pytest.mark.slow


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step}" / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _common(student_dir: Path, teacher_dir: Path, out: Path, prompts: int) -> list[str]:
    """opd at a temperature so low that sampling is greedy: one process drawing the whole batch
    and two ranks drawing half each sample the same tokens (the problems are seeded by their
    index in the batch), so the runs must agree."""
    return [f"model.path={student_dir}", f"teacher.model.path={teacher_dir}",
            "env.kwargs={level: 1}", f"rollout.prompts_per_batch={prompts}",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "rollout.minibatches=1",
            "rollout.temperature=0.001", "trainer.steps=3",
            "trainer.micro_batch_size=3", f"trainer.output_dir={out}", "eval.num_problems=4",
            "eval.pass_k=0", "optim.lr=1e-3"]


@pytest.mark.parametrize("objective, shard", [("opd", "false"), ("rkl", "true")],
                         ids=["opd", "rkl-sharded-teacher"])
def test_two_sharded_ranks_train_as_one_process(objective, shard, student_dir, teacher_dir,
                                                tmp_path):
    """3 steps on 2 FSDP2 ranks (4 problems each) against one process on all 8: the same
    losses (relative 1e-5) and final weights (1e-6 absolute; training moves them by ~3e-3).
    Sampled-token opd, and the full-vocabulary rkl with the teacher sharded too (its output
    layer applied to its kept hidden states in the loss)."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = [f"objective.name={objective}"]
    p = subprocess.run([sys.executable, "-m", "mmopd", "train", CONFIG,
                        *_common(student_dir, teacher_dir, one, 8), *extra],
                       capture_output=True, text=True, timeout=300, cwd=HERE.parent,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    p = _torchrun("-m", "mmopd", "train", CONFIG, *_common(student_dir, teacher_dir, two, 4),
                  *extra, f"teacher.shard={shard}", env=FSDP_ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert SHARDED in p.stdout
    assert ("teacher sharded with FSDP2" in p.stdout) == (shard == "true")
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["response_tokens"] == rb["response_tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5), ra["step"]
    # evaluation split across the ranks (2 problems each) and gathered: one process's numbers
    evals = [json.loads((run / "eval.jsonl").read_text().splitlines()[-1]) for run in (one, two)]
    assert evals[0] == evals[1] and evals[0]["num_problems"] == 4
    start = load_file(student_dir / "model.safetensors")
    assert _max_diff(_weights(one, 3), start) > 1e-3  # it trained
    assert _max_diff(_weights(two, 3), _weights(one, 3)) < 1e-6
    ckpt = two / "checkpoints" / "step-3"
    assert sorted(f.name for f in (ckpt / "optimizer").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # one optimiser shard per rank
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)  # a plain checkpoint: loads anywhere


def test_killed_sharded_run_resumes_as_if_uninterrupted(tiny_overrides, tmp_path):
    """kill -9 of the whole launch once a checkpoint exists; `trainer.resume=auto` continues
    from it (sharded optimiser state read back on each rank) with the uninterrupted run's
    metrics."""
    common = [*tiny_overrides, "trainer.steps=8", "trainer.save_every=2", "trainer.keep_last=8",
              "rollout.minibatches=1", "eval.num_problems=2", "eval.pass_k=0"]
    full = tmp_path / "full"
    p = _torchrun("-m", "mmopd", "train", CONFIG, *common, f"trainer.output_dir={full}",
                  env=FSDP_ENV)
    assert p.returncode == 0, p.stderr[-3000:]

    cut = tmp_path / "cut"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **FSDP_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "mmopd", "train", CONFIG, *common, f"trainer.output_dir={cut}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=HERE.parent, start_new_session=True)
    manifest = cut / "checkpoints" / "step-2" / "manifest.json"
    deadline = time.monotonic() + 240
    while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait()
    assert manifest.exists()
    done = sorted(int(d.name.split("-")[1]) for d in (cut / "checkpoints").glob("step-*"))
    assert done and done[-1] < 8, done  # killed before the end

    p = _torchrun("-m", "mmopd", "train", CONFIG, *common, f"trainer.output_dir={cut}",
                  "trainer.resume=auto", env=FSDP_ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    a, b = _rows(full), _rows(cut)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "env_reward", "kl_estimate", "kept_frac"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert _max_diff(_weights(cut, 8), _weights(full, 8)) < 1e-6


CHAT_ENV = '''
import os

import gymnasium as gym
from mmopd.envs import register_env, text_space


class TurnsEnv(gym.Env):
    """1 to 3 turns by seed: the ranks run different numbers of generate calls; on rank 1 about
    half the resets fail, so it also trains and scores fewer micro-batches than rank 0."""

    observation_space = action_space = text_space()

    def reset(self, *, seed=None, options=None):
        if os.environ.get("RANK") == "1" and (seed or 0) % 2:
            raise RuntimeError("this problem failed to load")
        super().reset(seed=seed)
        self.n, self.turns = 0, 1 + (seed or 0) % 3
        return "start", {"messages": [{"role": "user", "content": f"task {seed}"}]}

    def step(self, action):
        self.n += 1
        done = self.n >= self.turns
        return "go on", float(done), done, False, {"correct": done}


register_env("fsdptest/Turns-v0", TurnsEnv)
'''


@pytest.mark.parametrize("world", ["tools", "turns", "vision"])
def test_worlds_train_sharded(world, tiny_overrides, tmp_path):
    """The multi-turn tool world (bf16, gradient checkpointing), a world whose episodes take
    1-3 turns, and a tiny Qwen2.5-VL on the vision world each train 2 steps under FSDP2."""
    env: dict[str, str] = dict(FSDP_ENV)
    args = [*tiny_overrides, "rollout.minibatches=1", "eval.num_problems=2", "eval.pass_k=0"]
    if world == "tools":
        args += ['env={"id": "mmopd/ToolMath-v0", "kwargs": {"level": 1, "call_format": '
                 '"react"}, "eval_kwargs": {"split": "test"}}', "rollout.max_turns=3",
                 "objective.step_weighting=sod", "trainer.bf16=true",
                 "trainer.gradient_checkpointing=true"]  # as the 7B recipes train
    elif world == "turns":
        (tmp_path / "fsdp_turns_env.py").write_text(CHAT_ENV)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
        args += ['env={"id": "fsdptest/Turns-v0", "kwargs": {}, "eval_kwargs": {}, '
                 '"imports": ["fsdp_turns_env"]}', "rollout.max_turns=3", "teacher.shard=true"]
    else:
        from test_vision import _save_vlm

        from mmopd.tokenizer import build_char_tokenizer

        build_char_tokenizer(tmp_path / "vtok", vision=True)
        vl = {n: _save_vlm(tmp_path / n, tmp_path / "vtok", "qwen2_5_vl", seed, hidden)
              for n, seed, hidden in [("vs", 1, 32), ("vt", 2, 64)]}
        args += [f"model.path={vl['vs']}", f"teacher.model.path={vl['vt']}",
                 "env.id=mmopd/VisionQA-v0", "env.kwargs={task: color, image_size: 56, "
                 "num_distractors: 1, box_size: 20, system_prompt: null}",
                 "rollout.max_new_tokens=6"]
    p = _torchrun("-m", "mmopd", "train", CONFIG, *args, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert SHARDED in p.stdout
    rows = _rows(tmp_path / "run")  # tiny_overrides' output_dir
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    if world == "turns":
        assert max(r["turns"] for r in rows) > 1
        assert "teacher sharded with FSDP2" in p.stdout


@pytest.mark.parametrize("extra, match", [
    (["teacher.kind=ema", "teacher.view=privileged"], "teacher.kind=ema"),
    (["warmup.steps=2"], "warmup.steps"),
    (["model.lora={r: 4}"], "model.lora"),
])
def test_what_cannot_run_sharded_is_refused_before_loading(extra, match, tiny_overrides):
    from mmopd.config import ConfigError, TrainConfig, load_config
    from mmopd.training.sharding import check_sharded_run

    check_sharded_run(load_config(TrainConfig, None, tiny_overrides))
    with pytest.raises(ConfigError, match=f"FSDP.*{match}"):
        check_sharded_run(load_config(TrainConfig, None, tiny_overrides + extra))


def test_resume_under_another_launch_is_refused(tmp_path):
    """A checkpoint resumes only under the launch that wrote it: the same number of processes,
    and sharded optimiser state only into a sharded student (and the other way round)."""
    from mmopd.training.checkpoint import CheckpointError, check_resumable

    check_resumable({}, tmp_path, 4, False)  # written before the world size was recorded
    check_resumable({"world_size": 2}, tmp_path, 2, False)
    with pytest.raises(CheckpointError, match="written by 2 processes, this launch has 4"):
        check_resumable({"world_size": 2}, tmp_path, 4, False)
    with pytest.raises(CheckpointError, match="not sharded .* this launch shards it"):
        check_resumable({"world_size": 2}, tmp_path, 2, True)
    (tmp_path / "optimizer").mkdir()
    with pytest.raises(CheckpointError, match="sharded \\(FSDP2\\) student, this launch does not"):
        check_resumable({"world_size": 2}, tmp_path, 2, False)
    check_resumable({"world_size": 2}, tmp_path, 2, True)


def test_teacher_shard_is_checked(tiny_overrides):
    """teacher.shard: an in-process teacher of the student's tokenizer, one teacher, and a
    sharded student beside it."""
    from mmopd.config import ConfigError, TrainConfig, load_config
    from mmopd.training.loop import train

    with pytest.raises(ConfigError, match="teacher.shard.*not kind=served"):
        load_config(TrainConfig, None, tiny_overrides + [
            "teacher.kind=served", "teacher.served.url=http://x:1", "teacher.shard=true"])
    with pytest.raises(ConfigError, match="routed teachers are not sharded"):
        load_config(TrainConfig, None, [o for o in tiny_overrides if "teacher." not in o] + [
            "teachers=[{name: a, model: {path: t}, shard: true}, {name: b, kind: self, "
            "view: privileged}]", "routing={default: a}"])
    with pytest.raises(ConfigError, match="launch with FSDP2"):
        train(load_config(TrainConfig, None, tiny_overrides + ["teacher.shard=true"]))


def test_sft_refuses_a_sharded_launch(monkeypatch, tmp_path):
    """`mmopd sft` saves and evaluates unsharded on every rank: an FSDP2 launch is refused."""
    from mmopd.config import ConfigError, SFTConfig, load_config
    from mmopd.training import sft as sft_module

    class Sharded:
        is_fsdp2 = True

    monkeypatch.setattr(sft_module, "make_accelerator", lambda: Sharded())
    cfg = load_config(SFTConfig, str(HERE.parent / "configs" / "tiny" / "student_sft.yaml"),
                      [f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="FSDP2 sharding is for mmopd train"):
        sft_module.sft(cfg)


def test_sigterm_to_the_whole_launch_stops_every_rank_at_a_checkpoint(tiny_overrides, tmp_path):
    """A scheduler's SIGTERM to the process group, which torchrun also forwards to its ranks a
    moment later: every rank stops at the same step boundary, the sharded checkpoint is
    written, and `trainer.resume=auto` finishes the run."""
    from mmopd.training.checkpoint import list_checkpoints

    common = [*tiny_overrides, "trainer.steps=6", "rollout.minibatches=1",
              "eval.num_problems=2", "eval.pass_k=0"]
    run = tmp_path / "run"  # tiny_overrides' output_dir
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **FSDP_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "mmopd", "train", CONFIG, *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=HERE.parent, start_new_session=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=240)  # torchrun itself exits 1 on the signal
    stops = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"run_dir"')]
    assert [s.get("stopped") for s in stops] == ["SIGTERM", "SIGTERM"], err[-3000:]
    step = stops[0]["step"]
    assert stops[1]["step"] == step < 6
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step-{step}"
    p = _torchrun("-m", "mmopd", "train", CONFIG, *common, "trainer.resume=auto", env=FSDP_ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _rows(run)] == list(range(1, 7))
