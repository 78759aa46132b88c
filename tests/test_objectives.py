"""Objectives against brute-force references on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mmopd.config import ObjectiveConfig
from mmopd.objectives import (
    OBJECTIVES,
    TokenBatch,
    divergence_from_logp,
    full_vocab_divergence,
    grpo_advantages,
    policy_loss_sum,
    ratio_clipped,
    reopold_floor,
    topk_divergence,
    with_tail,
)

torch.manual_seed(0)


def _ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _ref(kind: str, s: list[float], t: list[float], beta: float) -> float:
    if kind == "rkl":
        return _ref_kl(s, t)
    if kind == "fkl":
        return _ref_kl(t, s)
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
    return beta * _ref_kl(t, m) + (1 - beta) * _ref_kl(s, m)


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_full_vocab_matches_brute_force(kind, beta):
    s_logits, t_logits = torch.randn(5, 7), torch.randn(5, 7) * 2
    got = full_vocab_divergence(kind, s_logits, t_logits, beta)
    for n in range(5):
        s = torch.softmax(s_logits[n].double(), -1).tolist()
        t = torch.softmax(t_logits[n].double(), -1).tolist()
        assert got[n].item() == pytest.approx(_ref(kind, s, t, beta), rel=1e-4, abs=1e-6)


def test_jsd_ends_fall_back_to_kl_not_zero():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    fkl = full_vocab_divergence("fkl", s, t)
    rkl = full_vocab_divergence("rkl", s, t)
    assert torch.allclose(full_vocab_divergence("jsd", s, t, 0.0), fkl)
    assert torch.allclose(full_vocab_divergence("jsd", s, t, 1.0), rkl)
    assert (fkl > 0).all() and (rkl > 0).all()
    # and the ends are the limits of JSD_beta / beta (resp. / (1 - beta))
    eps = 1e-4
    assert torch.allclose(full_vocab_divergence("jsd", s, t, eps) / eps, fkl, rtol=1e-2)
    assert torch.allclose(full_vocab_divergence("jsd", s, t, 1 - eps) / eps, rkl, rtol=1e-2)


def test_identical_distributions_give_zero():
    x = torch.randn(3, 11)
    for kind in ("rkl", "fkl", "jsd"):
        assert torch.allclose(full_vocab_divergence(kind, x, x), torch.zeros(3), atol=1e-6)


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
def test_topk_with_tail_matches_brute_force(kind):
    s_logits, t_logits = torch.randn(6, 10), torch.randn(6, 10)
    s_lp, t_lp = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    ids = s_lp.topk(3, -1).indices
    got = topk_divergence(kind, s_lp.gather(-1, ids), t_lp.gather(-1, ids), 0.3)
    for n in range(6):
        sel = ids[n].tolist()
        s = [s_lp[n, i].exp().item() for i in sel]
        t = [t_lp[n, i].exp().item() for i in sel]
        s, t = s + [1 - sum(s)], t + [1 - sum(t)]
        assert got[n].item() == pytest.approx(_ref(kind, s, t, 0.3), rel=1e-4, abs=1e-6)


def test_tail_bucket_sums_to_one_and_topk_equals_full_when_k_is_vocab():
    lp = torch.log_softmax(torch.randn(4, 8), -1)
    assert torch.allclose(with_tail(lp[:, :5]).exp().sum(-1), torch.ones(4), atol=1e-6)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    full = full_vocab_divergence("rkl", s, t)
    topk = topk_divergence("rkl", torch.log_softmax(s, -1), torch.log_softmax(t, -1))
    assert torch.allclose(full, topk, atol=1e-5)


def test_unknown_divergence_and_bad_beta():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence_from_logp("tvd", x, x)
    with pytest.raises(ValueError, match="beta"):
        divergence_from_logp("jsd", x, x, 1.5)


def test_reopold_floor_value():
    assert reopold_floor(0.3) == pytest.approx(math.log(0.3) / 0.7)
    assert reopold_floor(0.3) == pytest.approx(-1.72, abs=5e-3)


def _batch(n_tok=40, n_ep=4, seed=0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    return TokenBatch(
        episode_N=torch.arange(n_tok) % n_ep, logp_old_N=-torch.rand(n_tok, generator=g) * 3,
        logp_teacher_N=-torch.rand(n_tok, generator=g) * 5,
        entropy_N=torch.rand(n_tok, generator=g) * 2,
        reward_E=torch.tensor([1.0, 0.0, 1.0, 1.0][:n_ep]),
        group_E=torch.tensor([0, 0, 1, 1][:n_ep]))


def _reopold_brute(tb: TokenBatch, logp_new: torch.Tensor, step: int, t_switch: int,
                   lam: float, beta: float) -> float:
    f = math.log(lam) / (1 - lam)
    r = (tb.logp_teacher_N - tb.logp_old_N).tolist()
    h = tb.entropy_N.tolist()
    rho = torch.exp(logp_new - tb.logp_old_N).tolist()
    if step < t_switch:
        m = [1.0 if ri >= f else 0.0 for ri in r]
        rr = r
    else:
        tau = sorted(h, reverse=True)[math.ceil(beta * len(h)) - 1]  # the top beta's least
        m = [1.0 if hi >= tau else 0.0 for hi in h]
        rr = [max(ri, f) for ri in r]
    num = sum(p * x * mi for p, x, mi in zip(rho, rr, m))
    return -num / max(sum(m), 1.0)


@pytest.mark.parametrize("step", [0, 2, 3, 9])
def test_reopold_matches_brute_force(step):
    tb = _batch()
    cfg = ObjectiveConfig(name="reopold", lam=0.3, beta=0.2, switch_step=3)
    logp_new = tb.logp_old_N + 0.1 * torch.randn(40)
    plan = OBJECTIVES["reopold"].plan(tb, step, 10, cfg)
    loss = policy_loss_sum(logp_new, tb.logp_old_N, plan.advantage_N, plan.keep_N)
    loss = loss / max(float(plan.keep_N.sum()), 1.0)
    assert loss.item() == pytest.approx(_reopold_brute(tb, logp_new, step, 3, 0.3, 0.2), rel=1e-5)
    assert plan.metrics["phase"] == float(step >= 3)
    if step >= 3:
        assert plan.metrics["kept_frac"] == pytest.approx(0.2, abs=0.03)
        assert plan.advantage_N.min() >= reopold_floor(0.3) - 1e-6
    else:  # exploration: everything below the floor is dropped
        r = tb.token_reward_N
        assert not plan.keep_N[r < reopold_floor(0.3)].any()


def test_top_threshold_is_an_order_statistic_at_any_size():
    from mmopd.objectives.zoo import top_threshold

    x = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for frac in (0.2, 0.5, 1.0, 1e-4):
        tau = top_threshold(x, frac)
        assert int((x >= tau).sum()) == math.ceil(frac * 1001)
    assert top_threshold(x, 0.2) == float(torch.quantile(x, 0.8, interpolation="higher"))
    assert math.isnan(top_threshold(torch.zeros(0), 0.2))
    # 1k episodes x 16k tokens is past torch.quantile's limit of 2^24 elements
    big = torch.arange(2**24 + 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(big, 0.8)
    assert top_threshold(big, 0.25) == float(big.numel() - (big.numel() // 4))


def test_reopold_switch_frac_default():
    tb = _batch()
    cfg = ObjectiveConfig()
    assert OBJECTIVES["reopold"].plan(tb, 9, 30, cfg).metrics["phase"] == 0.0
    assert OBJECTIVES["reopold"].plan(tb, 10, 30, cfg).metrics["phase"] == 1.0


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_empty_batch_gives_zero_loss_not_nan(name):
    z = torch.zeros(0)
    tb = TokenBatch(torch.zeros(0, dtype=torch.long), z, z, z, z, torch.zeros(0, dtype=torch.long),
                    logp_ref_N=z, kl_N=z, overlap_N=z, teacher_entropy_N=z)
    plan = OBJECTIVES[name].plan(tb, 50, 60, ObjectiveConfig())
    loss = policy_loss_sum(torch.zeros(0, requires_grad=True), tb.logp_old_N, plan.advantage_N,
                           plan.keep_N) / max(float(plan.keep_N.sum()), 1.0)
    assert loss.item() == 0.0 and not math.isnan(loss.item())


def test_opd_gradient_is_minus_reward_times_grad_logp():
    tb = _batch()
    plan = OBJECTIVES["opd"].plan(tb, 0, 10, ObjectiveConfig(name="opd"))
    logp = tb.logp_old_N.clone().requires_grad_(True)  # first update: rho = 1
    policy_loss_sum(logp, tb.logp_old_N, plan.advantage_N, plan.keep_N).backward()
    assert torch.allclose(logp.grad, -(tb.logp_teacher_N - tb.logp_old_N))


def test_grpo_advantages_brute_force():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = grpo_advantages(r, g, eps=0.0 + 1e-6)
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)
    assert adv[0].item() == pytest.approx((1 - mean) / std, rel=1e-4)
    assert adv[1].item() == pytest.approx((0 - mean) / std, rel=1e-4)
    assert torch.allclose(adv[3:], torch.zeros(3))  # all-equal group carries no signal
    tb = _batch()
    plan = OBJECTIVES["grpo"].plan(tb, 0, 10, ObjectiveConfig(name="grpo"))
    adv_e = grpo_advantages(tb.reward_E, tb.group_E)
    assert torch.allclose(plan.advantage_N, adv_e[tb.episode_N])


@pytest.mark.parametrize("clip", [(0.8, 1.28), (0.5, 1.5)])
def test_ratio_clip_matches_ppo_brute_force(clip):
    torch.manual_seed(1)
    old = torch.randn(40) - 2
    new = (old + 0.6 * torch.randn(40)).requires_grad_(True)
    adv = torch.randn(40)
    keep = torch.rand(40) > 0.2
    loss = policy_loss_sum(new, old, adv, keep, clip)
    loss.backward()
    ref_loss, ref_grad = 0.0, []
    for lo, ln, a, k in zip(old.tolist(), new.tolist(), adv.tolist(), keep.tolist()):
        rho = math.exp(ln - lo)
        clipped = min(max(rho, clip[0]), clip[1])
        term = min(rho * a, clipped * a)
        # d(-term)/d logp: -rho * a where the unclipped term is the minimum, else 0
        unclipped_wins = rho * a <= clipped * a
        ref_loss -= term * k
        ref_grad.append(-rho * a * k if unclipped_wins else 0.0)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert torch.allclose(new.grad, torch.tensor(ref_grad), atol=1e-6)
    no_grad = new.grad == 0
    assert torch.equal(ratio_clipped(new.detach(), old, adv, clip) | ~keep, no_grad | ~keep)
    assert ratio_clipped(new.detach(), old, adv, clip).any()  # the case is not vacuous


def test_ratio_clip_is_plain_surrogate_on_the_first_update():
    old = torch.randn(10)
    adv = torch.randn(10)
    keep = torch.ones(10, dtype=torch.bool)
    a = old.clone().requires_grad_(True)
    b = old.clone().requires_grad_(True)
    policy_loss_sum(a, old, adv, keep, (0.8, 1.28)).backward()
    policy_loss_sum(b, old, adv, keep).backward()
    assert torch.allclose(a.grad, b.grad)
