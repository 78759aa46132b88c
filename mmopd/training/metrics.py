"""Run-directory logging: metrics.jsonl (one line per optimiser step), eval.jsonl, curves.png,
and a one-line console summary per step."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmopd.episode import STOP_REASONS, Episode


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; an undefined value (e.g. tau in exploration) is null
    return v


class JsonlLog:
    """Append-only JSON lines keyed by "step"; on resume, lines after the resumed step go."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True,
                 mirror: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.enabled = enabled  # False on non-main ranks: nothing is written
        self.mirror = mirror  # also gets every row (the experiment trackers)
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        else:
            kept = [r for r in self.rows() if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        if self.mirror is not None:
            self.mirror(row)

    def rows(self) -> list[dict[str, Any]]:
        """The logged rows; a line cut short (a process killed mid-write, a full disk) is left
        out."""
        if not self.path.exists():
            return []
        out = []
        for ln in self.path.read_text().splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                continue
        return out


def summary_line(row: dict[str, Any], total: int) -> str:
    phase = {0.0: "explore", 1.0: "refine"}.get(row.get("phase"), "")
    parts = [f"step {row['step']}/{total}"] + ([phase] if phase else [])
    for key, label, fmt in [("loss", "loss", "{:+.4f}"), ("env_reward", "reward", "{:.3f}"),
                            ("distill_reward", "R", "{:+.3f}"), ("kept_frac", "kept", "{:.2f}"),
                            ("student_entropy", "H", "{:.3f}"), ("train_tokens_per_s", "tok/s",
                                                                 "{:.0f}")]:
        if row.get(key) is not None:
            parts.append(f"{label} {fmt.format(row[key])}")
    return " | ".join(parts)


def plot_curves(metrics: list[dict[str, Any]], evals: list[dict[str, Any]], out: Path) -> None:
    """curves.png: loss, env reward, distillation reward / KL, kept fraction, eval accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", ["loss"]), ("env reward", ["env_reward"]),
              ("token reward / KL", ["distill_reward", "kl_estimate"]),
              ("kept fraction", ["kept_frac", "floor_frac"]),
              ("student entropy", ["student_entropy"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(m["step"], m[k]) for m in metrics
                   if m.get(k) is not None and "warmup_step" not in m]  # warm-up rows: step 0
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.legend(fontsize=7)
    ax = axes.flat[-1]
    for k in sorted({k for e in evals for k in e if k == "accuracy" or k.startswith("pass@")
                     or k == "sample_accuracy"}):
        pts = [(e["step"], e[k]) for e in evals if e.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=k)
    ax.set_title("held-out eval")
    ax.set_xlabel("optimiser step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def step_flops(episodes: list[Episode], n_student: int, n_teacher: int,
               scorers: int) -> dict[str, float]:
    """Approximate FLOPs of one rollout batch (2 x params per token forward, 6 x with backward):
    rollout = one forward over every token of every episode (prompt prefill and each generated
    token); training = the student's forward + backward over the sequences, plus `scorers`
    no-grad forwards (log pi_old, the teacher, ...) counted at the teacher's size for the
    teacher."""
    tokens = sum(len(ep.input_ids) for ep in episodes)
    return {"flops_rollout": 2.0 * n_student * tokens,
            "flops_train": (6.0 * n_student + 2.0 * n_student + 2.0 * n_teacher * scorers) * tokens}


def episode_stats(episodes: list[Episode]) -> dict[str, float]:
    """Per-batch agent metrics: turns, tool use and failures, and why episodes ended."""
    n = max(len(episodes), 1)
    calls = sum(ep.metadata.get("tool_calls", 0) for ep in episodes)
    out = {
        "turns": sum(len(ep.metadata.get("completions", ())) for ep in episodes) / n,
        "tool_calls": calls / n,
        "tool_errors": sum(ep.metadata.get("tool_errors", 0) for ep in episodes) / n,
        "tool_parse_errors": sum(ep.metadata.get("parse_errors", 0) for ep in episodes) / n,
    }
    for r in STOP_REASONS:
        out[f"stop_{r}_frac"] = sum(ep.stop_reason == r for ep in episodes) / n
    return out
