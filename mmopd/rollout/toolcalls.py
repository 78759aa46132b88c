"""Tool-call parsers: find the tool calls in a student reply.

The default is the Hermes convention that Qwen2.5 / Qwen3 chat templates use::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "37*48"}}
    </tool_call>

"react" reads the short ReAct form, one call per line, for tools with one text argument::

    Action: calculator[37*48]

A parser never raises on model output: malformed, truncated or non-object calls come back as
error strings, which the agent loop returns to the model as tool messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ToolCall:
    name: str
    arguments: Any  # validated against the tool's schema when called


@dataclass
class ParsedReply:
    """What a reply asks for: tool calls (in order) and the problems found in malformed ones."""

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def wants_tools(self) -> bool:
        """The reply tried to call a tool (even if every call was malformed)."""
        return bool(self.calls or self.errors)


class ToolCallParser(Protocol):
    def parse(self, text: str) -> ParsedReply:
        """Tool calls in a reply (text decoded with special tokens kept)."""
        ...


class HermesParser:
    """`<tool_call>{json}</tool_call>` blocks; the JSON holds "name" and "arguments"."""

    def __init__(self, open_tag: str = "<tool_call>", close_tag: str = "</tool_call>") -> None:
        self.open_tag, self.close_tag = open_tag, close_tag
        self._block = re.compile(re.escape(open_tag) + r"(.*?)(" + re.escape(close_tag) + r"|$)",
                                 re.DOTALL)

    def parse(self, text: str) -> ParsedReply:
        out = ParsedReply()
        for m in self._block.finditer(text):
            body, closed = m.group(1).strip(), bool(m.group(2))
            if not closed:
                out.errors.append(f"the tool call is not closed with {self.close_tag} "
                                  "(truncated output?)")
                continue
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as e:
                out.errors.append(f"the tool call is not valid JSON ({e.msg} at character "
                                  f"{e.pos}); write {{\"name\": ..., \"arguments\": {{...}}}}")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                out.errors.append('the tool call must be a JSON object with a string "name"')
                continue
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):  # some models emit the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass  # left as a string: schema validation reports it
            out.calls.append(ToolCall(obj["name"], args))
        return out


class ReActParser:
    """ReAct-style `Action: name[input]` lines: a short call format for tools that take one
    text argument (the input fills the tool's only required string argument)."""

    _action = re.compile(r"Action:[ \t]*(.*)")
    _call = re.compile(r"([A-Za-z_][\w.-]*)\[(.*)\]\s*")

    def parse(self, text: str) -> ParsedReply:
        out = ParsedReply()
        for m in self._action.finditer(text):
            call = self._call.fullmatch(m.group(1))
            if call is None:
                out.errors.append("write a tool call as Action: name[input], e.g. "
                                  "Action: calculator[37*48]")
                continue
            out.calls.append(ToolCall(call.group(1), call.group(2).strip()))
        return out


PARSERS: dict[str, type[ToolCallParser]] = {"hermes": HermesParser, "react": ReActParser}


def make_parser(name: str) -> ToolCallParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {sorted(PARSERS)}")
    return PARSERS[name]()


def format_call(name: str, arguments: dict[str, Any], style: str = "hermes") -> str:
    """A call as expert demonstrations write it: in the Hermes format, or ("react") as
    `Action: name[input]` with the one argument's value as the input."""
    if style == "react":
        if len(arguments) != 1:
            raise ValueError(f"a react call takes exactly one argument, got {sorted(arguments)}")
        return f"Action: {name}[{next(iter(arguments.values()))}]"
    if style != "hermes":
        raise ValueError(f"unknown call style {style!r}; choose one of {sorted(PARSERS)}")
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
