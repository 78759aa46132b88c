"""Faults injected for real into tiny runs: NaN / -inf teacher scores and a NaN gradient (steps
skipped, then a clean stop), a full disk and truncated checkpoints (nothing lost, resume takes the
newest complete one), envs that hang or raise (failed episodes, the batch goes on), SIGTERM (a
checkpoint and exit 0, then resume), and bit-identical reruns by seed. The served teacher that
dies mid-run is in test_served_teacher.py (it needs a real vLLM server)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import _faulty
import pytest
import torch

from mmopd.config import TrainConfig, load_config
from mmopd.rollout.timeout import CallTimeout, time_limit
from mmopd.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_state,
    resolve_resume,
    save_checkpoint,
)
from mmopd.training.faults import NonFiniteError, StopSignals
from mmopd.training.loop import train

TINY_CONFIG = Path(__file__).parent.parent / "configs" / "tiny" / "reopold.yaml"


def _cfg(overrides, extra=()) -> TrainConfig:
    return load_config(TrainConfig, None, list(overrides) + list(extra))


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _adam_steps(ckpt: Path) -> int:
    """Optimiser updates the checkpoint's AdamW state has seen."""
    state = load_state(ckpt)["optimizer"]["state"]
    return int(next(iter(state.values()))["step"])


FAULTY_TEACHER = ["teacher.kind=custom", "teacher.factory=_faulty:make_faulty_teacher",
                  "objective.name=opd", "eval.pass_k=0"]


# ------------------------------------------------------------------------- non-finite values


def test_nan_teacher_score_skips_its_minibatch_and_inf_is_floored(tiny_overrides, tmp_path,
                                                                   monkeypatch):
    """Rollout batch 1 (steps 3-4): NaN on one token -> the minibatch holding it is skipped;
    batch 2 (steps 5-6): -inf on one token -> floored and counted, nothing skipped."""
    monkeypatch.setattr(_faulty, "TEACHER_PLAN", {1: "nan_one", 2: "neginf_one"})
    res = train(_cfg(tiny_overrides, FAULTY_TEACHER + [
        "trainer.steps=8", "optim.warmup_steps=100", f"trainer.output_dir={tmp_path}"]))
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["step"] in (3, 4)
    assert skipped[0]["nonfinite/teacher_logp"] == 1 and "loss" not in skipped[0]
    s = skipped[0]["step"]
    # the scheduler did not advance (linear warm-up: lr grows by one notch per update)
    lr = {r["step"]: r["lr"] for r in rows}
    assert lr[s] == lr[s - 1] and lr[s + 1] > lr[s]
    assert all(r["skipped_steps"] == (r["step"] >= s) for r in rows)
    assert [r["teacher_logp_floored"] for r in rows] == [0, 0, 0, 0, 1, 1, 0, 0]
    good = [r for r in rows if not r.get("skipped")]
    assert all(r["loss"] is not None and abs(r["loss"]) < 1e3 for r in good)
    assert _adam_steps(Path(res["run_dir"]) / "checkpoints" / "step-8") == 7


def test_nan_in_a_row_stops_with_the_last_good_checkpoint(tiny_overrides, tmp_path,
                                                          monkeypatch):
    monkeypatch.setattr(_faulty, "TEACHER_PLAN", {i: "nan_all" for i in range(1, 10)})
    with pytest.raises(NonFiniteError) as e:
        train(_cfg(tiny_overrides, FAULTY_TEACHER + [
            "trainer.steps=10", "trainer.save_every=2", "trainer.max_skipped_steps=3",
            f"trainer.output_dir={tmp_path}"]))
    msg = str(e.value)
    assert "3 optimiser steps in a row" in msg and "step 5: teacher_logp" in msg
    assert "weights are those after step 2" in msg and "newest checkpoint is" in msg
    # step-4 was saved after two skipped steps: the weights (and optimiser) of step 2
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-2", "step-4"]
    assert [_adam_steps(c) for c in ckpts] == [2, 2]
    assert f"newest checkpoint is {ckpts[-1]}" in msg
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_nan_gradient_is_skipped(tiny_overrides, tmp_path, monkeypatch):
    """A NaN written into one gradient after the backward of step 3: no update at step 3."""
    import mmopd.training.loop as loop

    real, calls = loop.accumulate_gradients, []

    def poisoned(student, *args, **kwargs):
        out = real(student, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            next(p for p in student.parameters() if p.grad is not None).grad[0] = float("nan")
        return out

    monkeypatch.setattr(loop, "accumulate_gradients", poisoned)
    res = train(_cfg(tiny_overrides, ["trainer.steps=4", f"trainer.output_dir={tmp_path}"]))
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r.get("skipped", 0) for r in rows] == [0, 0, 1, 0]
    assert rows[2]["nonfinite/grad_norm"] == 1 and "nonfinite/loss" not in rows[2]
    assert math.isfinite(rows[2]["loss"]) and rows[2]["grad_norm"] is None  # NaN -> null
    assert _adam_steps(Path(res["run_dir"]) / "checkpoints" / "step-4") == 3


# ------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny_model(student_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(student_dir),
            AutoTokenizer.from_pretrained(student_dir))


def _save(root, step, tiny_model, keep_last=5):
    model, tok = tiny_model
    return save_checkpoint(root, step, model, tok, {"note": step}, keep_last)


def test_full_disk_leaves_the_previous_checkpoint_intact(student_dir, tmp_path):
    """RLIMIT_FSIZE below the model file's size while step-2 is written: a clear error, no
    temporary directory left, step-1 still complete (keep_last=1 does not prune it)."""
    script = textwrap.dedent(f"""
        import json, resource, signal, sys
        from pathlib import Path
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from mmopd.training.checkpoint import CheckpointError, save_checkpoint
        model = AutoModelForCausalLM.from_pretrained({str(student_dir)!r})
        tok = AutoTokenizer.from_pretrained({str(student_dir)!r})
        root = Path({str(tmp_path)!r})
        save_checkpoint(root, 1, model, tok, {{}}, keep_last=1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
        try:
            save_checkpoint(root, 2, model, tok, {{}}, keep_last=1)
        except CheckpointError as e:
            print(json.dumps({{"error": str(e)}}))
            sys.exit(0)
        sys.exit("step-2 was written under a 16 KiB file-size limit")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    err = json.loads(p.stdout.strip().splitlines()[-1])["error"]
    assert "could not write checkpoint step-2" in err and "File too large" in err
    assert f"newest complete checkpoint is {tmp_path / 'step-1'}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    assert list_checkpoints(tmp_path) == [tmp_path / "step-1"]


def test_resume_passes_over_truncated_and_unlisted_checkpoints(tiny_model, tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, tiny_model)
    weights = tmp_path / "step-3" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.warns(UserWarning, match="step-3 skipped: model.safetensors is truncated"):
        assert resolve_resume("auto", tmp_path) == tmp_path / "step-2"
    (tmp_path / "step-2" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="step-2 skipped: no manifest.json"):
        assert resolve_resume("auto", tmp_path) == tmp_path / "step-1"
    with pytest.raises(CheckpointError, match="not a complete checkpoint: model.safetensors"):
        resolve_resume(str(tmp_path / "step-3"), tmp_path)
    # pruning counts complete checkpoints only: keep_last=1 keeps the new one, the incomplete
    # ones are left for the user to inspect
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _save(tmp_path, 4, tiny_model, keep_last=1)
        assert list_checkpoints(tmp_path) == [tmp_path / "step-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3", "step-4"]
    # the same step saved again replaces it whole
    _save(tmp_path, 4, tiny_model, keep_last=1)
    assert load_state(tmp_path / "step-4")["note"] == 4


def test_a_line_cut_short_in_metrics_does_not_break_resume(tmp_path):
    from mmopd.training.metrics import JsonlLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    log = JsonlLog(path, resume_step=2)
    assert [r["step"] for r in log.rows()] == [1, 2]


# ------------------------------------------------------------------------- envs


def test_time_limit_interrupts_python_and_blocking_calls_without_threads():
    before = threading.active_count()
    t0 = time.monotonic()
    with pytest.raises(CallTimeout, match="spin did not return within 0.2s"):
        with time_limit(0.2, "spin"):
            while True:
                pass
    with pytest.raises(CallTimeout):
        with time_limit(0.2, "sleep"):
            time.sleep(30)
    assert time.monotonic() - t0 < 2
    assert threading.active_count() == before
    with time_limit(0.5, "quick"):
        pass
    time.sleep(0.7)  # the disarmed timer never fires
    # an outer timer keeps running around an inner bound
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        with time_limit(0.2, "inner"):
            pass
        time.sleep(1.0)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_hanging_and_raising_envs_fail_their_episodes_and_the_run_goes_on(tiny_overrides,
                                                                         tmp_path):
    """Of every 8 episodes one reset hangs (30 s), one raises and one step spins forever; with
    env_timeout_s=0.5 each batch loses those three episodes and training continues."""
    t0 = time.monotonic()
    train(_cfg(tiny_overrides, [
        "env.id=faulty/FlakyMath-v0", "env.imports=[_faulty]", "rollout.env_timeout_s=0.5",
        "trainer.steps=4", "eval.num_problems=2", "eval.pass_k=0",
        f"trainer.output_dir={tmp_path}"]))
    assert time.monotonic() - t0 < 60
    rows = _rows(tmp_path / "metrics.jsonl")
    assert len(rows) == 4
    for r in rows:  # 8 episodes per batch: 2 failed to start, 1 of the 6 others timed out
        assert r["failed_episodes"] == 2 and r["env_timeouts"] == 2
        assert r["stop_env_timeout_frac"] == pytest.approx(1 / 6)


def test_every_rollout_batch_takes_its_minibatches_when_episodes_fail_to_start(tiny_overrides,
                                                                             tmp_path):
    """8 episodes per batch, 2 fail to start, 4 minibatches: still 4 optimiser steps per batch
    (6 episodes do not chunk into 4 pieces of equal size: torch.chunk gave 3, and a rank with
    failed episodes would have taken fewer steps than the others and hung them). Minibatches
    hold whole queries, their counts differing by at most one."""
    from mmopd.training.loop import minibatches

    gen = torch.Generator().manual_seed(0)
    for groups in ([0, 0, 1, 1, 2, 3], [0, 0, 1, 1, 2, 2, 3, 3], [5, 7, 7], [2], [1] * 4):
        parts = minibatches(groups, 4, gen)
        assert len(parts) == 4 and sorted(i for p in parts for i in p) == list(range(len(groups)))
        queries = [{groups[i] for i in p} for p in parts]
        assert max(map(len, queries)) - min(map(len, queries)) <= 1
        for part, qs in zip(parts, queries):
            assert sorted(part) == [i for i, g in enumerate(groups) if g in qs]
    train(_cfg(tiny_overrides, [
        "env.id=faulty/FlakyMath-v0", "env.imports=[_faulty]", "rollout.env_timeout_s=0.5",
        "rollout.minibatches=4", "trainer.steps=8",
        "eval.num_problems=2", "eval.pass_k=0", f"trainer.output_dir={tmp_path}"]))
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["failed_episodes"] == 2 for r in rows)


# ------------------------------------------------------------------------- preemption


def test_stop_signals_first_asks_then_interrupts():
    """A second signal stops at once, unless it comes within a second of the first: then it is
    the launcher's forwarded copy of the one being handled (torchrun forwards SIGTERM to ranks
    that the scheduler signalled already)."""
    before = signal.getsignal(signal.SIGINT)  # pytest-xdist workers ignore SIGINT
    with StopSignals(echo_s=0.5) as s:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert s.received == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)  # an echo: still a graceful stop
        time.sleep(0.5)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_checkpoints_exits_zero_and_resume_continues(tiny_overrides, tmp_path):
    common = [*tiny_overrides, "trainer.steps=16", "eval.pass_k=0", "eval.num_problems=2"]
    run = tmp_path / "preempted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmopd", "train", str(TINY_CONFIG), *common,
         f"trainer.output_dir={run}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stopped"] == "SIGTERM", "the run ended before the signal arrived"
    step = stopped["step"]
    assert 2 <= step < 16 and step % 2 == 0  # a rollout-batch boundary (2 minibatches)
    assert f"stopped by SIGTERM at step {step}" in err and "trainer.resume=auto" in err
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step-{step}"
    def cfg(out, *extra):
        return load_config(TrainConfig, TINY_CONFIG, [*common, f"trainer.output_dir={out}",
                                                       *extra])

    train(cfg(run, "trainer.resume=auto"))
    full = tmp_path / "full"
    train(cfg(full))
    a, b = _rows(full / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 17))
    for ra, rb in zip(a, b):
        for key in ("loss", "env_reward", "distill_reward", "kept_frac"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


# ------------------------------------------------------------------------- reproducibility


def test_same_seed_gives_bit_identical_metrics(tiny_overrides, tmp_path):
    runs = []
    for name in ("a", "b"):
        train(_cfg(tiny_overrides, ["trainer.steps=4", f"trainer.output_dir={tmp_path / name}"]))
        rows = _rows(tmp_path / name / "metrics.jsonl")
        runs.append([{k: v for k, v in r.items() if "time" not in k and "_per_s" not in k}
                     for r in rows])
    assert runs[0] == runs[1]
    train(_cfg(tiny_overrides, ["trainer.steps=4", "trainer.seed=1",
                                f"trainer.output_dir={tmp_path / 'c'}"]))
    assert [r["loss"] for r in _rows(tmp_path / "c" / "metrics.jsonl")] != \
        [r["loss"] for r in runs[0]]
