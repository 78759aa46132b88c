"""Lightning OPD: score a fixed set of student rollouts with the teacher once, keep the teacher's
per-token log-probs, entropies and top-k on disk, and distil later without a live teacher.

`mmopd cache-teacher CONFIG --out DIR --batches N` rolls out N batches with the initial student
(the config's env, rollout settings and seed), scores them with the config's teacher and writes
DIR/teacher_cache.pt. A run with `teacher.kind: cache` and `teacher.cache: DIR` then draws its
batches from the cache; `TeacherCache.score` stands in for the teacher. Sampled-token objectives
(opd, reopold, ...) and top-k objectives over the teacher's ids (`objective.topk_source: teacher`,
with `teacher.topk` set when caching) work from the cache; full-vocabulary objectives need a live
teacher and are rejected when the config is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mmopd.episode import Episode
from mmopd.teachers.scorer import KeepHidden, TokenScores

CACHE_FILE = "teacher_cache.pt"
_VERSION = 1
_META_KEYS = ("answer", "correct", "problem_id", "pred")  # plain values kept from env info


class CacheError(ValueError):
    """A teacher cache is missing, incomplete, or does not fit this run."""


def vocab_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A fingerprint of the token vocabulary: cached log-probs are over these ids."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass
class TeacherCache:
    """Cached episodes and the teacher's per-token scores, flat over their student tokens."""

    episodes: list[Episode]
    scores: TokenScores
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        counts = [ep.num_generated for ep in self.episodes]
        self._offsets = [0]
        for c in counts:
            self._offsets.append(self._offsets[-1] + c)
        if self._offsets[-1] != self.scores.logp_N.numel():
            raise CacheError(f"teacher cache: {self.scores.logp_N.numel()} scored tokens for "
                             f"{self._offsets[-1]} student tokens; the file is inconsistent")
        for i, ep in enumerate(self.episodes):
            ep.metadata["cache_index"] = i

    @property
    def topk(self) -> int:
        ids = self.scores.topk_ids_NK
        return 0 if ids is None else int(ids.shape[1])

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        eps = [{**ep.__dict__, "metadata": {k: v for k, v in ep.metadata.items()
                                            if k in _META_KEYS}} for ep in self.episodes]
        s = self.scores
        torch.save({"version": _VERSION, "meta": self.meta, "episodes": eps,
                    "scores": {"logp": s.logp_N, "entropy": s.entropy_N,
                               "topk_ids": s.topk_ids_NK, "topk_logp": s.topk_logp_NK}},
                   out / CACHE_FILE)
        return out / CACHE_FILE

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        f = Path(path)
        f = f / CACHE_FILE if f.is_dir() else f
        if not f.is_file():
            raise CacheError(f"teacher.cache: {path!r} has no {CACHE_FILE}; build one with "
                             "`mmopd cache-teacher CONFIG --out DIR`")
        try:
            # a file this project wrote (episodes are dataclasses): not a weights-only load
            data = torch.load(f, weights_only=False)
            if data.get("version") != _VERSION:
                raise CacheError(f"teacher.cache: {f} has format version {data.get('version')}; "
                                 f"this mmopd reads version {_VERSION} (rebuild the cache)")
            s = data["scores"]
            scores = TokenScores(s["logp"], s["entropy"], s["topk_ids"], s["topk_logp"])
            return cls([Episode(**e) for e in data["episodes"]], scores, data["meta"])
        except CacheError:
            raise
        except Exception as e:  # truncated or foreign files
            raise CacheError(f"teacher.cache: cannot read {f}: {type(e).__name__}: {e}") from None

    def check_fits(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """The cache's token ids must be the student's: same vocabulary as when it was built."""
        want = self.meta.get("vocab_digest")
        if want is not None and want != vocab_digest(tokenizer):
            raise CacheError("teacher.cache: it was built with another tokenizer (vocabulary "
                             "fingerprints differ); rebuild it for this student")

    def batch(self, index: int, size: int, seed: int) -> list[Episode]:
        """The `index`-th batch of `size` cached episodes: epochs over the cache, each in a
        seeded order, so a resumed run sees the same batches."""
        n = len(self.episodes)
        orders: dict[int, list[int]] = {}  # one permutation per epoch the batch touches
        out = []
        for j in range(index * size, (index + 1) * size):
            epoch, pos = divmod(j, n)
            if epoch not in orders:
                gen = torch.Generator().manual_seed(seed + epoch)
                orders[epoch] = torch.randperm(n, generator=gen).tolist()
            out.append(self.episodes[orders[epoch][pos]])
        return out

    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: KeepHidden = False) -> TokenScores:
        """The cached teacher scores of these episodes' student tokens, in order (the Teacher
        protocol)."""
        if keep_hidden is not False:
            raise CacheError("full-vocabulary objectives need a live teacher; a cache holds "
                             "log-probs and top-k only")
        if topk > self.topk:
            raise CacheError(f"the objective needs the teacher's top-{topk} but the cache holds "
                             f"top-{self.topk} (rebuild it with teacher.topk={topk})")
        idx = torch.cat([torch.arange(self._offsets[i], self._offsets[i + 1]) for i in
                         (ep.metadata["cache_index"] for ep in episodes)]).long()
        s = self.scores
        pick = (lambda t: None if t is None or not topk else t[idx, :topk])
        return TokenScores(s.logp_N[idx], s.entropy_N[idx], pick(s.topk_ids_NK),
                           pick(s.topk_logp_NK))


def build_teacher_cache(cfg: Any, out: str | Path, num_batches: int) -> Path:
    """Roll out `num_batches` batches with the config's initial student, score them with its
    teacher (top-k from teacher.topk), and save the cache to `out`."""
    from mmopd.envs import import_env_modules, make_env
    from mmopd.models import check_same_vocab, load_model, load_tokenizer, load_vision
    from mmopd.rollout.agent_loop import collect_episodes
    from mmopd.rollout.evaluate import EnvPool
    from mmopd.rollout.render import ChatRenderer
    from mmopd.rollout.sampler import HFSampler, SamplingParams
    from mmopd.rollout.seeds import PROBLEMS, SAMPLING, derived_seed
    from mmopd.rollout.toolcalls import make_parser
    from mmopd.teachers.scorer import HFScorer

    if cfg.teacher.model is None:
        raise CacheError("cache-teacher: the config needs teacher.model (the teacher to cache)")
    rcfg, seed = cfg.rollout, cfg.trainer.seed
    import_env_modules(cfg.env.imports)
    pool = EnvPool(lambda: make_env(cfg.env.id, **cfg.env.kwargs))
    tok = load_tokenizer(cfg.model)
    vision = load_vision(cfg.model, tok)
    student = load_model(cfg.model, tok, vision=vision)
    t_tok = load_tokenizer(cfg.teacher.model, "teacher.model")
    t_vision = load_vision(cfg.teacher.model, t_tok, "teacher.model")
    teacher = load_model(cfg.teacher.model, t_tok, "teacher.model", vision=t_vision)
    check_same_vocab(tok, t_tok, teacher, student)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student.to(device), teacher.to(device)
    renderer = ChatRenderer(tok, vision)
    sampler = HFSampler(student, tok, batch_size=rcfg.batch_size,
                        stop_token_ids=renderer.stop_token_ids,
                        suppress_token_ids=vision.special_ids if vision else None)
    vocab = min(student.get_output_embeddings().weight.shape[0],
                teacher.get_output_embeddings().weight.shape[0])
    scorer = HFScorer(teacher, tok.pad_token_id,
                      view="teacher" if cfg.teacher.view == "privileged" else "student",
                      micro_batch_size=cfg.trainer.micro_batch_size,
                      chunk_size=cfg.trainer.chunk_size, topk_vocab=vocab)
    params = SamplingParams(n=rcfg.samples_per_prompt, temperature=rcfg.temperature,
                            top_p=rcfg.top_p, max_new_tokens=rcfg.max_new_tokens, stop=rcfg.stop)
    episodes: list[Episode] = []
    parts: list[TokenScores] = []
    for b in range(num_batches):
        torch.manual_seed(derived_seed(seed, b, SAMPLING))
        starts = [{"seed": derived_seed(seed, b, PROBLEMS, i)}
                  for i in range(rcfg.prompts_per_batch)]
        eps = [ep for ep in collect_episodes(
            pool.take(len(starts) * params.n), starts, sampler, renderer, params,
            teacher_view=cfg.teacher.view == "privileged", max_turns=rcfg.max_turns,
            max_episode_tokens=rcfg.max_episode_tokens, parser=make_parser(rcfg.tool_parser),
            env_id=cfg.env.id, desc=f"cache batch {b + 1}/{num_batches}",
            env_timeout_s=rcfg.env_timeout_s) if ep.input_ids]
        if not eps:
            continue
        for ep in eps:
            ep.group += b * rcfg.prompts_per_batch  # groups stay distinct across batches
        parts.append(scorer.score(eps, topk=cfg.teacher.topk))
        episodes += eps
    if not episodes:
        raise CacheError("cache-teacher: every episode failed to start; nothing to cache")
    cat = (lambda xs: None if xs[0] is None else torch.cat(xs))
    scores = TokenScores(torch.cat([p.logp_N for p in parts]),
                         torch.cat([p.entropy_N for p in parts]),
                         cat([p.topk_ids_NK for p in parts]), cat([p.topk_logp_NK for p in parts]))
    meta = {"teacher": cfg.teacher.model.path, "student": cfg.model.path or "tiny",
            "env": cfg.env.id, "view": cfg.teacher.view, "batches": num_batches,
            "vocab_digest": vocab_digest(tok)}
    return TeacherCache(episodes, scores, meta).save(out)
