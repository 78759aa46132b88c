"""The fused chunked losses equal the autograd path in value and gradients (float32)."""

from __future__ import annotations

import pytest
import torch

from mmopd.objectives import full_vocab_divergence, policy_loss_sum, topk_divergence
from mmopd.objectives.zoo import teacher_topk_fkl
from mmopd.training.fused import (
    Projection,
    full_divergence_chunks,
    fused_loss,
    gathered_chunks,
)

N, H, V, K = 37, 16, 50, 5


def _layer(bias: bool, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(H, V + 3, bias=bias)  # 3 padded rows the vocab trim drops
    with torch.no_grad():
        layer.weight.mul_(4.0)  # peaked distributions: tails near underflow get exercised
    return layer.double().float()


def _head(layer, proj: Projection):
    def fn(h):
        z = layer(h.to(layer.weight.dtype)).float()[:, : proj.rows]
        if proj.scale is not None:
            z = z * proj.scale
        if proj.cap:
            z = torch.tanh(z / proj.cap) * proj.cap
        return z
    return fn


def _grads(loss, h, layer):
    layer.zero_grad()
    h.grad = None
    loss.backward()
    return [h.grad.clone(), layer.weight.grad.clone()] + (
        [layer.bias.grad.clone()] if layer.bias is not None else [])


def _compare(make_fused, make_ref, bias=False, scale=None, cap=None, accumulate=False):
    layer = _layer(bias, 0)
    proj = Projection(layer, scale, cap, V)
    torch.manual_seed(1)
    h = torch.randn(N, H, requires_grad=True)
    head = _head(layer, proj)
    ref = make_ref(head, h)
    fused = fused_loss(proj, h, make_fused(), chunk=8)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    g_ref, g_fused = _grads(ref, h, layer), _grads(fused, h, layer)
    for a, b in zip(g_ref, g_fused):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    if accumulate:  # two micro-batches into .grad, as gradient accumulation does
        layer.zero_grad()
        h.grad = None
        (fused_loss(proj, h, make_fused(), chunk=8) * 0.5).backward()
        (fused_loss(proj, h, make_fused(), chunk=5) * 0.5).backward()
        torch.testing.assert_close(layer.weight.grad, g_ref[1], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(h.grad, g_ref[0], rtol=1e-4, atol=1e-6)


def _teacher(zeros: bool = True):
    """Teacher log-probs; `zeros`: row 0 gives three ids no mass (-inf), which reverse KL
    cannot take (it is infinite there on both paths)."""
    torch.manual_seed(2)
    t = torch.randn(N, V) * 4
    if zeros:
        t[0, :3] = -float("inf")
    return torch.log_softmax(t, -1)


@pytest.mark.parametrize("kind, beta", [("rkl", 0.5), ("fkl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                        ("jsd", 0.0), ("jsd", 1.0)])
def test_full_vocabulary_divergences(kind, beta):
    t = _teacher(zeros=kind == "fkl" or 0 <= beta < 1 and kind == "jsd")
    w = torch.rand(N)
    w[3] = 0.0
    _compare(lambda: full_divergence_chunks(kind, beta, lambda sl: t[sl].clone(), w),
             lambda head, h: (full_vocab_divergence(kind, head(h), t, beta) * w).sum(),
             accumulate=kind == "rkl")


@pytest.mark.parametrize("bias, scale, cap", [(True, None, None), (False, 0.5, 3.0)])
def test_bias_scale_and_softcap_are_chained(bias, scale, cap):
    t = _teacher(zeros=False)
    w = torch.rand(N)
    _compare(lambda: full_divergence_chunks("rkl", 0.5, lambda sl: t[sl].clone(), w),
             lambda head, h: (full_vocab_divergence("rkl", head(h), t, 0.5) * w).sum(),
             bias=bias, scale=scale, cap=cap)


@pytest.mark.parametrize("kind", ["rkl", "fkl", "jsd"])
def test_topk_plus_tail_on_student_and_teacher_ids(kind):
    t = _teacher(zeros=False)
    w = torch.rand(N)
    teacher_ids = t.topk(K, -1).indices

    def student_ref(head, h):
        s = torch.log_softmax(head(h), -1)
        ids = s.detach().topk(K, -1).indices
        return (topk_divergence(kind, s.gather(-1, ids), t.gather(-1, ids), 0.3) * w).sum()

    def student_fused():
        holder = {}

        def ids(s, sl):
            holder["ids"] = s.topk(K, -1).indices
            return holder["ids"]
        return gathered_chunks(ids, lambda lp, sl: (topk_divergence(
            kind, lp, t[sl].gather(-1, holder["ids"]), 0.3) * w[sl]).sum())
    _compare(student_fused, student_ref)

    tlp = t.gather(-1, teacher_ids)
    _compare(lambda: gathered_chunks(lambda s, sl: teacher_ids[sl], lambda lp, sl: (
        topk_divergence(kind, lp, tlp[sl], 0.3) * w[sl]).sum()),
        lambda head, h: (topk_divergence(kind, torch.log_softmax(head(h), -1).gather(
            -1, teacher_ids), tlp, 0.3) * w).sum())


@pytest.mark.parametrize("clip", [None, (0.8, 1.2)])
def test_sampled_token_policy_gradient(clip):
    torch.manual_seed(3)
    y = torch.randint(0, V, (N,))
    old = torch.log_softmax(torch.randn(N, V), -1).gather(-1, y[:, None]).squeeze(-1) * 0.1
    adv, keep = torch.randn(N), (torch.rand(N) > 0.2).float()
    got = []
    _compare(lambda: gathered_chunks(lambda s, sl: y[sl, None], lambda lp, sl: policy_loss_sum(
        lp.squeeze(-1), old[sl], adv[sl], keep[sl], clip), keep=got),
        lambda head, h: policy_loss_sum(torch.log_softmax(head(h), -1).gather(
            -1, y[:, None]).squeeze(-1), old, adv, keep, clip), accumulate=True)
    assert torch.cat(got[:5]).shape == (N, 1)  # the sampled log-probs come back for metrics


def test_eopd_teacher_topk_forward_kl():
    t = _teacher()
    ids = t.topk(K, -1).indices
    tlp, w = t.gather(-1, ids), torch.rand(N)
    _compare(lambda: gathered_chunks(lambda s, sl: ids[sl], lambda lp, sl: (
        teacher_topk_fkl(lp, tlp[sl]) * w[sl]).sum()),
        lambda head, h: (teacher_topk_fkl(torch.log_softmax(head(h), -1).gather(-1, ids), tlp)
                         * w).sum())


def test_uld_sorted_probabilities():
    """ULD on the top-k of each side (sorted), plus the tails: with K = V it is the L1 distance
    of the fully sorted distributions; fused and autograd paths agree on value and gradients."""
    from mmopd.objectives.divergences import uld_distance

    t = _teacher(zeros=False)
    full = uld_distance(torch.log_softmax(torch.randn(N, V), -1).sort(-1, descending=True)
                        .values, t.sort(-1, descending=True).values)
    torch.manual_seed(4)
    a, b = torch.log_softmax(torch.randn(N, V), -1), t
    naive = (a.exp().sort(-1, descending=True).values
             - b.exp().sort(-1, descending=True).values).abs().sum(-1)
    torch.testing.assert_close(uld_distance(a.topk(V, -1).values, b.topk(V, -1).values), naive,
                               rtol=1e-5, atol=1e-6)
    assert (full >= 0).all()
    tlp, w = t.topk(K, -1).values, torch.rand(N)
    tlp[0, -2:] = -float("inf")  # a teacher row with fewer than K entries (padded)
    _compare(lambda: gathered_chunks(lambda s, sl: s.topk(K, -1).indices, lambda lp, sl: (
        uld_distance(lp, tlp[sl]) * w[sl]).sum()),
        lambda head, h: (uld_distance(torch.log_softmax(head(h), -1).topk(K, -1).values, tlp)
                         * w).sum(), accumulate=True)


def test_frozen_output_layer_and_frozen_hidden():
    """A LoRA student's output layer is frozen: no buffer is made and no gradient reaches it."""
    layer = _layer(False, 0).requires_grad_(False)
    proj = Projection(layer, None, None, V)
    t, w = _teacher(), torch.ones(N)
    h = torch.randn(N, H, requires_grad=True)
    chunks = full_divergence_chunks("fkl", 0.5, lambda sl: t[sl].clone(), w)
    fused_loss(proj, h, chunks, 8).backward()
    assert layer.weight.grad is None and h.grad is not None


@pytest.mark.parametrize("extra", [
    ["objective.name=reopold", "objective.switch_frac=0.5"],  # sampled-token policy gradient
    ["objective.name=rkl"],  # full vocabulary
    ["objective.name=jsd", "objective.topk=8"],  # top-k + tail on the student's ids
    ["objective.name=fkl", "objective.topk=8", "objective.topk_source=teacher"],
    ["objective.name=eopd", "objective.eopd_topk=8"],  # policy gradient + renormalised top-k
    ["objective.name=aopd"],  # policy gradient + full-vocabulary auxiliary divergence
    ["objective.name=uld", "objective.topk=8"],  # sorted probabilities, no shared ids
])
def test_training_with_the_fused_path_equals_autograd(tiny_overrides, tmp_path, extra,
                                                     monkeypatch):
    """Four steps, two minibatches per rollout batch, micro-batches of 3 (gradient accumulation):
    the trainer (fused losses, its only path) and the trainer with its losses swapped for the
    autograd references (tests/reference_losses.py) give the same losses and final weights, to
    float32 tolerance."""
    import json

    import reference_losses
    from safetensors.torch import load_file

    from mmopd.config import TrainConfig, load_config
    from mmopd.training import losses
    from mmopd.training.loop import train

    calls = []
    real = losses.fused_loss
    monkeypatch.setattr(losses, "fused_loss", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for fused in (True, False):
        if not fused:
            reference_losses.use_autograd(monkeypatch)
        out = tmp_path / str(fused)
        train(load_config(TrainConfig, None, [
            *tiny_overrides, *extra,
            "trainer.steps=4", "eval.num_problems=2", "eval.pass_k=0",
            "trainer.report_to=none", f"trainer.output_dir={out}"]))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[fused] = rows, load_file(out / "checkpoints" / "step-4" / "model.safetensors")
        assert bool(calls) == fused  # the fused run took the fused path, the other did not
        calls.clear()
    (rows_f, w_f), (rows_a, w_a) = runs[True], runs[False]
    for a, b in zip(rows_f, rows_a, strict=True):
        for key in ("loss", "grad_norm", "kept_frac", "mean_ratio"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    for name in w_a:  # Adam divides by sqrt(v): where a gradient is near 0, float32 rounding
        # moves a weight by up to ~1e-6 of its lr-1e-3 steps; 1e-5 is 1 % of one step
        torch.testing.assert_close(w_f[name], w_a[name], rtol=1e-4, atol=1e-5)


def test_bf16_output_layer_keeps_dtypes_and_matches_autograd():
    """A bf16 output layer (as on GPU): the matmuls run in bf16 like the autograd path's, the
    gradients come back in the parameter's and the hidden states' dtypes, and agree with the
    autograd path to bf16 precision."""
    layer = _layer(False, 0).to(torch.bfloat16)
    proj = Projection(layer, None, None, V)
    t, w = _teacher(zeros=False), torch.rand(N)
    head = _head(layer, proj)
    torch.manual_seed(1)
    h = torch.randn(N, H, requires_grad=True)
    ref = (full_vocab_divergence("rkl", head(h), t, 0.5) * w).sum()
    g_ref = _grads(ref, h, layer)
    fused = fused_loss(proj, h, full_divergence_chunks("rkl", 0.5, lambda sl: t[sl].clone(), w),
                       8)
    g_fused = _grads(fused, h, layer)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-3)
    assert g_fused[0].dtype == torch.float32 and g_fused[1].dtype == torch.bfloat16
    for a, b in zip(g_ref, g_fused):  # bf16 has 8 mantissa bits: compare as vectors
        assert float((a.float() - b.float()).norm() / a.float().norm()) < 2e-2


def test_bf16_compute_over_float32_master_weights():
    """trainer.bf16 with float32 master weights: the fused path's GEMMs take bf16 operands (the
    weight cast once per call) with float32 accumulation; loss and gradients agree with autograd
    through the same bf16-rounded operands, and the gradients come back in the float32
    parameter's and hidden states' dtypes."""
    layer = _layer(False, 0)
    proj = Projection(layer, None, None, V, dtype=torch.bfloat16)
    t, w = _teacher(zeros=False), torch.rand(N)
    torch.manual_seed(1)
    h = torch.randn(N, H, requires_grad=True)

    def head(x):
        return (x.bfloat16().float() @ layer.weight.bfloat16().float().T)[:, :V]
    ref = (full_vocab_divergence("rkl", head(h), t, 0.5) * w).sum()
    g_ref = _grads(ref, h, layer)
    fused = fused_loss(proj, h, full_divergence_chunks("rkl", 0.5, lambda sl: t[sl].clone(), w),
                       8)
    g_fused = _grads(fused, h, layer)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-4)
    assert g_fused[0].dtype == g_fused[1].dtype == torch.float32
    for a, b in zip(g_ref, g_fused):  # the logits' gradient is rounded to bf16 for the GEMMs
        assert float((a - b).norm() / a.norm()) < 1e-2
