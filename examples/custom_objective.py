"""A custom objective: a plan function registered by name, then chosen from YAML.

    python examples/custom_objective.py [OUT_DIR]
    (or: mmopd train examples/custom_objective.yaml, with examples/ on PYTHONPATH)

An objective's plan turns a rollout batch's detached per-token scores (`TokenBatch`: log pi_old,
log pi_T, entropy, rewards, ...) into which tokens to train on and their advantage (`Plan`); the
trainer's policy-gradient loss then does the rest. This one, "confident_opd", is OPD with each
token's reward log pi_T - log pi_old weighted by the teacher's probability of the token: tokens
the teacher is unsure about count less. A config selects it with `objective.name:
confident_opd` and lists this module under `env.imports` so that it is registered first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mmopd.objectives import Objective, Plan, TokenBatch, register_objective
from mmopd.training.loop import train


def confident_opd_plan(tb: TokenBatch, step: int, total: int, cfg) -> Plan:
    """keep every token; advantage_N = pi_T(y_t) * R_t, R_t the OPD token reward."""
    weight_N = tb.logp_teacher_N.exp()
    advantage_N = weight_N * tb.token_reward_N
    keep_N = torch.ones_like(advantage_N, dtype=torch.bool)
    return Plan(keep_N, advantage_N, {"kept_frac": 1.0,
                                      "teacher_confidence": float(weight_N.mean())})


register_objective(Objective("confident_opd", kind="pg", plan=confident_opd_plan,
                             doc="OPD with token rewards weighted by the teacher's probability"))


def main(out: str = "runs/example-objective") -> dict:
    from _tiny import tiny_config

    yaml_path = Path(__file__).with_name("custom_objective.yaml")
    return train(tiny_config(out, [], path=yaml_path))


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
