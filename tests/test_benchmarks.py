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
    assert "Not run yet: `benchmarks/vs_trl.py`" in text
