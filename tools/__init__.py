"""Agent tools, importable as ``mmopd.tools``.

A tool has a name, a description, a JSON schema of its arguments and ``run(args)`` returning text
and/or images. Register a typed Python function with ``@tool``; built-ins: ``calculator`` (safe
arithmetic), ``python`` (a sandboxed subprocess), ``search`` (BM25 over a local corpus) and
``zoom`` (crop a region of an episode's image).
"""

from __future__ import annotations

from .base import (
    MAX_TOOL_OUTPUT_CHARS,
    FunctionTool,
    Tool,
    ToolContext,
    ToolDefinitionError,
    ToolNotFoundError,
    ToolResult,
    ToolSetupError,
    call_tool,
    list_tools,
    make_tool,
    register_tool,
    resolve_tools,
    tool,
    tool_schema,
    validate_args,
)

__all__ = [
    "ToolSetupError",
    "MAX_TOOL_OUTPUT_CHARS",
    "FunctionTool",
    "Tool",
    "ToolContext",
    "ToolDefinitionError",
    "ToolNotFoundError",
    "ToolResult",
    "call_tool",
    "list_tools",
    "make_tool",
    "register_tool",
    "resolve_tools",
    "tool",
    "tool_schema",
    "validate_args",
]
