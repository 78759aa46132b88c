"""A teacher with another tokenizer and chat template, scoring the student's own episodes.

What is aligned. For each student turn, the reply text is the student's tokens decoded (as the
agent loop decodes them for the env). The teacher reads the episode's conversation rendered in its
own chat template, with those replies as the assistant messages; the reply is found in that
rendering right after the teacher's generation prompt for the turn (only whitespace between; a
template that trims replies is fine). Both token sequences are then cut into spans at the character
positions where both have a token boundary: a span is the shortest run of student tokens and the
run of teacher tokens that cover exactly the same characters of the reply. The student's
end-of-turn token is aligned with the teacher's end-of-turn token right after the reply.

What it gives. The span's total teacher log-prob T (sum over its teacher tokens) and, once the
student's own log-probs are known, per student token i of a span of n tokens with student total S:
log pi_T(i) = log pi_old(i) + (T - S) / n. The span's summed reward log pi_T - log pi_old is then
exactly the teacher-student log-ratio of its text, so every sampled-token objective (opd, reopold,
gopd, SOD weighting) runs unchanged; a span of one token on each side gets the teacher's token
log-prob itself.

What is not aligned, and counts as such (reward 0, metric teacher/unaligned_frac, reasons in
`last_stats`): reply whitespace the teacher's template trims, a student token that ends inside a
character with no common boundary before the reply's end, a turn whose decoded text differs from
the message the env saw, a template that renders earlier turns differently once a reply follows
(not prefix-stable), a conversation the teacher's template cannot render, and an end-of-turn token
the teacher has no special token for. No token is scored against text it does not cover.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from mmopd.episode import Episode
from mmopd.teachers.scorer import HFScorer, KeepHidden, TokenScores


def student_offsets(tok: Any, ids: list[int]) -> tuple[str, list[int | None]]:
    """The decoded text of `ids` and, for each position j in 0..len(ids), the character offset
    at which token j starts (len(text) for j = len(ids)), or None where no boundary exists (a
    token that ends inside a character, or a decoding that later text changes)."""
    text = tok.decode(ids, skip_special_tokens=True)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) == list(ids):  # canonical tokenisation: offsets in one pass
        return text, _boundaries([tuple(o) for o in enc["offset_mapping"]], len(text))
    out: list[int | None] = []
    for j in range(len(ids) + 1):  # sampled ids are not always the canonical ones
        prefix = tok.decode(ids[:j], skip_special_tokens=True)
        out.append(len(prefix) if text.startswith(prefix) and "\ufffd" not in prefix[-1:]
                   else None)
    out[-1] = len(text)
    return text, out


def _boundaries(offsets: list[tuple[int, int]], end: int) -> list[int | None]:
    """Token start offsets where the whole text before is covered by earlier tokens only."""
    out: list[int | None] = []
    reach = 0
    for s, e in offsets:
        out.append(s if reach <= s else None)
        reach = max(reach, e)
    out.append(end if reach <= end else None)
    return out


def align_spans(s_bounds: list[int | None], t_offsets: list[tuple[int, int]], lo: int,
                hi: int) -> list[tuple[list[int], list[int]]]:
    """Spans of a reply: (student token indices, teacher token indices) covering the same
    characters. `s_bounds`: student start offsets (student_offsets); `t_offsets`: teacher token
    (start, end) in the reply's coordinates; [lo, hi): the part of the reply the teacher's
    rendering holds verbatim. Student tokens outside every span are unaligned."""
    t_starts = _boundaries(t_offsets, hi)
    t_at: dict[int, int] = {}
    for k, s in enumerate(t_starts):
        if s is not None and lo <= s <= hi:
            t_at.setdefault(s, k)
    s_at: dict[int, int] = {}
    for j, s in enumerate(s_bounds):
        if s is not None:
            s_at.setdefault(s, j)
    common = sorted(p for p in set(s_at) & set(t_at) if lo <= p <= hi)
    spans = []
    for a, b in zip(common, common[1:]):
        sj, tj = list(range(s_at[a], s_at[b])), list(range(t_at[a], t_at[b]))
        if sj and tj and _covers([t_offsets[k] for k in tj], a, b):
            spans.append((sj, tj))
    return spans


def _covers(offsets: list[tuple[int, int]], a: int, b: int) -> bool:
    """Do these tokens cover [a, b) with no gap (text a tokenizer dropped: no token for it)?"""
    reach = a
    for s, e in offsets:
        if s > reach:
            return False
        reach = max(reach, e)
    return reach == b


def spread_spans(logp_old_N: torch.Tensor, span_logp_N: torch.Tensor,
                 span_N: torch.Tensor) -> torch.Tensor:
    """Per-token teacher log-probs from span totals (see the module doc): log pi_old + (T - S)/n
    on aligned tokens, the teacher's own log-prob on one-token spans, log pi_old (reward 0) on
    unaligned ones."""
    old = logp_old_N.float()
    aligned = span_N >= 0
    if not bool(aligned.any()):
        return old.clone()
    ids = span_N.clamp(min=0)
    size = int(ids.max()) + 1
    s_tot = torch.zeros(size).index_add_(0, ids[aligned], old[aligned])
    cnt = torch.zeros(size).index_add_(0, ids[aligned], torch.ones(int(aligned.sum())))
    spread = old + (span_logp_N.float() - s_tot[ids]) / cnt[ids].clamp(min=1)
    spread = torch.where(cnt[ids] == 1, span_logp_N.float(), spread)
    return torch.where(aligned, spread, old)


class CrossTokenizerTeacher:
    """The Teacher protocol for an in-process model with its own tokenizer and template."""

    def __init__(self, model: Any, tokenizer: Any, student_tokenizer: Any, *,
                 micro_batch_size: int = 16, chunk_size: int = 256) -> None:
        if not getattr(tokenizer, "is_fast", False) or not getattr(student_tokenizer, "is_fast",
                                                                   False):
            raise ValueError("cross-tokenizer distillation maps text by character offsets; both "
                             "tokenizers must be fast (Rust) tokenizers")
        self.tok, self.s_tok = tokenizer, student_tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        self.scorer = HFScorer(model, pad, micro_batch_size=micro_batch_size,
                               chunk_size=chunk_size)
        self.special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.s_special = set(student_tokenizer.all_special_ids) | {
            i for i, t in student_tokenizer.added_tokens_decoder.items() if t.special}
        self.last_stats: dict[str, float] = {}

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def check(self, messages: list[dict[str, Any]]) -> None:
        """Before training: the teacher's template renders a probe conversation (the env's
        first prompt and a reply) and finds the reply where alignment will look for it."""
        probe = list(messages) + [{"role": "assistant", "content": "42 apples"}]
        try:
            _, found, why = self._plan_episode_text(probe, [len(probe) - 1])
        except Exception as e:  # jinja raises its own types for roles a template refuses
            raise ValueError(f"teacher.cross_tokenizer: the teacher's chat template cannot "
                             f"render the student's conversation: {type(e).__name__}: {e}"
                             ) from None
        if found[0] is None:
            raise ValueError(f"teacher.cross_tokenizer: on a probe conversation, {why[0]}; "
                             "the teacher's template cannot be aligned with the student's "
                             "replies")

    def _plan_episode_text(self, messages: list[dict[str, Any]], turns: list[int],
                           ) -> tuple[str, list[tuple[int, int] | None], list[str]]:
        """The teacher's rendering and, per assistant message index in `turns`, the (start,
        end) of its stripped content in it (None with a reason where it cannot be found)."""
        full = self.render(messages)
        found: list[tuple[int, int] | None] = []
        why: list[str] = []
        for i in turns:
            pre = self.render(messages[:i], generation_prompt=True)
            content = str(messages[i].get("content") or "")
            body = content.strip()
            if not full.startswith(pre):
                found.append(None), why.append("template not prefix-stable")
                continue
            gap = full[len(pre):]
            lead = len(gap) - len(gap.lstrip())
            if not gap[lead:].startswith(body) or not body:
                found.append(None), why.append("reply not found in the teacher's rendering")
                continue
            found.append((len(pre) + lead, len(pre) + lead + len(body)))
            why.append("")
        return full, found, why

    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: KeepHidden = False) -> TokenScores:
        """Span totals (`span_N`, see the module doc) and, with `topk`, the teacher's top-k
        log-probs (sorted; its own ids, meaningless on the student's side) at the first token of
        each span, NaN elsewhere: the distribution of what comes next at the same point of the
        text, which ULD compares by sorted probabilities."""
        if keep_hidden is not False:
            raise ValueError("a cross-tokenizer teacher returns span log-probs and sorted top-k "
                             "only (its logits are over another vocabulary)")
        stats: Counter[str] = Counter()
        plans, pseudo = [], []
        for ep in episodes:
            plan = self._plan(ep, stats)
            plans.append(plan)
            t_ids, need = plan["t_ids"], plan["need"]
            if need:
                mask = [0] * len(t_ids)
                for k in need:
                    mask[k] = 1
                pseudo.append(Episode(t_ids, mask, [0] * len(t_ids), [0.0] * len(t_ids),
                                      prompt_len=min(need)))
        scored = self.scorer.score(pseudo, topk=topk) if pseudo else None
        n_all = sum(p["n"] for p in plans)
        logp, ent = torch.zeros(n_all), torch.zeros(n_all)
        span = torch.full((n_all,), -1, dtype=torch.long)
        top = torch.full((n_all, topk), float("nan")) if topk else None
        row0, cursor, next_span = 0, 0, 0
        for plan in plans:
            row = {k: cursor + i for i, k in enumerate(plan["need"])}  # scored row of a token
            cursor += len(plan["need"])
            for s_idx, t_idx in plan["spans"]:
                assert scored is not None
                rows = torch.tensor([row[k] for k in t_idx])
                pos = torch.tensor(s_idx) + row0
                logp[pos] = scored.logp_N[rows].sum()
                ent[pos] = scored.entropy_N[rows].mean()
                span[pos] = next_span
                if top is not None and scored.topk_logp_NK is not None:
                    top[pos[0]] = scored.topk_logp_NK[rows[0]].float()
                next_span += 1
            row0 += plan["n"]
        unaligned = int((span < 0).sum())
        self.last_stats = {"teacher/unaligned_frac": unaligned / max(n_all, 1),
                           "teacher/spans_per_token": next_span / max(n_all, 1),
                           **{f"teacher/unaligned/{k}": float(v) for k, v in stats.items()}}
        return TokenScores(logp_N=logp, entropy_N=ent, span_N=span, topk_logp_NK=top,
                           topk_ids_NK=torch.zeros((n_all, topk), dtype=torch.long)
                           if topk else None)

    def _plan(self, ep: Episode, stats: Counter[str]) -> dict[str, Any]:
        """One episode: the teacher's token ids, the teacher tokens to score, and spans as
        (student indices within the episode's generated tokens, teacher token indices)."""
        gen = [t for t, m in enumerate(ep.loss_mask) if m]
        plan: dict[str, Any] = {"t_ids": [], "need": [], "spans": [], "n": len(gen)}
        turns = sorted({ep.step_index[t] for t in gen})
        messages = list(ep.metadata.get("messages") or [])
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if len(assistant) < len(turns):
            stats["no conversation"] += len(gen)
            return plan
        msg_of = dict(zip(turns, assistant[len(assistant) - len(turns):]))
        try:
            full, found, why = self._plan_episode_text(messages, [msg_of[k] for k in turns])
        except Exception as e:  # the teacher's template refuses this conversation
            stats[f"template error: {type(e).__name__}"] += len(gen)
            return plan
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        t_ids, t_off = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        plan["t_ids"] = t_ids
        need: set[int] = set()
        for k, where, reason in zip(turns, found, why):
            pos = [j for j, t in enumerate(gen) if ep.step_index[t] == k]  # this turn's tokens
            ids = [ep.input_ids[gen[j]] for j in pos]
            end = len(ids)
            while end and ids[end - 1] in self.s_special:  # end-of-turn (and any special tail)
                end -= 1
            if where is None:
                stats[reason] += len(ids)
                continue
            text, bounds = student_offsets(self.s_tok, ids[:end])
            if text != str(messages[msg_of[k]].get("content") or ""):
                stats["reply text differs from the env's message"] += len(ids)
                continue
            cs, ce = where
            lead = len(text) - len(text.lstrip())
            inside = [(s - cs + lead, e - cs + lead) for s, e in t_off if s >= cs and e <= ce]
            first = next(i for i, (s, _) in enumerate(t_off) if s >= cs) if inside else 0
            spans = align_spans(bounds, inside, lead, lead + (ce - cs))
            for s_idx, t_idx in spans:
                plan["spans"].append(([pos[j] for j in s_idx], [first + i for i in t_idx]))
                need.update(first + i for i in t_idx)
            covered = sum(len(s) for s, _ in spans)
            if covered < end:
                stats["no common boundary / trimmed whitespace"] += end - covered
            if end < len(ids):  # the student's end-of-turn <-> the teacher's, right after
                nxt = next((i for i, (s, _) in enumerate(t_off) if s >= ce), None)
                if end == len(ids) - 1 and nxt is not None and t_off[nxt][0] == ce \
                        and t_ids[nxt] in self.special:
                    plan["spans"].append(([pos[end]], [nxt]))
                    need.add(nxt)
                else:
                    stats["end of turn without a teacher counterpart"] += len(ids) - end
        plan["need"] = sorted(need)
        return plan
