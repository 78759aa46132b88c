"""What an objective, with its composable options, needs the scoring pass to compute."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmopd.config import ObjectiveConfig
    from mmopd.objectives import Objective


def needed_scores(obj: Objective, cfg: ObjectiveConfig) -> frozenset[str]:
    """Per-token scores an objective with its composable options needs from the scoring pass."""
    needs = set(obj.needs)
    if cfg.token_selection == "tip":
        needs.add("kl")
    if cfg.drift_threshold > 0:
        needs.add("overlap")
    return frozenset(needs)


def needs_teacher_hidden(obj: Objective, cfg: ObjectiveConfig) -> bool:
    """Full-vocabulary objectives (and top-k over the student's ids, and AOPD's full divergence
    term) rebuild teacher logits from its hidden states: they need a live teacher."""
    if obj.divergence == "uld":  # sorted probabilities: the teacher's top-k log-probs only
        return False
    return obj.aux == "divergence" or (obj.kind == "divergence" and (
        cfg.topk == 0 or cfg.topk_source == "student"))
