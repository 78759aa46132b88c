"""Several teachers in one run: a router sends each episode to the teacher its route names and
puts the scores back together in the batch's token order, so the objective (and its token mean
over the whole minibatch) sees one flat batch whichever teacher scored each token.

    teachers:
      - {name: math, kind: model, model: {path: Qwen/Qwen2.5-Math-7B-Instruct}}
      - {name: tools, kind: served, served: {url: http://10.0.0.5:8000}}
    routing: {by: env, routes: {mmopd/MathText-v0: math, mmopd/ToolMath-v0: tools}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmopd.episode import Episode
from mmopd.teachers.scorer import KeepHidden, Teacher, TokenScores


class RouteError(RuntimeError):
    """An episode whose route names no teacher (and no default was given)."""


class RoutedTeacher:
    """The Teacher protocol over named teachers; `last_routes` holds the teacher name of each
    episode of the latest `score` call (per-teacher metrics read it)."""

    def __init__(self, teachers: Mapping[str, Teacher], key: str, routes: Mapping[str, str],
                 default: str | None = None, *, env_id: str = "env") -> None:
        unknown = sorted({*routes.values(), *([default] if default else [])} - set(teachers))
        if unknown:
            raise ValueError(f"routes name unknown teachers {unknown}; teachers: "
                             f"{sorted(teachers)}")
        self.teachers = dict(teachers)
        self.key, self.routes, self.default = key, {str(k): v for k, v in routes.items()}, default
        self.env_id = env_id  # episodes of a single (non-mixture) env carry no "env" field
        self.last_routes: list[str] = []
        self.last_stats: dict[str, float] = {}  # the teachers' own, named per teacher

    def route(self, ep: Episode) -> str:
        """The name of the teacher that scores `ep`."""
        value = ep.metadata.get(self.key, self.env_id if self.key == "env" else None)
        name = self.routes.get(str(value)) if value is not None else None
        if name is None:
            name = self.default
        if name is None:
            where = ("the episode has no metadata field " + repr(self.key) if value is None
                     else f"its {self.key} is {value!r}")
            raise RouteError(f"no teacher for an episode: {where}; routing.routes covers "
                             f"{sorted(self.routes)} (add a route or a routing.default)")
        return name

    def score(self, episodes: list[Episode], *, topk: int = 0,
              keep_hidden: KeepHidden = False) -> TokenScores:
        if keep_hidden is not False:
            raise ValueError("routed teachers return per-token log-probs; objectives that "
                             "rebuild a teacher's logits need one in-process teacher")
        names = [self.route(ep) for ep in episodes]
        counts = torch.tensor([ep.num_generated for ep in episodes])
        starts = torch.cumsum(counts, 0) - counts
        n = int(counts.sum())
        logp, ent = torch.empty(n), torch.empty(n)
        span = torch.full((n,), -1, dtype=torch.long)
        ids_NK = lp_NK = None
        any_spans = False
        next_span = 0
        stats: dict[str, float] = {}
        for name in dict.fromkeys(names):  # each teacher once, in order of first use
            idx = [i for i, x in enumerate(names) if x == name]
            pos = torch.cat([torch.arange(int(starts[i]), int(starts[i] + counts[i]))
                             for i in idx])
            s = self.teachers[name].score([episodes[i] for i in idx], topk=topk)
            logp[pos], ent[pos] = s.logp_N.float(), s.entropy_N.float()
            for k, v in (getattr(self.teachers[name], "last_stats", None) or {}).items():
                stats[k.replace("teacher/", f"teacher/{name}/", 1)] = v
            if s.span_N is not None:  # span numbers stay unique across teachers
                any_spans = True
                span[pos] = torch.where(s.span_N >= 0, s.span_N + next_span, -1)
                next_span += int(s.span_N.max()) + 1 if s.span_N.numel() else 0
            else:  # a token-level teacher: every token its own span
                span[pos] = torch.arange(next_span, next_span + len(pos))
                next_span += len(pos)
            if topk:
                if s.topk_ids_NK is None or s.topk_logp_NK is None:
                    raise ValueError(f"teacher {name!r} returned no top-k log-probs")
                if ids_NK is None:
                    ids_NK = torch.zeros((n, s.topk_ids_NK.shape[1]), dtype=torch.long)
                    lp_NK = torch.zeros((n, s.topk_ids_NK.shape[1]))
                assert lp_NK is not None
                ids_NK[pos], lp_NK[pos] = s.topk_ids_NK.cpu(), s.topk_logp_NK.float().cpu()
        self.last_routes, self.last_stats = names, stats
        return TokenScores(logp_N=logp, entropy_N=ent, topk_ids_NK=ids_NK, topk_logp_NK=lp_NK,
                           span_N=span if any_spans else None)


def teacher_metrics(names: Sequence[str], episodes: Sequence[Episode],
                    slices: Sequence[torch.Tensor], logp_old_N: torch.Tensor,
                    logp_teacher_N: torch.Tensor) -> dict[str, float]:
    """Per teacher: its episodes, their mean env reward and the mean sampled-token KL estimate
    (log pi_old - log pi_T) over their tokens."""
    out: dict[str, float] = {}
    for name in sorted(set(names)):
        idx = [i for i, x in enumerate(names) if x == name]
        tok = torch.cat([slices[i] for i in idx])
        out[f"teacher/{name}/episodes"] = len(idx)
        out[f"teacher/{name}/reward"] = sum(episodes[i].reward for i in idx) / len(idx)
        out[f"teacher/{name}/kl"] = (float((logp_old_N[tok] - logp_teacher_N[tok]).mean())
                                     if len(tok) else 0.0)
    return out


def kept_by_teacher(names: Sequence[str], slices: Sequence[torch.Tensor], mb: Sequence[int],
                    keep_N: torch.Tensor) -> dict[str, float]:
    """Per teacher: the fraction of its tokens in minibatch `mb` that the objective trains on."""
    out: dict[str, float] = {}
    for name in sorted({names[i] for i in mb}):
        tok = torch.cat([slices[i] for i in mb if names[i] == name])
        out[f"teacher/{name}/kept_frac"] = float(keep_N[tok].float().mean()) if len(tok) else 0.0
    return out
