"""benchmarks/collect_results.py copies each benchmark's own output into RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_md_is_the_scripts_output(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "loss_memory.md").write_text("| a | b |\n|---|---|\n| 1,234 | 5.6x |\n")
    (res / "loss_memory.json").write_text(json.dumps({"command": "python x.py --vocab 7"}))
    (res / "train_step.md").write_text("# Title\n\n| s |\n|---|\n| 0.5 |\n")
    out = tmp_path / "bench" / "RESULTS.md"
    out.parent.mkdir()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "collect_results.py"),
                    "--results", str(res), "--out", str(out)], check=True, capture_output=True)
    text = out.read_text()
    assert "| 1,234 | 5.6x |" in text and "`python x.py --vocab 7`" in text
    assert "| 0.5 |" in text and "# Title" not in text
    assert "not recorded" in text  # train_step has no JSON with its command
    assert "Not run yet: `python benchmarks/vs_trl.py`" in text
    assert "Not run yet: `python benchmarks/worlds.py --worlds vision`" in text


def _load(name: str):
    """A benchmark script as a module; like `python benchmarks/NAME.py`, it finds its helpers
    (`benchmarks/_*.py`) on sys.path."""
    import importlib.util

    bench = str(ROOT / "benchmarks")
    sys.path.insert(0, bench)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(bench)
    return mod


def _run(arm: str, seed: int, accs: list[float]) -> dict:
    return {"arm": arm, "seed": seed, "curve": [
        {"step": 10 * i, "episodes": 100 * i, "accuracy": a} for i, a in enumerate(accs)]}


def test_worlds_ratio_to_grpo_final_accuracy():
    se = _load("worlds")
    runs = {"grpo": [_run("grpo", 0, [0.2, 0.4, 0.6, 0.8]), _run("grpo", 1, [0.2, 0.4, 0.6, 0.8])],
            "opd": [_run("opd", 0, [0.2, 0.5, 0.9, 0.9]), _run("opd", 1, [0.2, 0.7, 0.9, 0.9])],
            "slow": [_run("slow", 0, [0.2, 0.3, 0.4, 0.5])]}
    out = se.summarize(runs)
    assert out["target"] == {"arm": "grpo", "final_mean_accuracy": 0.8, "episodes": 300}
    # opd's mean curve: 0.2, 0.6, 0.9 -> reaches 0.8 two-thirds of the way from 100 to 200
    assert abs(out["reach"]["opd"]["episodes"] - 100 * (1 + 2 / 3)) < 1e-9
    assert abs(out["reach"]["opd"]["ratio"] - 300 / (100 * (1 + 2 / 3))) < 1e-9
    assert out["reach"]["slow"]["ratio_text"] == "not reached"
    assert abs(out["curves"]["opd"]["std"][1] - 0.1414213562) < 1e-6


def test_worlds_no_ratio_when_grpo_ends_below_the_start():
    se = _load("worlds")
    out = se.summarize({"grpo": [_run("grpo", 0, [0.7, 0.5, 0.6])],
                        "opd": [_run("opd", 0, [0.7, 0.6, 0.8])]})
    assert out["target"]["episodes"] == 0
    assert out["reach"]["opd"]["ratio"] is None


def test_sweep_scripts_parse_their_arguments():
    for name in ("worlds", "stability"):
        p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "--seeds" in p.stdout


def test_worlds_markdown_reports_a_failed_premise_without_arms():
    worlds = _load("worlds")
    text = worlds.markdown({"world": "math", "command": "python benchmarks/worlds.py",
                            "machine": "m", "wall_seconds": 60.0, "runs": [],
                            "premises": [{"seed": 0, "holds": False, "error": "x"}]})
    assert "| 0 | nan | nan | FAILS: no arms run |" in text


def test_cross_tokenizer_reports_a_failed_premise_without_training(tmp_path):
    import argparse

    mod = _load("cross_tokenizer")
    m = {"params": 1, "accuracy": 0.1, "strict_accuracy": 0.1, "sample_accuracy": 0.1,
         "pass@4": 0.2, "mean_reply_tokens": 3.0}
    result = {"command": "python benchmarks/cross_tokenizer.py", "machine": "here",
              "teacher": "SmolLM2-135M-Instruct", "student": "Gemma-3-270M",
              "measured": {"SmolLM2-135M-Instruct": m, "Gemma-3-270M": {**m, "accuracy": 0.05}},
              "premise_gap": 0.05, "min_gap": 0.15}
    mod._write(tmp_path, result, None, None, None, argparse.Namespace(steps=24), 0.0)
    text = (tmp_path / "cross_tokenizer.md").read_text()
    assert "Premise check failed" in text and "student after" not in text
    assert json.loads((tmp_path / "cross_tokenizer.json").read_text())["premise_gap"] == 0.05


def test_gpu_smoke_runs_on_cpu(tmp_path):
    """The prepared GPU run's checks and both worlds, at tiny shapes on this CPU (`--smoke`;
    with vLLM installed, on its engine): the script a session lent a GPU runs as it is."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--smoke",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "every check passed" in p.stdout and "FAILED" not in p.stdout
    assert not list(tmp_path.iterdir())  # a smoke run writes no results
