"""The built-in ``python`` tool: the model's code run by `run_python` in the sandbox.

The sandbox itself (limits, isolation layers, the launcher) is `mmopd.tools.sandbox`; its API is
re-exported here so that ``from mmopd.tools.python import run_python`` keeps working.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import MAX_TOOL_OUTPUT_CHARS, ToolResult, register_tool
from .sandbox import (
    SandboxLimits,
    SandboxResult,
    _fmt_s,
    _shorten,
    available_layers,
    check_isolation,
    run_python,
)
from .sandbox_limits import SandboxUnavailable

__all__ = ["PythonTool", "SandboxLimits", "SandboxResult", "SandboxUnavailable",
           "available_layers", "check_isolation", "run_python"]


class PythonTool:
    """The ``python`` tool: runs the model's code with `run_python` under fixed limits."""

    name = "python"
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"code": {"type": "string",
                                "description": "Python 3 source, run as a script"}},
        "required": ["code"],
    }

    def __init__(self, limits: SandboxLimits | None = None, **overrides: Any) -> None:
        self.limits = dataclasses.replace(limits or SandboxLimits(), **overrides)
        check_isolation(self.limits)  # fails closed here, before any episode runs
        lim = self.limits
        self.description = (
            "Run Python 3 code and return what it prints (stdout, then stderr). Each call is a "
            "fresh interpreter with the standard library only, in an empty scratch directory, "
            f"without network access; limits: {_fmt_s(lim.cpu_seconds)} s CPU, "
            f"{_fmt_s(lim.wall_seconds)} s wall clock, {lim.memory_mb} MB memory. "
            "Use print() to see results.")

    def run(self, args: dict[str, Any]) -> ToolResult:
        res = run_python(args["code"], self.limits)
        out = res.stdout
        if res.stderr:
            out += ("" if not out or out.endswith("\n") else "\n") + res.stderr
        # Fit the text here, head and tail, rather than let call_tool cut off the traceback.
        budget = min(self.limits.max_output_chars, MAX_TOOL_OUTPUT_CHARS)
        text = _shorten(out, max(0, budget - len(res.message) - 64))  # 64: the cut marker
        if res.message:
            text = f"{res.message}\n{text}" if text else res.message
        return ToolResult(text or "(no output)", error=not res.ok)


register_tool("python", PythonTool)
