"""The Tool seam: a protocol, a decorator that turns a typed Python function into a tool, a
registry by name, and `call_tool`, which never raises (errors are text for the model).

A tool's JSON schema is the function-calling format that chat templates render
(`{"type": "function", "function": {name, description, parameters}}`); it is built from the
function's type hints and Google-style docstring by transformers' `get_json_schema`.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

MAX_TOOL_OUTPUT_CHARS = 2000  # longer outputs are cut (the model's context is the budget)


class ToolDefinitionError(ValueError):
    """A function cannot be made into a tool (missing type hints or argument docs)."""


class ToolSetupError(RuntimeError):
    """A tool cannot be set up on this machine (a sandbox without the isolation it requires):
    the run stops, where a tool's failure during an episode only fails that call."""


class ToolNotFoundError(KeyError):
    """No tool is registered under this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class ToolResult:
    """What a tool returns to the model: text and/or images, and whether it is an error."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    error: bool = False


@dataclass
class ToolContext:
    """What the agent loop knows about the episode when a tool runs.

    Tools that set `needs_context = True` get it as `run(args, context)`: `images` are the
    episode's images so far in order of appearance (the prompt's, then earlier tool results'),
    as the original PIL images (a zoom crops them in their own pixel coordinates).
    """

    images: list[Image.Image] = field(default_factory=list)


@runtime_checkable
class Tool(Protocol):
    """What the agent loop needs of a tool."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments (an "object" schema)

    def run(self, args: dict[str, Any]) -> ToolResult | str:
        """Execute with validated arguments (tools with `needs_context = True` also take a
        `ToolContext` as second argument)."""
        ...


def tool_schema(t: Tool) -> dict[str, Any]:
    """The function-calling schema chat templates take in `apply_chat_template(tools=...)`."""
    return {"type": "function", "function": {"name": t.name, "description": t.description,
                                             "parameters": t.parameters}}


# ----------------------------------------------------------------------------- validation

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


def _check(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """First mismatch of `value` against a JSON-schema subset (type, enum, items), or None."""
    if value is None and schema.get("nullable"):
        return None
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        ok = any(isinstance(value, _JSON_TYPES.get(k, object)) for k in kinds)
        if isinstance(value, bool) and "boolean" not in kinds:
            ok = False  # JSON true is not a number
        if not ok:
            return f"{where} must be of type {' or '.join(kinds)}, got {json.dumps(value)[:60]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {schema['enum']}, got {json.dumps(value)[:60]}"
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            if (err := _check(v, schema["items"], f"{where}[{i}]")) is not None:
                return err
    return None


def bind_text_argument(t: Tool, args: Any) -> Any:
    """A bare string (a ReAct-style `Action: name[text]` call) as the tool's arguments: it fills
    the tool's one required string argument. Anything else is returned as it is."""
    if not isinstance(args, str):
        return args
    required = t.parameters.get("required", [])
    props = t.parameters.get("properties", {})
    if len(required) == 1 and props.get(required[0], {}).get("type") == "string":
        return {required[0]: args}
    return args


def validate_args(t: Tool, args: Any) -> str | None:
    """An error message for arguments that do not fit the tool's schema, or None."""
    if isinstance(args, str):
        return (f"{t.name} takes named arguments ({', '.join(t.parameters.get('required', []))}"
                "); a bare text argument fills a tool's only required string argument")
    if not isinstance(args, dict):
        return f"arguments of {t.name} must be a JSON object, got {type(args).__name__}"
    props = t.parameters.get("properties", {})
    missing = [k for k in t.parameters.get("required", []) if k not in args]
    if missing:
        return f"{t.name} is missing required argument(s): {', '.join(missing)}"
    for k, v in args.items():
        if k not in props:
            hint = difflib.get_close_matches(k, list(props), n=1)
            return (f"{t.name} has no argument {k!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; arguments: {', '.join(props) or 'none'}")
        if (err := _check(v, props[k], f"argument {k!r}")) is not None:
            return err
    return None


def _as_result(out: Any) -> ToolResult:
    if isinstance(out, ToolResult):
        return out
    if isinstance(out, str):
        return ToolResult(out)
    if hasattr(out, "save") and hasattr(out, "size"):  # a PIL image
        return ToolResult("", [out])
    if isinstance(out, (int, float, bool, list, dict)) or out is None:
        return ToolResult(json.dumps(out))
    return ToolResult(str(out))


def call_tool(t: Tool, args: Any, max_chars: int = MAX_TOOL_OUTPUT_CHARS,
              context: ToolContext | None = None) -> ToolResult:
    """Validate, run, and bound one tool call. Never raises: failures are error results."""
    args = bind_text_argument(t, args)
    if (err := validate_args(t, args)) is not None:
        return ToolResult(f"Error: {err}", error=True)
    try:
        if getattr(t, "needs_context", False):
            res = _as_result(t.run(args, context or ToolContext()))  # type: ignore[call-arg]
        else:
            res = _as_result(t.run(args))
    except Exception as e:  # a tool's bug is the model's observation, not a crashed rollout
        res = ToolResult(f"Error: {t.name} raised {type(e).__name__}: {e}", error=True)
    if len(res.text) > max_chars:
        cut = len(res.text) - max_chars
        res = ToolResult(res.text[:max_chars] + f"\n... [{cut} more characters cut]",
                         res.images, res.error)
    return res


# ----------------------------------------------------------------------------- @tool


class FunctionTool:
    """A Python function as a tool: schema from its signature, `run` calls it with the args."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None,
                 description: str | None = None) -> None:
        from transformers.utils import get_json_schema
        from transformers.utils.chat_template_utils import (
            DocstringParsingException,
            TypeHintParsingException,
        )

        try:
            spec = get_json_schema(fn)["function"]
        except (DocstringParsingException, TypeHintParsingException) as e:
            raise ToolDefinitionError(
                f"cannot make {getattr(fn, '__name__', fn)!r} a tool: {e}. Give every argument "
                "a type hint and a line under 'Args:' in a Google-style docstring") from e
        self.fn = fn
        self.name = name or spec["name"]
        self.description = description or spec.get("description", "")
        self.parameters: dict[str, Any] = spec["parameters"]

    def run(self, args: dict[str, Any]) -> ToolResult | str:
        return _as_result(self.fn(**args))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionTool({self.name!r})"


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None, register: bool = True) -> Any:
    """Make a typed, documented function a tool (and register it by name)::

        @tool
        def word_count(text: str) -> int:
            '''Count the words in a text.

            Args:
                text: the text to count
            '''
            return len(text.split())
    """
    def wrap(f: Callable[..., Any]) -> FunctionTool:
        t = FunctionTool(f, name, description)
        if register:
            register_tool(t.name, lambda: t)
        return t

    return wrap(fn) if fn is not None else wrap


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Tool]] = {}


def register_tool(name: str, factory: Callable[..., Tool]) -> None:
    """Make `make_tool(name, **kwargs)` build a tool with `factory(**kwargs)`."""
    _REGISTRY[name] = factory


def list_tools() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def make_tool(name: str, **kwargs: Any) -> Tool:
    """A tool instance by registered name."""
    _load_builtins()
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        raise ToolNotFoundError(f"no tool named {name!r}" + (f"; did you mean {hint[0]!r}?"
                                                               if hint else "")
                                + f" (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](**kwargs)


def resolve_tools(spec: list[Tool | str | dict[str, Any]]) -> dict[str, Tool]:
    """Tools by name from tool objects, registered names, or {"name": ..., **kwargs} dicts
    (e.g. {"name": "search", "corpus": "docs/"})."""
    out: dict[str, Tool] = {}
    for s in spec:
        if isinstance(s, str):
            t = make_tool(s)
        elif isinstance(s, dict):
            kwargs = dict(s)
            t = make_tool(kwargs.pop("name", ""), **kwargs)
        else:
            t = s
        out[t.name] = t
    return out


_BUILTINS = ("mmopd.tools.calculator", "mmopd.tools.python", "mmopd.tools.search",
             "mmopd.tools.zoom")


def _load_builtins() -> None:
    """Import the built-in tool modules (each registers itself) on first registry use."""
    import importlib

    for mod in _BUILTINS:
        importlib.import_module(mod)
