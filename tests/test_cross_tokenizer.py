"""Cross-tokenizer distillation: two different local tokenizers (a character-level one with a
ChatML template, a byte-level BPE with merges and a Gemma-shaped template), constructed texts, the
span alignment, the teacher's span log-probs against a direct computation, and a 2-step run."""

from __future__ import annotations

import json

import pytest
import torch

from mmopd.config import ConfigError, TrainConfig, load_config
from mmopd.episode import Episode
from mmopd.rollout.render import ChatRenderer
from mmopd.teachers.cross import (
    CrossTokenizerTeacher,
    align_spans,
    spread_spans,
    student_offsets,
)
from mmopd.tokenizer import build_bpe_tokenizer

TEXTS = ["Hello, world!", "12 + 34 = 46\n\nThe answer is 46.", "three plus five is eight",
         "a  b   c", "naïve café 東京 🙂 ok", "what is 7+8?The answer:15"]


@pytest.fixture(scope="module")
def bpe():
    return build_bpe_tokenizer()


@pytest.fixture(scope="module")
def bpe_teacher_dir(tmp_path_factory):
    """A tiny random model with the BPE tokenizer (its own vocabulary and template)."""
    from mmopd.config import ModelConfig, TinyModelConfig
    from mmopd.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("bpe-teacher")
    build_bpe_tokenizer(root / "tok")
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, intermediate_size=64,
                                           seed=5), tokenizer=str(root / "tok"))
    tok = load_tokenizer(cfg)
    load_model(cfg, tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def _check_bounds(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    decoded, bounds = student_offsets(tok, ids)
    assert len(bounds) == len(ids) + 1 and bounds[0] == 0 and bounds[-1] == len(decoded)
    for j, b in enumerate(bounds):
        if b is not None:  # a boundary: the tokens before decode to exactly the text before
            assert tok.decode(ids[:j], skip_special_tokens=True) == decoded[:b]
    return ids, decoded, bounds


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_are_exact_boundaries_in_both_tokenizers(text, tokenizer, bpe):
    ids, decoded, bounds = _check_bounds(bpe, text)
    assert decoded == text
    if not text.isascii():  # byte-level BPE splits some characters into several tokens
        assert None in bounds
    _check_bounds(tokenizer, text)


def test_offsets_of_a_non_canonical_sampled_sequence(bpe):
    """Sampled ids need not be the tokenizer's own split of their text."""
    ids = [bpe.convert_tokens_to_ids(c) for c in ["t", "h", "r", "e", "e"]]
    text, bounds = student_offsets(bpe, ids)
    assert text == "three" and bounds == [0, 1, 2, 3, 4, 5]
    assert bpe.encode(text, add_special_tokens=False) != ids


@pytest.mark.parametrize("text", TEXTS)
def test_spans_cover_the_same_text_on_both_sides(text, tokenizer, bpe):
    s_ids = tokenizer.encode(text, add_special_tokens=False)
    s_text, s_bounds = student_offsets(tokenizer, s_ids)
    enc = bpe(s_text, add_special_tokens=False, return_offsets_mapping=True)
    t_off = [tuple(o) for o in enc["offset_mapping"]]
    spans = align_spans(s_bounds, t_off, 0, len(s_text))
    covered = [j for s, _ in spans for j in s]
    assert covered == sorted(covered) and len(set(covered)) == len(covered)
    for s_idx, t_idx in spans:
        assert (tokenizer.decode([s_ids[j] for j in s_idx])
                == bpe.decode([enc["input_ids"][k] for k in t_idx]))
    if s_text == text:  # ASCII: both split the same string, so every token is in some span
        assert covered == list(range(len(s_ids)))
    if len(enc["input_ids"]) < len(s_ids) and s_text == text:
        assert len(spans) < len(s_ids)  # the BPE merges characters: some spans hold several


def test_spread_keeps_each_spans_log_ratio():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25])
    span = torch.tensor([0, 0, 1, -1, 2])
    total = torch.tensor([-4.0, -4.0, -0.7, 9.0, -0.125])
    t = spread_spans(old, total, span)
    assert torch.allclose(t[:2].sum(), torch.tensor(-4.0))  # span 0: T over two tokens
    assert torch.allclose((t[:2] - old[:2]), torch.tensor([-0.5, -0.5]))
    assert t[2] == -0.7 and t[4] == -0.125  # one-token spans: the teacher's own log-prob
    assert t[3] == old[3]  # unaligned: reward 0


def _episode(renderer, tok, messages, reply, *, eos=True):
    """An episode as the agent loop records it: prompt, the reply's ids (+ end of turn)."""
    prompt = renderer.render(messages).ids
    ids = tok.encode(reply, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])
    ep = Episode(list(prompt), [0] * len(prompt), [-1] * len(prompt), [0.0] * len(prompt),
                 prompt_len=len(prompt))
    ep.append(ids, student=True, step=0, logprobs=[0.0] * len(ids))
    ep.metadata["messages"] = list(messages) + [
        {"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}]
    return ep


@torch.no_grad()
def test_teacher_span_logprobs_match_a_direct_computation(tokenizer, bpe_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_tok = AutoTokenizer.from_pretrained(bpe_teacher_dir)
    t_model = AutoModelForCausalLM.from_pretrained(bpe_teacher_dir).eval()
    teacher = CrossTokenizerTeacher(t_model, t_tok, tokenizer, micro_batch_size=2)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3+5?"}]
    r = ChatRenderer(tokenizer)
    eps = [_episode(r, tokenizer, msgs, "The answer is 8."),
           _episode(r, tokenizer, msgs, "  8 ", eos=False),
           _episode(r, tokenizer, [{"role": "user", "content": "café?"}], "three plus five")]
    scores = teacher.score(eps)
    assert scores.logp_N.shape == scores.span_N.shape == (sum(e.num_generated for e in eps),)
    # the direct computation for episode 0: the teacher's rendering, its log-probs per token
    full = t_tok.apply_chat_template(eps[0].metadata["messages"], tokenize=False)
    enc = t_tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    logp = torch.log_softmax(t_model(ids).logits[0, :-1].float(), -1)
    tok_lp = logp.gather(1, ids[0, 1:, None])[:, 0]  # log p(token k), k >= 1, at index k-1
    start = full.index("The answer is 8.")
    end = start + len("The answer is 8.")
    inside = [k for k, (s, e) in enumerate(enc["offset_mapping"]) if s >= start and e <= end]
    n0 = eps[0].num_generated
    span0 = scores.span_N[:n0]
    assert (span0 >= 0).all()  # ASCII reply + end of turn: every student token is aligned
    # the reply's spans sum to the teacher's log-prob of the reply text, counted once per span
    firsts = [i for i in range(n0 - 1) if i == 0 or span0[i] != span0[i - 1]]
    assert torch.allclose(scores.logp_N[firsts].sum(), tok_lp[[k - 1 for k in inside]].sum(),
                          atol=1e-4)
    eot = t_tok.convert_tokens_to_ids("<end_of_turn>")
    k_eot = inside[-1] + 1
    assert enc["input_ids"][k_eot] == eot  # the student's <|im_end|> <-> the teacher's
    assert torch.allclose(scores.logp_N[n0 - 1], tok_lp[k_eot - 1], atol=1e-5)
    # episode 1: the template trims "  8 ": the whitespace tokens are unaligned, "8" is not
    n1 = eps[1].num_generated
    span1 = scores.span_N[n0: n0 + n1].tolist()
    assert span1 == [-1, -1, span1[2], -1] and span1[2] >= 0
    assert teacher.last_stats["teacher/unaligned/no common boundary / trimmed whitespace"] == 3
    # episode 2 (non-ASCII prompt, ASCII reply): the reply aligns, the prompt is context only
    assert (scores.span_N[n0 + n1:] >= 0).all()


def test_a_span_the_teacher_tokens_do_not_cover_is_unaligned():
    """Text a tokenizer dropped (no token for it) leaves a gap in its offsets: the span around
    it is not aligned, so no teacher log-prob stands for text it did not score."""
    s_bounds = [0, 2, 4, 6]  # student: "ab" "cd" "ef"
    t_off = [(0, 1), (1, 2), (3, 4), (4, 6)]  # teacher: "a" "b" (no token for "c") "d" "ef"
    assert align_spans(s_bounds, t_off, 0, 6) == [([2], [3])]  # "abcd" has a gap: unaligned


def test_a_reply_the_teacher_template_rewrites_is_unaligned_and_counted(tokenizer,
                                                                         bpe_teacher_dir):
    """A template that changes the reply's text (here: upper-cases it) cannot be aligned: the
    turn's tokens are unaligned (reward 0) and counted by reason."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_tok = AutoTokenizer.from_pretrained(bpe_teacher_dir)
    t_tok.chat_template = t_tok.chat_template.replace(
        "message['content'] | trim", "(message['content'] | upper if message['role'] == "
        "'assistant' else message['content']) | trim")
    teacher = CrossTokenizerTeacher(AutoModelForCausalLM.from_pretrained(bpe_teacher_dir),
                                    t_tok, tokenizer)
    ep = _episode(ChatRenderer(tokenizer), tokenizer, [{"role": "user", "content": "Hi"}],
                  "the answer is 8")
    scores = teacher.score([ep])
    assert (scores.span_N == -1).all()
    assert teacher.last_stats["teacher/unaligned_frac"] == 1.0
    assert teacher.last_stats["teacher/unaligned/reply not found in the teacher's rendering"] \
        == ep.num_generated
    with pytest.raises(ValueError, match="reply not found"):
        teacher.check([{"role": "user", "content": "Hi"}])


def test_probe_check_refuses_a_template_that_cannot_render(tokenizer, bpe_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_tok = AutoTokenizer.from_pretrained(bpe_teacher_dir)
    t_tok.chat_template = "{{ raise_exception('no system role') }}"
    teacher = CrossTokenizerTeacher(AutoModelForCausalLM.from_pretrained(bpe_teacher_dir),
                                    t_tok, tokenizer)
    with pytest.raises(ValueError, match="cannot render the student's conversation"):
        teacher.check([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("override,match", [
    (["objective.name=rkl"], "shared token ids"),
    (["objective.name=vopd"], "shared token ids"),
    (["teacher.topk=5"], "another vocabulary"),
    (["teacher.view=privileged"], "view=same"),
    (["teacher.kind=served", "teacher.served.url=http://x:1"], "kind=model"),
])
def test_config_refuses_what_needs_a_shared_vocabulary(override, match):
    """(uld is allowed: it compares sorted probabilities, no ids; its top-k defaults to 32.)"""
    cfg = load_config(TrainConfig, None, ["model.path=s", "teacher.model.path=t",
                                          "teacher.cross_tokenizer=true", "objective.name=uld"])
    assert cfg.objective.topk == 32
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, ["model.path=s", "teacher.model.path=t",
                                        "teacher.cross_tokenizer=true", *override])


def test_a_cross_tokenizer_run_trains(tiny_overrides, bpe_teacher_dir, tmp_path):
    """Two steps of REOPOLD with SOD weighting from a teacher with another tokenizer."""
    from mmopd.training.loop import train

    cfg = load_config(TrainConfig, None, [
        *tiny_overrides, f"teacher.model.path={bpe_teacher_dir}", "teacher.cross_tokenizer=true",
        "objective.name=reopold", "objective.step_weighting=sod", "trainer.report_to=none"])
    out = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert out["step"] == 2 and len(rows) == 2
    for row in rows:
        assert 0 <= row["teacher/unaligned_frac"] < 0.5
        assert row["teacher/spans_per_token"] > 0
        assert torch.isfinite(torch.tensor(row["loss"]))


def test_uld_across_tokenizers_trains_on_span_starts(tiny_overrides, bpe_teacher_dir,
                                                      tmp_path):
    """ULD needs no shared ids: the teacher's sorted top-k at the first token of each aligned
    span (what comes next at the same point of the text) against the student's there."""
    from mmopd.training.loop import train

    cfg = load_config(TrainConfig, None, [
        *tiny_overrides, f"teacher.model.path={bpe_teacher_dir}", "teacher.cross_tokenizer=true",
        "objective.name=uld", "objective.topk=16", "trainer.report_to=none"])
    assert train(cfg)["step"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # only span starts carry a teacher distribution
        assert 0 < row["kept_frac"] <= row["teacher/spans_per_token"] + 1e-6
        assert row["loss"] > 0


def test_a_different_tokenizer_without_cross_tokenizer_is_refused(tiny_overrides,
                                                                   bpe_teacher_dir):
    from mmopd.models import ModelLoadError
    from mmopd.training.loop import train

    cfg = load_config(TrainConfig, None, [*tiny_overrides,
                                          f"teacher.model.path={bpe_teacher_dir}"])
    with pytest.raises(ModelLoadError, match="cross_tokenizer=true"):
        train(cfg)
