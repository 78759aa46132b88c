"""The `calculator` tool: arithmetic over a parsed syntax tree (never `eval`).

Only numbers, + - * / // % **, unary signs, parentheses and a few math functions are allowed, and
sizes are bounded (exponents, intermediate magnitudes, expression length), so no input can hang
the rollout or exhaust memory.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import warnings
from collections.abc import Callable

from .base import ToolResult, register_tool

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000
MAX_DIGITS = 4300  # Python's own int->str limit; bigger results are refused, not computed

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
    "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "min": min, "max": max, "factorial": math.factorial, "gcd": math.gcd,
}
_CONSTS = {"pi": math.pi, "e": math.e}
_LEADING_ZEROS = re.compile(r"(?<![\d.\w])0+(?=\d)")


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or its result would be unreasonably large."""


_MAX_BITS = int(MAX_DIGITS * 3.33)


def _too_big(x: float) -> bool:
    return isinstance(x, int) and x.bit_length() > _MAX_BITS


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(b) > MAX_EXPONENT:
                raise CalculatorError(f"exponent {b} is too large (limit {MAX_EXPONENT})")
            if isinstance(a, int) and isinstance(b, int) and a.bit_length() * b > _MAX_BITS:
                raise CalculatorError("result too large")  # refused before computing it
        out = _BINARY[type(node.op)](a, b)
        if _too_big(out):
            raise CalculatorError("result too large")
        return out
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS and not node.keywords):
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial" and args and args[0] > 1000:
            raise CalculatorError("factorial argument too large (limit 1000)")
        return _FUNCS[node.func.id](*args)
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"name {node.id!r}"
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        what = f"function {node.func.id!r}"
    raise CalculatorError(f"unsupported {what}; allowed: numbers, + - * / // % **, parentheses, "
                          f"{', '.join(sorted(_FUNCS))}")


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression; integers stay exact, floats print with 12 digits."""
    expr = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    expr = _LEADING_ZEROS.sub("", expr)  # "086" means 86 to people (Python reads it as an error)
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        with warnings.catch_warnings():  # a model's '"\d"' or '2(3)' is an error result, not
            warnings.simplefilter("ignore")  # a Syntax/DeprecationWarning on the trainer's stderr
            tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse {expression!r}: {e.msg}") from None
    try:
        out = _eval(tree)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except (OverflowError, ValueError, TypeError) as e:
        if isinstance(e, CalculatorError):
            raise
        raise CalculatorError(str(e)) from None
    if isinstance(out, float):
        if out.is_integer() and abs(out) < 1e15:
            return str(int(out))
        return f"{out:.12g}"
    return str(out)


class Calculator:
    """Safe arithmetic as a tool."""

    name = "calculator"
    description = ("Evaluate an arithmetic expression exactly, e.g. '(37*48) - 125 / 5'. "
                   "Supports + - * / // % **, parentheses, sqrt, log, exp, min, max, abs, round.")
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string",
                                      "description": "the arithmetic expression"}},
        "required": ["expression"],
    }

    def run(self, args: dict[str, str]) -> ToolResult:
        try:
            return ToolResult(calculate(args["expression"]))
        except CalculatorError as e:
            return ToolResult(f"Error: {e}", error=True)


register_tool("calculator", Calculator)
