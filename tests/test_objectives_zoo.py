"""The on-policy-distillation variants in mmopd.objectives.zoo against hand-computed values and
brute-force references on small tensors."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmopd.objectives.zoo import (
    aopd_split,
    drift_weights,
    eopd_mask,
    gopd_advantage,
    minmax,
    pair_stats,
    teacher_topk_fkl,
    tip_scores,
    top_fraction,
    vopd_advantage,
)

LN2, LN1_5 = math.log(2.0), math.log(1.5)


def _t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# --- G-OPD / ExOPD ----------------------------------------------------------------------------

def test_gopd_hand_computed():
    lt, lo, lr = _t(-1.0, -3.0), _t(-2.0, -1.0), _t(-1.5, -2.0)
    # lam = 1.25: 1.25 * (-1 + 1.5) - (-2 + 1.5) = 0.625 + 0.5 = 1.125
    #             1.25 * (-3 + 2)   - (-1 + 2)   = -1.25 - 1  = -2.25
    assert torch.allclose(gopd_advantage(lt, lo, lr, 1.25), _t(1.125, -2.25))
    # lam = 0: only -(log pi_old - log pi_ref) = [0.5, -1]
    assert torch.allclose(gopd_advantage(lt, lo, lr, 0.0), _t(0.5, -1.0))


def test_gopd_lam_one_is_plain_opd_exactly():
    g = torch.Generator().manual_seed(1)
    lt, lo = -torch.rand(1000, generator=g) * 20, -torch.rand(1000, generator=g) * 20
    lr = -torch.rand(1000, generator=g) * 20
    assert torch.equal(gopd_advantage(lt, lo, lr, 1.0), lt - lo)
    # and the reference cannot leak in, even when it is -inf
    lr_inf = torch.full_like(lr, -math.inf)
    assert torch.equal(gopd_advantage(lt, lo, lr_inf, 1.0), lt - lo)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.25, 3.0])
def test_gopd_matches_published_form(lam):
    g = torch.Generator().manual_seed(2)
    lt, lo, lr = (-torch.rand(50, generator=g, dtype=torch.float64) * 5 for _ in range(3))
    want = lam * (lt - lr) - (lo - lr)
    assert torch.allclose(gopd_advantage(lt, lo, lr, lam), want, atol=1e-12)


def test_advantages_are_detached():
    x = torch.randn(4, requires_grad=True)
    assert not gopd_advantage(x, x * 2, x * 3, 1.25).requires_grad
    assert not gopd_advantage(x, x * 2, x * 3, 1.0).requires_grad
    assert not vopd_advantage(x, x * 2, x.abs()).requires_grad
    assert not tip_scores(x, x * 2).requires_grad


# --- vOPD -------------------------------------------------------------------------------------

def test_vopd_hand_computed():
    # R = [-1 + 0.5, -2 + 3] = [-0.5, 1]; A = R + KL = [-0.3, 1.1]
    a = vopd_advantage(_t(-1.0, -2.0), _t(-0.5, -3.0), _t(0.2, 0.1))
    assert torch.allclose(a, _t(-0.3, 1.1))


def test_vopd_advantage_has_zero_mean_under_pi_old():
    # With KL_t the exact KL(pi_old || pi_T), E_{y ~ pi_old}[A_t] = -KL + KL = 0 at every position.
    g = torch.Generator().manual_seed(3)
    s = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    kl = (s.exp() * (s - t)).sum(-1)
    for y in range(7):  # advantage of every possible sampled token
        a_y = vopd_advantage(t[:, y], s[:, y], kl)
        if y == 0:
            expect = s[:, y].exp() * a_y
        else:
            expect = expect + s[:, y].exp() * a_y
    assert torch.allclose(expect, torch.zeros(5, dtype=torch.float64), atol=1e-12)


# --- minmax / TIP -----------------------------------------------------------------------------

def test_minmax_hand_computed_and_edges():
    assert torch.allclose(minmax(_t(2.0, 4.0, 3.0)), _t(0.0, 1.0, 0.5))
    assert torch.allclose(minmax(_t(-1.0, 1.0)), _t(0.0, 1.0))
    assert torch.equal(minmax(_t(5.0, 5.0, 5.0)), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(minmax(_t(7.0)), torch.zeros(1, dtype=torch.float64))
    assert minmax(torch.zeros(0)).shape == (0,)
    assert torch.allclose(minmax(torch.tensor([0, 2, 4])), torch.tensor([0.0, 0.5, 1.0]))
    assert not torch.isnan(minmax(_t(1e-30, 1e-30))).any()


def test_tip_scores_hand_computed():
    # h = minmax([0, 1, 2, 4]) = [0, .25, .5, 1];  d = minmax([1, 3, 2, 1]) = [0, 1, .5, 0]
    # s = h + d - h*d = [0, .25 + 1 - .25, .5 + .5 - .25, 1 + 0 - 0] = [0, 1, .75, 1]
    s = tip_scores(_t(0.0, 1.0, 2.0, 4.0), _t(1.0, 3.0, 2.0, 1.0))
    assert torch.allclose(s, _t(0.0, 1.0, 0.75, 1.0))
    # a soft OR: never below either input, never above one
    g = torch.Generator().manual_seed(4)
    h, d = torch.rand(100, generator=g), torch.rand(100, generator=g)
    s = tip_scores(h, d)
    assert (s >= minmax(h) - 1e-6).all() and (s >= minmax(d) - 1e-6).all() and (s <= 1).all()
    # all-equal KL: the score is the normalised entropy alone
    assert torch.allclose(tip_scores(_t(0.0, 2.0, 1.0), _t(3.0, 3.0, 3.0)), _t(0.0, 1.0, 0.5))


# --- top_fraction -----------------------------------------------------------------------------

def test_top_fraction_hand_computed():
    s = _t(0.1, 0.9, 0.5, 0.9, 0.3)
    # rho = 0.4: k = ceil(2.0) = 2 -> the two 0.9s
    assert top_fraction(s, 0.4).tolist() == [False, True, False, True, False]
    # rho = 0.5: k = ceil(2.5) = 3 -> plus 0.5
    assert top_fraction(s, 0.5).tolist() == [False, True, True, True, False]
    assert top_fraction(s, 1.0).tolist() == [True] * 5
    assert top_fraction(s, 1e-9).tolist() == [False, True, False, False, False]  # at least one


def test_top_fraction_ties_break_by_index():
    assert top_fraction(_t(1.0, 1.0, 1.0, 1.0), 0.5).tolist() == [True, True, False, False]
    # the tie sits on the boundary: k = 2, the 0.9 and then the first of the 0.5s
    assert top_fraction(_t(0.5, 0.9, 0.5, 0.5), 0.5).tolist() == [True, True, False, False]
    # NaN ranks last
    assert top_fraction(_t(math.nan, 0.1, 0.2), 0.6).tolist() == [False, True, True]


def test_top_fraction_matches_sorted_reference_with_many_ties():
    g = torch.Generator().manual_seed(10)
    score = torch.randint(0, 4, (5000,), generator=g).float()  # thousands of ties per value
    for rho in (0.1, 0.37, 0.5, 0.99):
        k = math.ceil(rho * 5000 - 1e-6)
        want = set(sorted(range(5000), key=lambda i: (-score[i].item(), i))[:k])
        got = set(top_fraction(score, rho).nonzero().flatten().tolist())
        assert got == want


def test_top_fraction_count_is_exact_ceiling():
    # rho = p / 100 keeps ceil(p * n / 100) tokens, computed in integers (0.3 * 10 -> 3, not 4)
    for p in range(1, 101):
        for n in (1, 3, 7, 10, 30, 99, 100, 257):
            got = int(top_fraction(torch.arange(n, dtype=torch.float32), p / 100).sum())
            assert got == -(-p * n // 100), (p, n)


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.0001, math.nan])
def test_top_fraction_rejects_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        top_fraction(torch.ones(3), rho)


def test_top_fraction_empty():
    out = top_fraction(torch.zeros(0), 0.5)
    assert out.dtype == torch.bool and out.shape == (0,)


# --- EOPD -------------------------------------------------------------------------------------

def test_teacher_topk_fkl_hand_computed_value_and_gradient():
    # teacher [ln .3, ln .1] -> renormalised [.75, .25]; student [ln .2, ln .2] -> [.5, .5]
    # KL = .75 ln(1.5) + .25 ln(.5) = 0.304099 - 0.173287 = 0.130812
    # d KL / d student_i = q_i - p_T,i = [.5 - .75, .5 - .25] = [-.25, .25]
    s = torch.log(_t(0.2, 0.2))[None].requires_grad_(True)
    t = torch.log(_t(0.3, 0.1))[None]
    kl = teacher_topk_fkl(s, t)
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(0.75 * LN1_5 - 0.25 * LN2, abs=1e-6)
    assert kl.item() == pytest.approx(0.130812, abs=1e-6)
    kl.sum().backward()
    assert torch.allclose(s.grad, _t(-0.25, 0.25)[None], atol=1e-6)


def _fkl_brute(s_row: list[float], t_row: list[float]) -> float:
    zs = sum(math.exp(x) for x in s_row)
    zt = sum(math.exp(x) for x in t_row)
    p = [math.exp(x) / zt for x in t_row]
    q = [math.exp(x) / zs for x in s_row]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_teacher_topk_fkl_matches_brute_force_and_autograd():
    g = torch.Generator().manual_seed(5)
    n, v, k = 6, 20, 4
    s_lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    t_lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    ids = t_lp.topk(k, -1).indices
    s_at = s_lp.gather(1, ids).clone().requires_grad_(True)
    t_at = t_lp.gather(1, ids)
    got = teacher_topk_fkl(s_at, t_at)
    for i in range(n):
        want = _fkl_brute(s_at[i].tolist(), t_at[i].tolist())
        assert got[i].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    # analytic gradient of KL(p_T || softmax(s)) w.r.t. s is softmax(s) - p_T
    got.sum().backward()
    want_grad = torch.softmax(s_at.detach(), -1) - torch.softmax(t_at, -1)
    assert torch.allclose(s_at.grad, want_grad, atol=1e-6)
    # the teacher entry point is only a target here; renormalisation makes row shifts irrelevant
    shifted = teacher_topk_fkl(s_at.detach() + 3.0, t_at - 1.0)
    assert torch.allclose(shifted, got.detach(), atol=1e-5)
    assert torch.allclose(teacher_topk_fkl(t_at, t_at), torch.zeros(n), atol=1e-6)


def test_teacher_topk_fkl_gradcheck():
    # float32 inside the function, so check finite differences loosely in float64 inputs
    g = torch.Generator().manual_seed(6)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    f = lambda x: teacher_topk_fkl(x, t).double()  # noqa: E731
    assert torch.autograd.gradcheck(f, (s,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_teacher_topk_fkl_zero_prob_teacher_ids_contribute_nothing():
    s = torch.tensor([[0.0, 0.0, 5.0]], requires_grad=True)
    t = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf]])
    kl = teacher_topk_fkl(s, t)
    # p_T = [.5, .5, 0], q = softmax([0, 0, 5]); KL = -ln q_0 - ln 2 (q_0 = q_1)
    q0 = 1.0 / (2.0 + math.exp(5.0))
    assert kl.item() == pytest.approx(-math.log(q0) - LN2, rel=1e-5)
    kl.backward()
    assert torch.isfinite(s.grad).all()


def test_eopd_mask():
    h = _t(0.5, 0.8, 0.81, 2.0)
    assert eopd_mask(h).tolist() == [False, False, True, True]  # default tau = 0.8, strict
    assert eopd_mask(h, tau=0.5).tolist() == [False, True, True, True]


# --- AOPD -------------------------------------------------------------------------------------

def test_aopd_split_partitions_and_zero_goes_to_divergence():
    adv = _t(0.5, 0.0, -0.2, 1e-8, -0.0, math.nan)
    pg, div = aopd_split(adv)
    assert pg.tolist() == [True, False, False, True, False, False]
    assert div.tolist() == [False, True, True, False, True, True]
    assert not (pg & div).any() and (pg | div).all()
    pg0, div0 = aopd_split(torch.zeros(0))
    assert pg0.shape == div0.shape == (0,)


# --- pair_stats -------------------------------------------------------------------------------

def test_pair_stats_hand_computed():
    # student [.4, .3, .2, .1], teacher [.1, .2, .3, .4] (logits shifted: softmax ignores it)
    ps, pt = [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]
    s = torch.log(torch.tensor([ps])) + 1.7
    t = torch.log(torch.tensor([pt])) - 0.4
    # KL(S||T) = .4 ln4 + .3 ln1.5 + .2 ln(2/3) + .1 ln(1/4) = .3 ln4 + .1 ln1.5 = 0.456435
    # H = -(.4 ln.4 + .3 ln.3 + .2 ln.2 + .1 ln.1) = 1.279854 for both
    h = -sum(p * math.log(p) for p in ps)
    k2 = pair_stats(s, t, 2)  # S top-2 {0, 1}, T top-2 {3, 2}: overlap 0, T mass .1 + .2
    assert k2["kl"].item() == pytest.approx(0.3 * math.log(4) + 0.1 * LN1_5, abs=1e-6)
    assert k2["kl"].item() == pytest.approx(0.456435, abs=1e-6)
    assert k2["entropy_student"].item() == pytest.approx(h, abs=1e-6)
    assert k2["entropy_teacher"].item() == pytest.approx(1.279854, abs=1e-6)
    assert k2["overlap"].item() == 0.0
    assert k2["teacher_mass"].item() == pytest.approx(0.3, abs=1e-6)
    k3 = pair_stats(s, t, 3)  # S {0, 1, 2}, T {3, 2, 1}: overlap 2/3, T mass .1 + .2 + .3
    assert k3["overlap"].item() == pytest.approx(2 / 3)
    assert k3["teacher_mass"].item() == pytest.approx(0.6, abs=1e-6)
    for key in ("kl", "entropy_student", "entropy_teacher"):
        assert k3[key].item() == pytest.approx(k2[key].item())


def test_pair_stats_k_larger_than_vocab_is_clamped():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    out = pair_stats(s, t, 10)
    assert torch.allclose(out["overlap"], torch.ones(3))
    assert torch.allclose(out["teacher_mass"], torch.ones(3), atol=1e-6)
    assert torch.allclose(out["kl"], pair_stats(s, t, 4)["kl"])


def test_pair_stats_matches_brute_force():
    g = torch.Generator().manual_seed(8)
    n, v, k = 7, 13, 4
    s = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v, generator=g) * 2
    out = pair_stats(s, t, k)  # float32 random logits: no ties inside a top-k
    cs, ct = torch.distributions.Categorical(logits=s), torch.distributions.Categorical(logits=t)
    assert all(x.dtype == torch.float32 and x.shape == (n,) for x in out.values())
    assert torch.allclose(out["kl"], torch.distributions.kl_divergence(cs, ct), atol=1e-5)
    assert torch.allclose(out["entropy_student"], cs.entropy(), atol=1e-5)
    assert torch.allclose(out["entropy_teacher"], ct.entropy(), atol=1e-5)
    for i in range(n):
        srow, trow = s[i].tolist(), t[i].tolist()
        top_s = set(sorted(range(v), key=lambda j: -srow[j])[:k])
        top_t = set(sorted(range(v), key=lambda j: -trow[j])[:k])
        assert out["overlap"][i].item() == pytest.approx(len(top_s & top_t) / k)
        zt = sum(math.exp(x) for x in trow)
        mass = sum(math.exp(trow[j]) / zt for j in top_s)
        assert out["teacher_mass"][i].item() == pytest.approx(mass, abs=1e-5)


def test_pair_stats_bfloat16_logits_give_float32_stats():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    out = pair_stats(s.bfloat16(), t.bfloat16(), 3)
    ref = pair_stats(s.bfloat16().float(), t.bfloat16().float(), 3)  # what the function saw
    assert all(x.dtype == torch.float32 for x in out.values())
    assert torch.equal(out["kl"], ref["kl"]) and torch.equal(out["entropy_student"],
                                                             ref["entropy_student"])


def test_pair_stats_builds_no_graph_and_checks_shapes():
    s = torch.randn(2, 5, requires_grad=True)
    out = pair_stats(s, torch.randn(2, 5), 2)
    assert not any(x.requires_grad for x in out.values())
    with pytest.raises(ValueError, match=r"\[n, V\]"):
        pair_stats(torch.randn(2, 5), torch.randn(2, 6), 2)
    with pytest.raises(ValueError, match="k"):
        pair_stats(torch.randn(2, 5), torch.randn(2, 5), 0)
    empty = pair_stats(torch.zeros(0, 5), torch.zeros(0, 5), 3)
    assert all(x.shape == (0,) for x in empty.values())


# --- drift_weights ----------------------------------------------------------------------------

def _drift_brute(overlap: list[float], episode: list[int], threshold: float, patience: int,
                 down: float) -> tuple[list[float], list[int]]:
    n_e = max(episode) + 1 if episode else 0
    starts = [-1] * n_e
    first: dict[int, int] = {}
    run = 0
    for i, (o, e) in enumerate(zip(overlap, episode)):
        if e not in first:
            first[e], run = i, 0
        if starts[e] >= 0:
            continue
        run = run + 1 if o < threshold else 0
        if run == patience:
            starts[e] = i - patience + 1 - first[e]
    w = [down if starts[e] >= 0 and i - first[e] >= starts[e] else 1.0
         for i, e in enumerate(episode)]
    return w, starts


def test_drift_weights_hand_computed():
    d = 0.1
    episodes = [
        (0, [0.9, 0.4, 0.8, 0.3, 0.2, 0.1, 0.9]),  # run at 1 interrupted; run 3..5 -> start 3
        (1, [0.1, 0.2, 0.9]),  # drift at the very start
        (2, [0.9, 0.5]),  # no drift (0.5 is not below 0.5)
        (4, [0.1]),  # patience longer than the episode
        (5, [0.9, 0.1]),  # a low run that ends the episode ...
        (6, [0.1, 0.9]),  # ... and one that starts the next do not join
    ]  # episode 3 has no tokens
    ov = torch.tensor([o for _, os in episodes for o in os])
    ep = torch.tensor([e for e, os in episodes for _ in os])
    w, start = drift_weights(ov, ep, threshold=0.5, patience=2, down_weight=d)
    assert start.tolist() == [3, 0, -1, -1, -1, -1, -1]
    assert start.dtype == torch.long
    want = [1, 1, 1, d, d, d, d] + [d, d, d] + [1, 1] + [1] + [1, 1] + [1, 1]
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float32))
    # patience 1: every episode with a low token drifts from its first low token
    w1, start1 = drift_weights(ov, ep, 0.5, 1, 0.0)
    assert start1.tolist() == [1, 0, -1, -1, 0, 1, 0]
    assert w1[:7].tolist() == [1, 0, 0, 0, 0, 0, 0]
    # patience 3: only the run 3..5 of episode 0 is long enough
    _, start3 = drift_weights(ov, ep, 0.5, 3, 0.0)
    assert start3.tolist() == [3, -1, -1, -1, -1, -1, -1]


def test_drift_weights_episodes_in_any_order():
    ov = torch.tensor([0.1, 0.1, 0.9, 0.9, 0.1, 0.1])
    ep = torch.tensor([2, 2, 2, 0, 0, 0])
    w, start = drift_weights(ov, ep, 0.5, 2, 0.25)
    assert start.tolist() == [1, -1, 0]
    assert w.tolist() == [0.25, 0.25, 0.25, 1.0, 0.25, 0.25]


@pytest.mark.parametrize("seed", range(5))
def test_drift_weights_matches_python_loop(seed):
    rng = random.Random(seed)
    order = list(range(40))
    rng.shuffle(order)
    ov: list[float] = []
    ep: list[int] = []
    for e in order:
        if rng.random() < 0.1:
            continue  # an episode with no tokens
        p_low = rng.choice([0.1, 0.4, 0.7])
        for _ in range(rng.randint(1, 30)):
            ov.append(rng.random() * 0.5 + (0.0 if rng.random() < p_low else 0.5))
            ep.append(e)
    for patience in (1, 2, 3, 5):
        w, start = drift_weights(torch.tensor(ov), torch.tensor(ep), 0.5, patience, 0.3)
        w_ref, start_ref = _drift_brute(ov, ep, 0.5, patience, 0.3)
        assert start.tolist() == start_ref
        assert torch.allclose(w, torch.tensor(w_ref))


def test_drift_weights_edges():
    w, start = drift_weights(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5, 2, 0.1)
    assert w.shape == (0,) and start.shape == (0,)
    with pytest.raises(ValueError, match="patience"):
        drift_weights(torch.ones(2), torch.zeros(2, dtype=torch.long), 0.5, 0, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        drift_weights(torch.ones(3), torch.tensor([0, 1, 0]), 0.5, 2, 0.1)
    with pytest.raises(ValueError, match="flat"):
        drift_weights(torch.ones(3), torch.zeros(2, dtype=torch.long), 0.5, 2, 0.1)
    x = torch.zeros(3, requires_grad=True)
    w, _ = drift_weights(x, torch.zeros(3, dtype=torch.long), 0.5, 2, 0.1)
    assert not w.requires_grad and w.tolist() == pytest.approx([0.1] * 3)


def test_drift_weights_scales_linearly():
    # 400k tokens in 4,000 episodes: a quadratic implementation would not finish here
    n_e, length = 4000, 100
    ov = torch.ones(n_e, length)
    ov[::2, 50:] = 0.0  # even episodes drift at offset 50
    ep = torch.arange(n_e).repeat_interleave(length)
    w, start = drift_weights(ov.reshape(-1), ep, 0.5, 10, 0.0)
    assert start[::2].eq(50).all() and start[1::2].eq(-1).all()
    assert float(w.sum()) == n_e * length - (n_e // 2) * 50
