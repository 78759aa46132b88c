"""Agent tools, importable as ``mmopd.tools``.

A tool has a name, a description, a JSON schema of its arguments and ``run(args)`` returning text
and/or images. The single-turn math world needs none; multi-turn agents register theirs here.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tool(Protocol):
    """What the agent loop needs of a tool."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments

    def run(self, args: dict[str, Any]) -> str:
        """Execute with parsed arguments; errors are returned as text, never raised."""
        ...


__all__ = ["Tool"]
