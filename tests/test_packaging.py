"""envs/ and tools/ install as mmopd.envs and mmopd.tools, never as top-level packages, for both
the editable install the suite runs on and a regular (non-editable) `pip install .`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_editable_install_maps_subpackages(tmp_path):
    # In a fresh interpreter outside the repository (the suite itself runs with the repository
    # root on sys.path, where a directory named envs/ is visible by accident).
    code = ("import importlib.util, mmopd.envs, mmopd.tools; "
            "print(mmopd.envs.__file__); print(mmopd.tools.__file__); "
            "print(importlib.util.find_spec('envs'), importlib.util.find_spec('tools'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    envs_file, tools_file, specs = run.stdout.strip().splitlines()
    assert Path(envs_file).parent == ROOT / "envs"
    assert Path(tools_file).parent == ROOT / "tools"
    assert specs == "None None"


@pytest.mark.slow
def test_regular_install_into_a_fresh_target(tmp_path):
    target = tmp_path / "site"
    p = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
         "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (target / "mmopd" / "envs" / "math_text.py").is_file()
    assert (target / "mmopd" / "tools" / "__init__.py").is_file()
    assert not (target / "envs").exists() and not (target / "tools").exists()
    # -I: no PYTHONPATH, no current directory; the target goes first on sys.path explicitly so
    # the repository's editable install cannot stand in for it.
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); "
            "import mmopd, mmopd.envs, mmopd.tools, importlib.util; "
            f"assert mmopd.envs.__file__.startswith({str(target)!r}), mmopd.envs.__file__; "
            "assert importlib.util.find_spec('envs') is None; "
            # every subpackage is installed, not only the top level
            "import mmopd.config, mmopd.rollout.agent_loop, mmopd.teachers.cache, "
            "mmopd.training.loop, mmopd.objectives.zoo; "
            f"assert mmopd.training.loop.__file__.startswith({str(target)!r}); "
            "print(mmopd.envs.list_envs())")
    run = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mmopd/MathText-v0" in run.stdout
