"""The objective zoo in the trainer: G-OPD / ExOPD, vOPD, EOPD, AOPD, TIP and entropy token
selection, drift control, per-batch teacher-student diagnostics and the template check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmopd.config import ConfigError, TrainConfig, load_config
from mmopd.models import ModelLoadError
from mmopd.objectives import OBJECTIVES, TokenBatch, make_plan
from mmopd.training.loop import train


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _tb(n: int = 6) -> TokenBatch:
    g = torch.Generator().manual_seed(0)
    return TokenBatch(
        episode_N=torch.tensor([0, 0, 0, 1, 1, 1][:n]), logp_old_N=-torch.rand(n, generator=g),
        logp_teacher_N=-torch.rand(n, generator=g), entropy_N=torch.arange(n, dtype=torch.float),
        reward_E=torch.zeros(2), group_E=torch.zeros(2, dtype=torch.long),
        logp_ref_N=-torch.rand(n, generator=g), kl_N=torch.tensor([0.0, 5, 0, 0, 0, 1])[:n],
        overlap_N=torch.tensor([1.0, 0.1, 0.1, 0.9, 0.1, 0.9])[:n],
        teacher_entropy_N=torch.tensor([0.1, 0.9, 2.0, 0.5, 0.81, 0.8])[:n])


def _cfg(**kw):
    return load_config(TrainConfig, None, ["model.path=x", "teacher.model.path=y"]
                       + [f"objective.{k}={v}" for k, v in kw.items()]).objective


def test_gopd_with_scale_one_is_opd_and_exopd_extrapolates():
    tb = _tb()
    opd = make_plan(OBJECTIVES["opd"], tb, 0, 10, _cfg(name="opd"))
    g1 = make_plan(OBJECTIVES["gopd"], tb, 0, 10, _cfg(name="gopd"))
    torch.testing.assert_close(g1.advantage_N, opd.advantage_N)
    ex = make_plan(OBJECTIVES["exopd"], tb, 0, 10, _cfg(name="exopd"))
    expect = 1.25 * (tb.logp_teacher_N - tb.logp_ref_N) - (tb.logp_old_N - tb.logp_ref_N)
    torch.testing.assert_close(ex.advantage_N, expect)
    assert ex.metrics["reward_scale"] == 1.25
    g2 = make_plan(OBJECTIVES["gopd"], tb, 0, 10, _cfg(name="gopd", reward_scale=2.0))
    assert g2.metrics["reward_scale"] == 2.0
    with pytest.raises(ConfigError, match="reward_scale"):
        _cfg(name="opd", reward_scale=2.0)


def test_vopd_eopd_aopd_plans():
    tb = _tb()
    v = make_plan(OBJECTIVES["vopd"], tb, 0, 10, _cfg(name="vopd"))
    torch.testing.assert_close(v.advantage_N, tb.logp_teacher_N - tb.logp_old_N + tb.kl_N)
    e = make_plan(OBJECTIVES["eopd"], tb, 0, 10, _cfg(name="eopd", eopd_coef=0.5))
    assert e.aux_N.tolist() == [0.0, 0.5, 0.5, 0.0, 0.5, 0.0]  # teacher entropy > 0.8
    assert e.keep_N.all() and e.counted_N.all()
    a = make_plan(OBJECTIVES["aopd"], tb, 0, 10, _cfg(name="aopd"))
    pos = (tb.logp_teacher_N - tb.logp_old_N) > 0
    assert a.keep_N.tolist() == pos.tolist() and (a.aux_N > 0).tolist() == (~pos).tolist()


def test_token_selection_and_drift_compose_with_any_objective():
    tb = _tb()
    tip = make_plan(OBJECTIVES["opd"], tb, 0, 10, _cfg(name="opd", token_selection="tip",
                                                        select_rho=0.5))
    # entropy 0..5 normalised, kl (0,5,0,0,0,1) normalised: soft OR keeps tokens 1, 4 and 5
    assert tip.keep_N.tolist() == [False, True, False, False, True, True]
    ent = make_plan(OBJECTIVES["rkl"], tb, 0, 10, _cfg(name="rkl", token_selection="entropy",
                                                        select_rho=0.3))
    assert ent.keep_N.tolist() == [False, False, False, False, True, True]  # ceil(0.3 * 6)
    drift = make_plan(OBJECTIVES["opd"], tb, 0, 10, _cfg(name="opd", drift_threshold=0.5,
                                                          drift_patience=2, drift_weight=0.25))
    # episode 0: overlap 1, .1, .1 -> drift from its 2nd token; episode 1: .9 .1 .9 -> none
    r = tb.logp_teacher_N - tb.logp_old_N
    torch.testing.assert_close(drift.advantage_N, r * torch.tensor([1, .25, .25, 1, 1, 1]))
    assert drift.metrics["drift/episodes_frac"] == 0.5 and drift.metrics["drift/start_mean"] == 1


@pytest.mark.parametrize("extra", [
    ["objective.name=exopd"],
    ["objective.name=vopd", "objective.token_selection=tip"],
    ["objective.name=eopd", "objective.eopd_tau=0.0"],
    ["objective.name=aopd", "objective.aopd_divergence=jsd"],
    ["objective.name=reopold", "objective.token_selection=entropy"],
    ["objective.name=opd", "objective.drift_threshold=0.9", "objective.drift_patience=2",
     "objective.drift_weight=0.5"],
])
def test_zoo_options_train_two_steps_with_diagnostics(extra, tiny_overrides):
    res = train(load_config(TrainConfig, None, tiny_overrides + extra))
    rows = _rows(Path(res["run_dir"]))
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    for r in rows:
        assert 0 <= r["diag/topk_overlap"] <= 1 and 0 <= r["diag/teacher_mass_on_student_topk"] <= 1
        assert r["diag/kl"] >= 0 and "diag/entropy_gap" in r
    if "objective.drift_threshold=0.9" in extra:
        assert all("drift/episodes_frac" in r for r in rows)


def test_teacher_with_another_chat_template_is_refused(tiny_overrides, teacher_dir, tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(teacher_dir, other)
    tpl = other / "chat_template.jinja"
    tpl.write_text("{{ 'You are a teacher.\\n' }}" + tpl.read_text())
    overrides = [o for o in tiny_overrides if not o.startswith("teacher.model.path")]
    cfg = load_config(TrainConfig, None, overrides + [f"teacher.model.path={other}"])
    with pytest.raises(ModelLoadError, match="renders the same conversation differently"):
        train(cfg)
    cfg = load_config(TrainConfig, None, overrides + [f"teacher.model.path={other}",
                                                      "teacher.check_template=false"])
    assert train(cfg)["step"] == 2


def test_prefix_opd_samples_and_trains_only_a_growing_prefix(tiny_overrides):
    from mmopd.config import RolloutConfig
    from mmopd.training.loop import prefix_len

    r = RolloutConfig(max_new_tokens=32, prefix_tokens=4, prefix_growth=2.5)
    assert [prefix_len(r, s) for s in (0, 1, 2, 10, 100)] == [4, 6, 9, 29, 32]
    assert prefix_len(RolloutConfig(max_new_tokens=32), 7) == 32
    res = train(load_config(TrainConfig, None, tiny_overrides + [
        "rollout.max_new_tokens=8", "rollout.prefix_tokens=2", "rollout.prefix_growth=2",
        "rollout.minibatches=1", "objective.name=opd"]))
    rows = _rows(Path(res["run_dir"]))
    assert [r["prefix_len"] for r in rows] == [2, 4]
    assert all(r["response_tokens"] <= r["prefix_len"] for r in rows)
    # FLOPs are cumulative and grow with the tokens of each batch
    assert 0 < rows[0]["flops_rollout"] < rows[1]["flops_rollout"]
    assert rows[0]["flops_train"] > rows[0]["flops_rollout"]


@pytest.mark.parametrize("kind", ["sft", "fkl"])
def test_off_policy_warmup_runs_before_distillation(kind, tiny_overrides, sft_teacher_dir):
    overrides = [o for o in tiny_overrides if not o.startswith("teacher.model.path")]
    res = train(load_config(TrainConfig, None, overrides + [
        f"teacher.model.path={sft_teacher_dir}", "warmup.steps=3", f"warmup.kind={kind}",
        "warmup.prompts_per_batch=4", "rollout.max_new_tokens=16"]))
    rows = _rows(Path(res["run_dir"]))
    warm = [r for r in rows if "warmup_step" in r]
    assert [r["warmup_step"] for r in warm] == [1, 2, 3] and rows[:3] == warm
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in warm)
    assert [r["step"] for r in rows[3:]] == [1, 2]
    assert (Path(res["run_dir"]) / "curves.png").is_file()
    with pytest.raises(ConfigError, match="warmup.steps"):
        load_config(TrainConfig, None, overrides + ["teacher.kind=self", "teacher.view=privileged",
                                                    "warmup.steps=1"])


def test_lightning_cache_trains_without_a_live_teacher(tiny_overrides, tmp_path):
    from mmopd.teachers.cache import CacheError, TeacherCache, build_teacher_cache

    cfg = load_config(TrainConfig, None, tiny_overrides + ["teacher.topk=4"])
    path = build_teacher_cache(cfg, tmp_path / "cache", num_batches=2)
    cache = TeacherCache.load(path.parent)
    assert len(cache.episodes) == 2 * 4 * 2 and cache.topk == 4
    # the cached scores are the teacher's: rescore one episode with the live teacher
    from mmopd.models import load_model, load_tokenizer
    from mmopd.teachers.scorer import HFScorer

    tok = load_tokenizer(cfg.teacher.model)
    live = HFScorer(load_model(cfg.teacher.model, tok), tok.pad_token_id)
    ep = cache.episodes[3]
    torch.testing.assert_close(cache.score([ep]).logp_N, live.score([ep]).logp_N)
    # train from the cache: no teacher model is loaded, batches come from the cached episodes
    overrides = [o for o in tiny_overrides if not o.startswith("teacher.model.path")]
    res = train(load_config(TrainConfig, None, overrides + [
        "teacher.kind=cache", f"teacher.cache={tmp_path / 'cache'}", "objective.name=opd"]))
    rows = _rows(Path(res["run_dir"]))
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    assert "diag/kl" not in rows[0]
    res = train(load_config(TrainConfig, None, overrides + [
        "teacher.kind=cache", f"teacher.cache={tmp_path / 'cache'}", "objective.name=jsd",
        "objective.topk=4", "objective.topk_source=teacher",
        f"trainer.output_dir={tmp_path / 'run2'}"]))
    assert res["step"] == 2
    with pytest.raises(ConfigError, match="in-process teacher"):
        load_config(TrainConfig, None, overrides + ["teacher.kind=cache", "teacher.cache=x",
                                                    "objective.name=rkl"])
    with pytest.raises(CacheError, match="no teacher_cache.pt"):
        TeacherCache.load(tmp_path)
    with pytest.raises(CacheError, match="top-8"):
        cache.score([ep], topk=8)


def test_drift_stop_sampler_is_transparent_until_a_reply_drifts(student_dir, teacher_dir):
    from transformers import AutoModelForCausalLM

    from mmopd.config import ModelConfig
    from mmopd.episode import STOP_DRIFT
    from mmopd.logprobs import lm_head_fn
    from mmopd.models import load_tokenizer
    from mmopd.rollout.drift import DriftStopSampler
    from mmopd.rollout.sampler import HFSampler, SamplingParams

    tok = load_tokenizer(ModelConfig(path=str(student_dir)))
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    base = HFSampler(student, tok)
    prompts = [tok.encode("12+30="), tok.encode("7+5=")]
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)

    def wrap(threshold: float) -> DriftStopSampler:
        return DriftStopSampler(base, student, teacher, lm_head_fn(student), lm_head_fn(teacher),
                                tok.pad_token_id, threshold=threshold, patience=2, k=5, chunk=4)

    # nothing counts as low overlap: chunked sampling gives exactly the one-shot samples
    quiet = wrap(1e-9)
    for a, b in zip(quiet.generate(prompts, greedy), base.generate(prompts, greedy)):
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        assert [s.stop_reason for s in a] == [s.stop_reason for s in b]
    assert quiet.stopped == 0
    # every token is low (overlap < 1.01): each reply stops after its first chunk
    loud = wrap(1.01)
    for group in loud.generate(prompts, greedy):
        for s in group:
            assert s.stop_reason == STOP_DRIFT and len(s.token_ids) == 4
    assert loud.stopped == 4 and loud.tokens_saved == 4 * 8


def test_drift_stop_trains(tiny_overrides):
    """Top-50 sets of two random models never coincide: every reply drifts at its first check."""
    res = train(load_config(TrainConfig, None, tiny_overrides + [
        "objective.name=opd", "objective.drift_threshold=1.0", "objective.overlap_topk=50",
        "objective.drift_patience=2",
        "objective.drift_weight=0.5", "objective.drift_stop=true", "objective.drift_chunk=4"]))
    rows = _rows(Path(res["run_dir"]))
    # each reply drifted at its first check, unless it ended inside the first 4-token chunk
    first = rows[0]
    assert first["stop_drift_frac"] + first["stop_eos_frac"] == 1.0
    assert first["drift/stopped_samples"] == round(8 * first["stop_drift_frac"]) > 0
    assert all(r["response_tokens"] <= 4 for r in rows)
    with pytest.raises(ConfigError, match="drift_stop"):
        load_config(TrainConfig, None, tiny_overrides + ["objective.drift_stop=true"])
