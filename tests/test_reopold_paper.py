"""REOPOLD as its paper states it (arXiv 2603.11137, Eq. 4-5): the reward at the parameters
being updated, the kept tokens of each query as the normaliser, the switch counted in rollout
iterations, the PPO ratio clip, and the RKL baseline without stop-gradient; each checked against
a plain autograd computation of the paper's formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mmopd.config import ConfigError, ObjectiveConfig, TrainConfig, load_config
from mmopd.config.objective import Form
from mmopd.objectives import OBJECTIVES, make_plan, policy_loss_sum, reward_weights
from mmopd.objectives.zoo import top_threshold


@pytest.fixture
def batch(tiny_overrides, sft_teacher_dir):
    """A rollout batch of 4 queries x 2 responses scored at pi_old, then the student moved as
    one optimiser step would (so pi_theta != pi_old, and rho != 1)."""
    from mmopd.envs import make_env
    from mmopd.logprobs import lm_head_fn
    from mmopd.models import load_model, load_tokenizer
    from mmopd.rollout.agent_loop import collect_episodes
    from mmopd.rollout.render import ChatRenderer
    from mmopd.rollout.sampler import HFSampler, SamplingParams
    from mmopd.teachers.scorer import HFScorer
    from mmopd.training.losses import Heads
    from mmopd.training.scoring import score_batch

    cfg = load_config(TrainConfig, None, [*tiny_overrides,
                                          f"teacher.model.path={sft_teacher_dir}"])
    tok = load_tokenizer(cfg.model)
    student, teacher = load_model(cfg.model, tok), load_model(cfg.teacher.model, tok)
    torch.manual_seed(0)
    eps = collect_episodes([make_env(cfg.env.id, level=1) for _ in range(8)],
                           [{"seed": i} for i in range(4)], HFSampler(student, tok),
                           ChatRenderer(tok), SamplingParams(n=2, max_new_tokens=12))
    tb, teach, slices, _ = score_batch(eps, HFScorer(student, tok.pad_token_id),
                                       HFScorer(teacher, tok.pad_token_id))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(2.0 * p.std() * torch.randn_like(p))
    heads = Heads(lm_head_fn(student), lm_head_fn(student), lm_head_fn(teacher))
    return cfg, tok, student, eps, tb, teach, slices, heads


def _paper_loss(student, eps, tb, cfg: ObjectiveConfig, refine: bool) -> torch.Tensor:
    """Eq. 4 with Eq. 5 through autograd on whole logits: -(1/Q) sum_q (1/K_q)
    sum_{i,t in q} M_it min(rho R_hat, clip(rho) R_hat), R = log pi_T - log pi_theta."""
    logp = []
    for ep in eps:
        ids = torch.tensor([ep.input_ids])
        mask = torch.tensor(ep.loss_mask, dtype=torch.bool)
        out = torch.log_softmax(student(input_ids=ids).logits[0].float(), -1)
        pos = mask.nonzero().squeeze(-1)
        logp.append(out[pos - 1].gather(-1, ids[0, pos, None]).squeeze(-1))
    logp = torch.cat(logp)
    r = tb.logp_teacher_N - logp.detach()
    floor = math.log(cfg.lam) / (1 - cfg.lam)
    if refine:
        keep = tb.entropy_N >= top_threshold(tb.entropy_N, cfg.beta)
        r_hat = r.clamp(min=floor)
    else:
        keep, r_hat = r >= floor, r
    rho = torch.exp(logp - tb.logp_old_N)
    low, high = cfg.form.ratio_clip
    term = torch.minimum(rho * r_hat, rho.clamp(low, high) * r_hat) * keep
    query = tb.group_E[tb.episode_N]
    loss = 0.0
    groups = query.unique()
    for q in groups:
        at = query == q
        loss = loss - term[at].sum() / max(int(keep[at].sum()), 1)
    return loss / len(groups)


@pytest.mark.parametrize("refine", [False, True])
def test_reopold_loss_is_the_papers_eq4(batch, refine):
    """Two micro-batch sizes, both phases: the trainer's gradient is the autograd gradient of
    Eq. 4-5 taken at the moved student; with the reward of pi_old (mmopd's former form) it is
    not."""
    from mmopd.training.losses import accumulate_gradients
    from mmopd.training.old_policy import replanner
    from mmopd.training.optim import make_accelerator

    cfg, tok, student, eps, tb, teach, slices, heads = batch
    ocfg = cfg.objective
    assert ocfg.form == Form((0.8, 1.2), "current", "query")
    obj = OBJECTIVES["reopold"]
    it, total = (5, 6) if refine else (0, 6)
    tbw = reward_weights(tb, ocfg)[0]
    student.zero_grad()
    _paper_loss(student, eps, tb, ocfg, refine).backward()
    ref = {k: p.grad.clone() for k, p in student.named_parameters()}
    grads = {}
    for mode, micro in (("current", 1), ("current", 5), ("rollout", 5)):
        cfg.trainer.micro_batch_size = micro
        student.zero_grad()
        plan = make_plan(obj, tbw, it, total, ocfg)
        out = accumulate_gradients(
            student, make_accelerator(), eps, slices, tbw, plan, teach, obj, cfg, heads,
            tok.pad_token_id, replan=replanner(obj, tbw, it, total, cfg)
            if mode == "current" else None)
        grads[mode, micro] = {k: p.grad.clone() for k, p in student.named_parameters()}
        if mode == "current":
            assert out.clipped > 0  # the moved student's ratios reach the clip
    assert any(v.abs().sum() > 0 for v in ref.values())
    for key in (("current", 1), ("current", 5)):
        for k, g in grads[key].items():
            torch.testing.assert_close(g, ref[k], atol=1e-6, rtol=1e-4, msg=f"{key} {k}")
    off = max(float((grads["rollout", 5][k] - ref[k]).abs().max() / ref[k].abs().max())
              for k in ref if ref[k].abs().max() > 0)
    assert off > 1e-2  # R(pi_old) is another gradient: the test tells them apart


def test_batch_normaliser_divides_by_the_minibatchs_kept_tokens(batch):
    """objective.normaliser=batch: sum over kept tokens / their count over the minibatch."""
    from mmopd.training.losses import accumulate_gradients
    from mmopd.training.old_policy import replanner
    from mmopd.training.optim import make_accelerator

    cfg, tok, student, eps, tb, teach, slices, heads = batch
    cfg.objective.normaliser = "batch"
    obj = OBJECTIVES["reopold"]
    tbw = reward_weights(tb, cfg.objective)[0]
    student.zero_grad()
    out = accumulate_gradients(student, make_accelerator(), eps, slices, tbw,
                               make_plan(obj, tbw, 0, 6, cfg.objective), teach, obj, cfg, heads,
                               tok.pad_token_id, replan=replanner(obj, tbw, 0, 6, cfg))
    got = {k: p.grad.clone() for k, p in student.named_parameters()}
    # the same plan at the current policy, through the per-token formula
    student.zero_grad()
    logp = []
    for ep in eps:
        ids = torch.tensor([ep.input_ids])
        pos = torch.tensor(ep.loss_mask, dtype=torch.bool).nonzero().squeeze(-1)
        s = torch.log_softmax(student(input_ids=ids).logits[0].float(), -1)
        logp.append(s[pos - 1].gather(-1, ids[0, pos, None]).squeeze(-1))
    logp = torch.cat(logp)
    r = tb.logp_teacher_N - logp.detach()
    keep = r >= math.log(0.3) / 0.7
    (policy_loss_sum(logp, tb.logp_old_N, r, keep, (0.8, 1.2)) / keep.sum()).backward()
    assert out.kept == int(keep.sum())
    for k, p in student.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=1e-6, rtol=1e-4)


def test_rkl_without_stop_gradient():
    """token_rkl: L = -rho R(theta) with R's own gradient, d/dtheta = -(rho grad log pi) (R - 1)
    per token; opd's stop-gradient drops the -1."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    y, old, teacher = torch.randint(0, 5, (6,)), torch.randn(6) - 2, torch.randn(6) - 2
    lp = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    plain = -(torch.exp(lp - old) * (teacher - lp)).sum()
    (want,) = torch.autograd.grad(plain, logits)
    lp = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    got = policy_loss_sum(lp, old, teacher - lp.detach(), torch.ones(6), reward_grad=True)
    (have,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(have, want)
    lp = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    (sg,) = torch.autograd.grad(policy_loss_sum(lp, old, teacher - lp.detach(), torch.ones(6)),
                                logits)
    assert not torch.allclose(sg, want)
    assert not OBJECTIVES["token_rkl"].stop_gradient and OBJECTIVES["opd"].stop_gradient


def test_paper_form_by_default(tiny_overrides):
    def form(*extra):
        o = load_config(TrainConfig, None, [*tiny_overrides, *extra]).objective
        return o.form.ratio_clip, o.form.reward_at, o.form.normaliser

    assert form() == ((0.8, 1.2), "current", "query")  # reopold, the default objective
    assert form("objective.name=token_rkl") == ((0.8, 1.2), "current", "query")
    assert form("objective.name=opd") == (None, "rollout", "batch")
    assert form("objective.name=rkl") == (None, "rollout", "batch")
    assert form("objective.ratio_clip=null", "objective.reward_at=rollout",
                "objective.normaliser=batch") == (None, "rollout", "batch")


@pytest.mark.parametrize("override, match", [
    ("objective.switch_step=3", "beyond the run's 2 rollout iterations"),
    ("objective.switch_step=-1", "must be >= 0"),
    ("objective.beta=0", "outside \\(0, 1\\]"),
    ("objective.beta=1.5", "outside \\(0, 1\\]"),
    ("objective.lam=1", "outside \\[0, 1\\)"),
    ("objective.lam=-0.1", "outside \\[0, 1\\)"),
    ("objective.ratio_clip=[1.2, 0.8]", "must be below"),
    ("objective.reward_at=later", "is not one of"),
    ("objective.normaliser=episode", "is not one of"),
])
def test_bad_reopold_settings(tiny_overrides, override, match):
    with pytest.raises(ConfigError, match=match):  # trainer.steps 4 / minibatches 2
        load_config(TrainConfig, None, [*tiny_overrides, "trainer.steps=4", override])


def test_lambda_zero_has_no_floor():
    from mmopd.objectives import reopold_floor

    assert reopold_floor(0.0) == -math.inf
    assert reopold_floor(0.3) == pytest.approx(math.log(0.3) / 0.7)


def test_switch_counts_rollout_iterations_and_minibatches_hold_whole_queries(
        tiny_overrides, tmp_path, monkeypatch):
    """4 rollout iterations x 2 optimiser steps, T_switch 1: steps 1-2 explore, 3-8 refine
    (counted in optimiser steps the switch would come after step 1); every minibatch holds
    both responses of each of its queries."""
    import mmopd.training.loop as loop

    seen: list[list[int]] = []
    real = loop.minibatches

    def spy(groups, mbs, generator):
        out = real(groups, mbs, generator)
        seen.extend([[groups[i] for i in mb] for mb in out])
        return out

    monkeypatch.setattr(loop, "minibatches", spy)
    res = loop.train(load_config(TrainConfig, None, [
        *tiny_overrides, "trainer.steps=8", "objective.switch_step=1", "eval.num_problems=2",
        f"trainer.output_dir={tmp_path / 'run'}"]))
    rows = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["phase"] for r in rows] == [0.0, 0.0] + [1.0] * 6
    assert len(seen) == 8
    for groups in seen:
        assert groups and all(groups.count(g) == 2 for g in groups)
    assert all(0 < r["update_kept_frac"] <= 1 for r in rows)


RECIPES = Path(__file__).parent.parent / "configs" / "reopold"


# Table 7 and App. C: student, teacher, iterations, lr, beta, T_switch, samples per prompt,
# prompts per rollout batch / minibatch, max response tokens, evaluation temperature / top-p
@pytest.mark.parametrize("name, student, teacher, iters, lr, beta, switch, n, batch, mini, "
                         "max_len, eval_t, eval_p", [
    ("math-1.5b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Skywork/Skywork-OR1-Math-7B",
     300, 1e-5, 0.2, 100, 8, 128, 32, 8192, 0.6, 0.95),
    ("math-7b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Skywork/Skywork-OR1-32B-Preview",
     200, 3e-6, 0.2, 50, 8, 128, 32, 8192, 0.6, 0.95),
    ("visual-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "xyliu6/NoisyRollout-Geo3K-32B",
     60, 5e-6, 0.2, 20, 12, 128, 64, 2048, 0.6, 0.95),
    ("visual-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "xyliu6/NoisyRollout-Geo3K-32B",
     60, 5e-6, 0.2, 20, 12, 128, 64, 2048, 0.6, 0.95),
    ("agentic-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "TIGER-Lab/PixelReasoner-RL-v1",
     40, 1e-6, 0.4, 10, 8, 128, 64, 8192, 1.0, 1.0),
])
def test_paper_recipes(name, student, teacher, iters, lr, beta, switch, n, batch, mini,
                       max_len, eval_t, eval_p):
    """Each recipe is the paper's setting (8 GPUs: per-GPU prompts x 8 = its batch), rolls out
    in vLLM, and `mmopd plan` fits it on one node of 8 x 80 GB."""
    from mmopd.plan import estimate

    cfg = load_config(TrainConfig, RECIPES / f"{name}.yaml")
    r, o = cfg.rollout, cfg.objective
    assert (cfg.model.path, cfg.teacher.model.path) == (student, teacher)
    assert cfg.trainer.steps // r.minibatches == iters
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_steps) == (lr, "constant", 0)
    assert (o.name, o.lam, o.beta, o.switch_step) == ("reopold", 0.3, beta, switch)
    assert o.form == Form((0.8, 1.2), "current", "query")
    assert (r.samples_per_prompt, r.prompts_per_batch * 8, r.minibatches) == (n, batch,
                                                                              batch // mini)
    assert (r.max_new_tokens, r.temperature, r.backend) == (max_len, 1.0, "vllm")
    assert (cfg.eval.temperature, cfg.eval.top_p) == (eval_t, eval_p)
    turns = r.max_turns if name.startswith("agentic") else 1  # the others answer in one turn
    rows, _ = estimate(cfg, 8, 80.0, prompt_tokens=1024, turns=turns)
    assert any(row["total"] <= 80.0 for row in rows.values()), {k: v["total"]
                                                                 for k, v in rows.items()}


def test_agentic_recipe_rounds():
    cfg = load_config(TrainConfig, RECIPES / "agentic-3b.yaml")
    assert (cfg.rollout.max_turns, cfg.eval.max_turns, cfg.env.kwargs["zoom"]) == (2, 5, True)
