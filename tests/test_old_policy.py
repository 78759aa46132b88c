"""Where log pi_old comes from (mmopd.training.old_policy): with one optimiser step per rollout
batch (rho = 1) the training forward gives it, and the plans made on each micro-batch from its
log-probs give the same gradients, plans and metrics as the separate student scoring pass,
which they skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmopd.training.loop as loop
from mmopd.config import TrainConfig, load_config
from mmopd.objectives import OBJECTIVES, make_plan, reward_weights
from mmopd.training.old_policy import before_loss, has_dropout, replanner

SCORE_BATCH = loop.score_batch
COMPARED = ("loss", "grad_norm", "kept_frac", "floor_frac", "distill_reward", "kl_estimate",
            "student_entropy", "ratio_mean", "diag/topk_overlap", "diag/kl",
            "diag/entropy_gap", "rollout/logprob_gap", "env_reward")


def _train(overrides: list[str], monkeypatch) -> tuple[list[dict], dict, list[bool]]:
    """Metrics rows, final weights, and per rollout batch whether the student pass ran."""
    passes: list[bool] = []
    real = SCORE_BATCH

    def spy(episodes, old_scorer, *a, **k):
        passes.append(old_scorer is not None)
        return real(episodes, old_scorer, *a, **k)

    monkeypatch.setattr(loop, "score_batch", spy)
    res = loop.train(load_config(TrainConfig, None, overrides))
    run = Path(res["run_dir"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints" / f"step-{res['step']}" / "model.safetensors")
    return rows, weights, passes


@pytest.mark.parametrize("extra, in_forward", [
    (["objective.name=opd"], [True, True, True]),
    (["objective.name=reopold", "objective.switch_step=2", "TEACHER"],
     [True, True, False]),  # refinement (step 2 on) ranks the batch's entropy: the pass runs
    (["objective.name=gopd", "objective.reward_scale=1.5"], [True, True, True]),
    (["objective.name=opd", "objective.outcome_coef=0.5"], [True, True, True]),
    # divergence objectives read no log pi_old in their plans: only their metrics do
    (["objective.name=rkl"], [True, True, True]),
    (["objective.name=jsd", "objective.topk=5", "objective.topk_source=teacher"],
     [True, True, True]),
    (["objective.name=uld", "objective.topk=5"], [True, True, True]),
])
def test_training_forward_gives_the_separate_pass_results(extra, in_forward, tiny_overrides,
                                                          sft_teacher_dir, tmp_path, monkeypatch):
    # TEACHER: a trained teacher, so that REOPOLD's floor drops some of the student's tokens
    extra = [f"teacher.model.path={sft_teacher_dir}" if x == "TEACHER" else x for x in extra]
    common = [*tiny_overrides, "rollout.minibatches=1", "trainer.steps=3",
              "trainer.micro_batch_size=3", "trainer.diagnostics_tokens=16", *extra]
    one, w_one, p_one = _train([*common, f"trainer.output_dir={tmp_path / 'one'}"], monkeypatch)
    two, w_two, p_two = _train([*common, f"trainer.output_dir={tmp_path / 'two'}",
                                "trainer.old_from_forward=false"], monkeypatch)
    assert p_two == [True] * 3
    assert p_one == [not x for x in in_forward]
    for a, b in zip(one, two, strict=True):
        for key in COMPARED:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    if "TEACHER" in str(extra) or any("sft" in x for x in extra):
        assert 0 < one[0]["floor_frac"] and one[0]["kept_frac"] < 1
    moved = max(float((w_two[k] - w_one[k]).abs().max()) for k in w_two)
    assert moved < 1e-5


@pytest.mark.parametrize("normaliser", ["query", "batch"])
def test_reopold_exploration_drops_tokens_inside_the_loss(normaliser, tiny_overrides,
                                                          sft_teacher_dir):
    """The kept tokens depend on log pi_old: planned from the training forward, the gradients
    equal the separate pass's plan for 1, 3 and 8 sequences per micro-batch, under either
    normaliser (the per-query one keeps each query's responses in one micro-batch; the batch
    one divides after the last micro-batch)."""
    from mmopd.envs import make_env
    from mmopd.logprobs import lm_head_fn
    from mmopd.models import load_model, load_tokenizer
    from mmopd.rollout.agent_loop import collect_episodes
    from mmopd.rollout.render import ChatRenderer
    from mmopd.rollout.sampler import HFSampler, SamplingParams
    from mmopd.teachers.scorer import HFScorer
    from mmopd.training.losses import Heads, accumulate_gradients
    from mmopd.training.optim import make_accelerator
    from mmopd.training.scoring import score_batch

    # a trained teacher: the random student's tokens often fall below the floor
    cfg = load_config(TrainConfig, None, [*tiny_overrides, "objective.name=reopold",
                                          f"objective.normaliser={normaliser}",
                                          f"teacher.model.path={sft_teacher_dir}"])
    obj = OBJECTIVES["reopold"]
    tok = load_tokenizer(cfg.model)
    student, teacher = load_model(cfg.model, tok), load_model(cfg.teacher.model, tok)
    torch.manual_seed(0)
    eps = collect_episodes([make_env(cfg.env.id, level=1) for _ in range(8)],
                           [{"seed": i} for i in range(4)], HFSampler(student, tok),
                           ChatRenderer(tok), SamplingParams(n=2, max_new_tokens=8))
    heads = Heads(lm_head_fn(student), lm_head_fn(student), lm_head_fn(teacher))
    t_scorer = HFScorer(teacher, tok.pad_token_id)
    tb, teach, slices, _ = score_batch(eps, HFScorer(student, tok.pad_token_id), t_scorer)
    tb = reward_weights(tb, cfg.objective)[0]
    plan = make_plan(obj, tb, 0, 10, cfg.objective)
    assert 0 < int(plan.keep_N.sum()) < len(plan.keep_N)  # the floor drops some tokens
    blank, _, _, _ = score_batch(eps, None, t_scorer)
    assert blank.logp_old_N.isnan().all()
    blank = reward_weights(blank, cfg.objective)[0]
    grads = {}
    for mode, micro in (("plan", 3), ("inside", 1), ("inside", 3), ("inside", 8)):
        cfg.trainer.micro_batch_size = micro
        student.zero_grad()
        inside = mode == "inside"
        out = accumulate_gradients(student, make_accelerator(), eps, slices,
                                   blank if inside else tb, None if inside else plan, teach,
                                   obj, cfg, heads, tok.pad_token_id,
                                   replan=replanner(obj, blank, 0, 10, cfg) if inside else None,
                                   old_from_forward=inside)
        grads[mode, micro] = {k: p.grad.clone() for k, p in student.named_parameters()}
        if inside:  # the training forward's log pi_old is the scoring pass's
            assert torch.allclose(out.scores["logp"], tb.logp_old_N, atol=1e-5)
            assert torch.allclose(out.scores["entropy"], tb.entropy_N, atol=1e-4)
            assert out.ratio_sum == int(plan.keep_N.sum()) == out.kept
    ref = grads["plan", 3]
    assert any(v.abs().sum() > 0 for v in ref.values())
    for key, g in grads.items():
        for k in g:
            assert torch.allclose(g[k], ref[k], atol=1e-6, rtol=1e-4), (key, k)


def test_where_the_plan_needs_the_whole_batch(tiny_overrides):
    def why(name, it=0, **extra):
        cfg = load_config(TrainConfig, None, [*tiny_overrides, "trainer.steps=9",
                                              "rollout.minibatches=1", f"objective.name={name}",
                                              *[f"objective.{k}={v}" for k, v in extra.items()]])
        return before_loss(OBJECTIVES[name], it, 9, cfg)

    assert why("rkl", 5) is None
    assert why("reopold", 2) is None  # switches at a third of the rollout iterations
    assert "ranks the batch's student entropy" in why("reopold", 3)
    for name, extra, reason in [
        ("opd", {"step_weighting": "sod"}, "turn"),
        ("opd", {"token_selection": "entropy"}, "ranks"),
        ("vopd", {}, "whole distribution"),
        ("rkl", {"token_selection": "tip"}, "ranks"),
    ]:
        assert reason in why(name, **extra)


def test_dropout_keeps_the_separate_pass(student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    assert not has_dropout(model)
    model.config.attention_dropout = 0.1
    assert has_dropout(model)
    model.config.attention_dropout = 0.0
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.05))
    assert has_dropout(model)


def test_a_plan_not_declared_token_local(tiny_overrides, tmp_path, monkeypatch):
    """A registered plan that does not say it is token-local is made on the whole batch only:
    the separate pass runs for it, and a reward at the current policy is refused."""
    from mmopd.config import ConfigError
    from mmopd.objectives import Objective, register_objective

    register_objective(Objective("whole_opd", "pg", OBJECTIVES["opd"].plan))
    try:
        with pytest.raises(ConfigError, match="token-local"):
            load_config(TrainConfig, None, [*tiny_overrides, "objective.name=whole_opd",
                                            "objective.reward_at=current"])
        _, _, passes = _train([*tiny_overrides, "objective.name=whole_opd",
                               "rollout.minibatches=1", "trainer.steps=1",
                               f"trainer.output_dir={tmp_path / 'run'}"], monkeypatch)
        assert passes == [True]
    finally:
        OBJECTIVES.pop("whole_opd")
