"""Rendering, episodes, chunked log-probs and the HF sampler on tiny local models."""

from __future__ import annotations

import math

import pytest
import torch

from mmopd.episode import Episode, pad_right
from mmopd.logprobs import final_hidden, lm_head_fn, token_logprobs
from mmopd.rollout.render import ChatRenderer
from mmopd.rollout.sampler import HFSampler, SamplingParams, sample_rows
from mmopd.teachers.scorer import HFScorer


@pytest.fixture(scope="module")
def model(student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(student_dir).eval()


def test_incremental_rendering_equals_full_render(tokenizer):
    r = ChatRenderer(tokenizer)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12+30="}]
    ids = r.prompt(msgs)
    reply = tokenizer.encode("42", add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = ids + reply + r.close_turn(reply)
    ids += r.continuation([{"role": "user", "content": "and 1+1="}])
    full = r.prompt(msgs + [{"role": "assistant", "content": "42"},
                            {"role": "user", "content": "and 1+1="}])
    assert ids == full
    # a truncated turn (no end token) gets the whole closer
    assert r.close_turn(reply[:-1]) == r.turn_closer


def test_episode_masks_and_teacher_view():
    ep = Episode(input_ids=[1, 2, 3], loss_mask=[0, 0, 0], step_index=[-1] * 3,
                 sampled_logprobs=[0.0] * 3, prompt_len=3, teacher_prompt_ids=[9, 9, 9, 9, 9])
    ep.append([4, 5], student=True, step=0, logprobs=[-0.1, -0.2])
    ep.append([6], student=False)
    ep.append([7], student=True, step=1, logprobs=[-0.3])
    assert ep.loss_mask == [0, 0, 0, 1, 1, 0, 1]
    assert ep.step_index == [-1, -1, -1, 0, 0, -1, 1]
    ids, mask, _ = ep.view("teacher")  # the teacher prompt, then the identical continuation
    assert ids == [9, 9, 9, 9, 9, 4, 5, 6, 7] and mask == [0] * 5 + [1, 1, 0, 1]
    assert ep.num_generated == 3
    with pytest.raises(ValueError):
        Episode(input_ids=[1], loss_mask=[], step_index=[], sampled_logprobs=[], prompt_len=1)


def test_chunked_logprobs_match_full_logits(model):
    """Scoring: log p(target), entropy and top-k equal the full logits', computed at most one
    chunk of rows through the output layer at a time."""
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (3, 17))
    att = torch.ones_like(ids)
    h = final_hidden(model, ids, att)[:, :-1].reshape(-1, model.config.hidden_size)
    y = ids[:, 1:].reshape(-1)
    head = lm_head_fn(model)
    seen = []
    real = type(head).logits

    def spy(self, x, w, b):
        seen.append(x.shape[0])
        return real(self, x, w, b)

    type(head).logits = spy
    try:
        res = token_logprobs(head, h, y, chunk_size=7, topk=4)
    finally:
        type(head).logits = real
    assert max(seen) <= 7 and sum(seen) == len(y)
    ref = torch.log_softmax(model.lm_head(h), -1)
    assert torch.allclose(res["logp"], ref.gather(-1, y[:, None]).squeeze(-1), atol=1e-5)
    assert torch.allclose(res["entropy"], -(ref.exp() * ref).sum(-1), atol=1e-5)
    assert torch.equal(res["topk_ids"], ref.topk(4, -1).indices)
    assert not res["logp"].requires_grad
    empty = token_logprobs(head, h[:0], y[:0], chunk_size=7, topk=4)
    assert empty["logp"].shape == (0,) and empty["topk_ids"].shape == (0, 4)


def test_compute_dtype_output_layer(model):
    """A bf16 compute dtype over float32 weights (trainer.bf16): the GEMM takes bf16 operands
    and accumulates in float32; logits are float32, equal to the float32 product of the
    bf16-rounded operands, and within bf16 rounding of the float32 layer's."""
    from mmopd.logprobs import projection

    h = torch.randn(5, model.config.hidden_size)
    fp32 = projection(model)(h)
    bf16 = projection(model, dtype=torch.bfloat16)
    w, _ = bf16.operands()
    assert w.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    got = bf16(h)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, h.bfloat16().float() @ w.float().T, atol=1e-5, rtol=1e-5)
    assert float((got - fp32).abs().max()) < 0.05 * float(fp32.abs().max())
    assert not torch.equal(got, fp32)  # the operands really were rounded


def test_final_hidden_keeps_only_the_last_layers_states(model):
    """The decoder's output, with no per-layer hidden states kept (a [B, T, H] tensor per layer,
    copied to float32 under accelerate's mixed precision): the same states the model's own
    output layer turns into its logits."""
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (2, 9))
    outputs = []
    handle = model.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        h = final_hidden(model, ids, torch.ones_like(ids))
    finally:
        handle.remove()
    assert len(outputs) == 1 and outputs[0].hidden_states is None
    ref = model(ids, output_hidden_states=True)
    torch.testing.assert_close(h, ref.hidden_states[-1], atol=0, rtol=0)
    torch.testing.assert_close(model.lm_head(h), ref.logits, atol=1e-6, rtol=0)


def test_scorer_keeps_hidden_states_of_the_asked_tokens_only(model):
    """Diagnostics read a sample of a batch's tokens: only those tokens' hidden states are kept
    (across micro-batch boundaries), equal to the rows of the full set."""
    from mmopd.teachers.scorer import HFScorer

    g = torch.Generator().manual_seed(0)
    eps = []
    for n_reply in (3, 7, 1, 5, 4):
        ep = Episode([], [], [], [], prompt_len=0)
        ep.append(torch.randint(3, 90, (4,), generator=g).tolist(), student=False)
        ep.prompt_len = 4
        ep.append(torch.randint(3, 90, (n_reply,), generator=g).tolist(), student=True)
        eps.append(ep)
    scorer = HFScorer(model, 0, micro_batch_size=2)
    full = scorer.score(eps, keep_hidden=True)
    rows = torch.tensor([0, 2, 3, 9, 10, 19])  # 20 tokens; the rows span all micro-batches
    some = scorer.score(eps, keep_hidden=rows)
    assert full.hidden_NH.shape[0] == 20 and some.hidden_NH.shape[0] == len(rows)
    torch.testing.assert_close(some.hidden_NH, full.hidden_NH[rows], atol=0, rtol=0)
    torch.testing.assert_close(some.hidden_at(rows[[1, 4]]), full.hidden_NH[rows[[1, 4]]])
    with pytest.raises(IndexError):
        some.hidden_at(torch.tensor([1]))
    assert scorer.score(eps).hidden_NH is None


def test_packed_scoring_equals_padded(model):
    """Episodes packed into one row per micro-batch (positions restarting, no padding) score as
    right-padded rows do, to float32 precision, and come back in episode order whatever
    micro-batch the balance put them in."""
    from mmopd.episode import balanced_parts
    from mmopd.teachers.scorer import HFScorer

    g = torch.Generator().manual_seed(0)
    eps = []
    for n_reply in (3, 17, 1, 5, 9, 2, 30):
        ep = Episode([], [], [], [], prompt_len=0)
        n_prompt = int(torch.randint(2, 20, (1,), generator=g))
        ep.append(torch.randint(3, 90, (n_prompt,), generator=g).tolist(), student=False)
        ep.prompt_len = n_prompt
        ep.append(torch.randint(3, 90, (n_reply,), generator=g).tolist(), student=True)
        eps.append(ep)
    padded = HFScorer(model, 0, micro_batch_size=3, packed=False).score(eps, topk=3,
                                                                         keep_hidden=True)
    for micro, context in ((3, None), (100, None), (3, 1.0), (100, 1.0), (100, 40.0)):
        scorer = HFScorer(model, 0, micro_batch_size=micro, packed=True)
        scorer.context = context  # one row (flash-attention), one sequence per row, or between
        packed = scorer.score(eps, topk=3, keep_hidden=True)
        torch.testing.assert_close(packed.logp_N, padded.logp_N, atol=1e-5, rtol=0)
        torch.testing.assert_close(packed.entropy_N, padded.entropy_N, atol=1e-5, rtol=0)
        assert torch.equal(packed.topk_ids_NK, padded.topk_ids_NK)
        torch.testing.assert_close(packed.hidden_NH, padded.hidden_NH, atol=1e-5, rtol=0)
    lengths = [len(ep.input_ids) for ep in eps]
    parts = balanced_parts(lengths, 3)
    assert len(parts) == 3 and sorted(i for p in parts for i in p) == list(range(7))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)
    assert len(balanced_parts(lengths, 100, max_tokens=40)) == -(-sum(lengths) // 40)


def test_packed_rows_weigh_attention_against_padding():
    """Without variable-length attention kernels (SDPA, eager: attention spans a whole row) a
    packed micro-batch lays its sequences out first-fit decreasing in rows of the width whose
    forward costs least: one row where attention is cheap next to the linear layers, rows as
    long as the longest sequence where it is not; positions restart at each sequence and at
    each row's tail padding."""
    from mmopd.episode import pack, pack_rows, packed_width, pad_right

    lengths = [50, 3, 20, 31, 7, 48, 12, 2, 29, 40]
    seqs = [[i + 1] * n for i, n in enumerate(lengths)]
    masks = [[0] + [1] * (n - 1) for n in lengths]
    assert packed_width(lengths, None) == packed_width(lengths, 1e9) == sum(lengths)
    assert packed_width(lengths, 1.0) == max(lengths)
    rows = pack_rows(lengths, max(lengths))
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= max(lengths) for r in rows)
    b = pack(seqs, masks, width=max(lengths), pad_id=0)
    assert b.input_ids.shape == (len(rows), max(lengths))
    assert b.order == [i for r in rows for i in r]
    assert b.padding == b.input_ids.numel() - sum(lengths)
    assert b.padding < pad_right(seqs, masks, 0).padding / 3
    for r, row in enumerate(rows):  # the row's sequences, then its padding
        want = [t for i in row for t in seqs[i]]
        assert b.input_ids[r, :len(want)].tolist() == want
        assert b.position_ids[r, :len(want)].tolist() == [p for i in row
                                                         for p in range(lengths[i])]
        assert b.position_ids[r, len(want):].tolist() == list(range(max(lengths) - len(want)))
        assert int(b.loss_mask[r].sum()) == sum(lengths[i] - 1 for i in row)
    one = pack(seqs, masks)  # one row, in order, no padding
    assert one.input_ids.shape == (1, sum(lengths)) and one.padding == 0 and one.order is None


def test_attention_context_from_the_model_shape(model):
    """The row length at which attention costs as much as the linear layers: Qwen2.5-0.5B's
    published shape gives 8,320 tokens (so its micro-batches pack into one row), a tiny
    model's a few hundred; flash-attention has none (one row)."""
    from transformers import Qwen2Config

    from mmopd.teachers.scorer import HFScorer, attention_context

    def of(**kw):
        return attention_context(type("M", (), {"config": Qwen2Config(**kw)})())

    qwen05 = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864)
    assert of(**qwen05) == (2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864) / (2 * 896)
    assert round(of(**qwen05)) == 8320
    assert of(hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
              intermediate_size=256) == 512
    assert of(**qwen05, attn_implementation="flash_attention_2") is None
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert HFScorer(model, 0).context == attention_context(model) > 0



def test_entropy_can_be_left_out(model):
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (2, 9))
    h = final_hidden(model, ids, torch.ones_like(ids))[:, :-1].reshape(-1, model.config.hidden_size)
    y = ids[:, 1:].reshape(-1)
    full = token_logprobs(lm_head_fn(model), h, y, chunk_size=5)
    bare = token_logprobs(lm_head_fn(model), h, y, chunk_size=5, entropy=False)
    assert torch.equal(full["logp"], bare["logp"]) and bare["entropy"].isnan().all()
    assert full["entropy"].isfinite().all()


def test_in_process_teachers_compute_entropy_only_where_read(tiny_overrides):
    """Only EOPD reads the teacher's entropy: other objectives' teachers skip it."""
    from mmopd.config import TrainConfig, load_config
    from mmopd.envs import make_env
    from mmopd.models import load_model, load_tokenizer
    from mmopd.objectives import OBJECTIVES
    from mmopd.rollout.evaluate import EnvPool
    from mmopd.training.teachers import build_teachers

    for name, wanted in (("opd", False), ("reopold", False), ("rkl", False), ("eopd", True)):
        cfg = load_config(TrainConfig, None, [*tiny_overrides, f"objective.name={name}"])
        tok = load_tokenizer(cfg.model)
        got = build_teachers(cfg, OBJECTIVES[name], load_model(cfg.model, tok), tok, None,
                             EnvPool(lambda c=cfg: make_env(c.env.id, **c.env.kwargs)),
                             torch.device("cpu"))
        assert got.scorer.entropy is wanted, name


def test_sampler_logprobs_match_teacher_forced_scores(model, tokenizer):
    r = ChatRenderer(tokenizer)
    sampler = HFSampler(model, tokenizer, batch_size=5, stop_token_ids=r.stop_token_ids)
    prompts = [r.prompt([{"role": "user", "content": q}]) for q in ["1+1=", "23+45=", "9="]]
    # a checkpoint's own sampling defaults must not leak into on-policy sampling
    model.generation_config.repetition_penalty = 5.0
    torch.manual_seed(0)
    try:
        out = sampler.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12))
    finally:
        assert model.generation_config.repetition_penalty == 5.0  # restored afterwards
        model.generation_config.repetition_penalty = 1.0
    assert [len(o) for o in out] == [3, 3, 3]
    eps = []
    for p, samples in zip(prompts, out):
        for s in samples:
            assert 1 <= len(s.token_ids) <= 12 and len(s.logprobs) == len(s.token_ids)
            assert s.stop_reason in ("eos", "length")
            if s.stop_reason == "eos":
                assert s.token_ids[-1] in sampler.eos_ids
            eps.append(Episode(p + s.token_ids, [0] * len(p) + [1] * len(s.token_ids),
                               [-1] * len(p) + [0] * len(s.token_ids),
                               [0.0] * len(p) + s.logprobs, len(p)))
    scores = HFScorer(model, tokenizer.pad_token_id, view="student",
                      micro_batch_size=4, chunk_size=5).score(eps)
    sampled = torch.tensor([lp for e in eps for lp, m in zip(e.sampled_logprobs, e.loss_mask)
                            if m])
    # left-padded batched generation vs right-padded teacher forcing: same distribution
    assert torch.allclose(scores.logp_N, sampled, atol=1e-4)


def test_sampler_stop_strings_and_length(model, tokenizer):
    r = ChatRenderer(tokenizer)
    # as with Qwen, the pad token is also an end token: rows that stop on a string get padded
    # with it, and that pad must not count as a sampled token
    sampler = HFSampler(model, tokenizer, stop_token_ids={tokenizer.pad_token_id})
    prompt = r.prompt([{"role": "user", "content": "x"}])
    torch.manual_seed(1)
    [samples] = sampler.generate([prompt], SamplingParams(n=16, max_new_tokens=40, stop=["e"]))
    stops = [s for s in samples if s.stop_reason == "stop"]
    assert stops, "a random char model emits 'e' within 40 tokens"
    for s in stops:  # the stop string completes exactly at the last token
        assert "e" in tokenizer.decode(s.token_ids)
        assert "e" not in tokenizer.decode(s.token_ids[:-1])
    [[greedy]] = sampler.generate([prompt], SamplingParams(n=1, temperature=0.0,
                                                           max_new_tokens=3))
    assert greedy.stop_reason in ("length", "eos") and len(greedy.token_ids) <= 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` (ids of probability 0 excluded), dof."""
    expected = probs / probs.sum() * counts.sum()
    live = expected > 0
    return float(((counts - expected)[live] ** 2 / expected[live]).sum()), int(live.sum()) - 1


def test_sample_rows_follows_the_probabilities():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 600) * 2, -1)
    probs[0, 256:512] = 0  # a whole block of zeros
    probs[1, [0, 255, 256, 599]] = 0  # zeros at block edges and the last id
    probs[2, :] = 0
    probs[2, 300] = 1e-3  # unnormalised rows are fine
    draws = sample_rows(probs.repeat(20000, 1)).view(20000, 3)
    for r in range(3):
        counts = torch.bincount(draws[:, r], minlength=600).float()
        assert counts[probs[r] == 0].sum() == 0, "an id of probability 0 was drawn"
        stat, dof = _chi2(counts, probs[r])
        assert stat < dof + 6 * (2 * max(dof, 1)) ** 0.5, (r, stat, dof)


def test_sample_rows_draws_tiny_tail_tokens_at_their_rate():
    # one token holds 0.9; 150k others share 0.1, each ~7e-7: far below a float32 running sum's
    # resolution near 1, so a flat float32 inverse CDF would misplace their mass
    v = 151_936
    z = torch.full((v,), -1e4)
    z[7] = 0.0
    z[1000:] = math.log(0.1 / (v - 1000)) - math.log(0.9)
    probs = torch.softmax(z, -1)
    torch.manual_seed(1)
    n, tail = 40_000, 0
    for _ in range(n // 2000):
        tail += int((sample_rows(probs.expand(2000, -1).contiguous()) >= 1000).sum())
    expected = float(probs[1000:].sum())
    assert abs(tail / n - expected) < 4 * (expected * (1 - expected) / n) ** 0.5


def test_sample_rows_refuses_rows_with_nothing_to_draw():
    with pytest.raises(RuntimeError, match="not finite or sums to 0"):
        sample_rows(torch.zeros(2, 10))
    with pytest.raises(RuntimeError, match="not finite"):
        sample_rows(torch.full((1, 10), float("nan")))


def test_sampler_draws_from_the_tempered_nucleus(model, tokenizer):
    """HFSampler's first sampled token across many samples of one prompt: the model's
    next-token distribution at temperature 0.7, cut to the top-p 0.8 nucleus."""
    r = ChatRenderer(tokenizer)
    prompt = r.prompt([{"role": "user", "content": "12+3="}])
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    probs = torch.softmax(logits / 0.7, -1)
    order = probs.argsort(descending=True)
    inside = torch.zeros_like(probs, dtype=torch.bool)
    inside[order[: int((probs[order].cumsum(0) < 0.8).sum()) + 1]] = True
    nucleus = torch.where(inside, probs, 0.0)
    sampler = HFSampler(model, tokenizer, batch_size=1000)
    torch.manual_seed(2)
    [samples] = sampler.generate([prompt], SamplingParams(n=4000, temperature=0.7, top_p=0.8,
                                                          max_new_tokens=1))
    first = torch.tensor([s.token_ids[0] for s in samples])
    counts = torch.bincount(first, minlength=probs.numel()).float()
    assert counts[~inside].sum() == 0, "a token outside the nucleus was sampled"
    stat, dof = _chi2(counts, nucleus)
    assert dof >= 2 and stat < dof + 6 * (2 * dof) ** 0.5, (stat, dof)
    # the recorded log-prob is the model's own (temperature 1, no top-p) log-prob
    full = torch.log_softmax(logits, -1)
    assert all(abs(s.logprobs[0] - float(full[s.token_ids[0]])) < 1e-4 for s in samples[:50])


def test_pad_right():
    b = pad_right([[1, 2, 3], [4]], [[0, 1, 1], [1]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.loss_mask.tolist() == [[False, True, True], [True, False, False]]


def test_char_tokenizer_survives_autotokenizer_next_to_a_model_config(tmp_path):
    """Saved beside a Qwen2 config.json, AutoTokenizer resolves the model family's tokenizer
    class; the tiny tokenizer must come back identical (spaces and newlines included)."""
    from transformers import AutoTokenizer, Qwen2Config

    from mmopd.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(tmp_path)
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "12 + 30 =\n\\boxed{42}"
    ids = tok.encode(text, add_special_tokens=False)
    assert again.encode(text, add_special_tokens=False) == ids and len(ids) == len(text)
    assert again.decode(ids) == text
    msgs = [{"role": "user", "content": "a b\nc"}]
    assert ChatRenderer(again).prompt(msgs) == ChatRenderer(tok).prompt(msgs)


def test_bf16_head_takes_float32_hidden_states(student_dir):
    """Under bf16 autocast the forward returns float32 hidden states; a bf16 output layer
    applied outside autocast must still work (and give float32 logits)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.bfloat16)
    logits = lm_head_fn(m, vocab=50)(torch.randn(3, m.config.hidden_size))
    assert logits.dtype == torch.float32 and logits.shape == (3, 50)


def test_trainable_models_keep_float32_master_weights():
    from mmopd.models import resolve_dtype

    assert resolve_dtype("auto", trainable=True) == torch.float32
    assert resolve_dtype("bfloat16", trainable=True) == torch.bfloat16  # explicit wins


def test_constant_schedule_honours_warmup():
    from mmopd.config import OptimConfig
    from mmopd.training.optim import make_optimizer, make_scheduler

    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(lr=1.0))
    sched = make_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=4), 10)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
