"""The ``$`` expressions of a MONAI bundle configuration that are plain data, computed without Python's
``eval``: numbers, strings, lists, ``@references``, ``a if condition else b``, comparisons, ``and``/``or``/
``not``, and ``+``. Anything else (calls, attributes, subscripts, imports) is refused: evaluating it would
run code written in an untrusted file.

A small walker of our own: ``ast.literal_eval`` refuses references and conditionals, and expression
packages such as simpleeval allow function calls unless each one is taken away again.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any, Callable, Dict

REFERENCE = re.compile(r"@([A-Za-z_][A-Za-z0-9_]*(?:(?:#|::)[A-Za-z0-9_]+)*)")
_COMPARISONS: Dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_PLACEHOLDER = "_reference_"


class NotPlainData(ValueError):
    """The expression needs more than plain data to be computed; the message names what."""


def evaluate(text: str, lookup: Callable[[str], Any]) -> Any:
    """The value of the expression ``text`` (without its ``$``); ``lookup(id)`` gives a referenced entry's
    value, and is called only for the references the result depends on (one branch of a conditional)."""
    references: Dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        name = f"{_PLACEHOLDER}{len(references)}"
        references[name] = match.group(1)
        return name

    try:
        tree = ast.parse(REFERENCE.sub(placeholder, text).strip(), mode="eval")
    except SyntaxError:
        raise NotPlainData("not an expression") from None
    return _Walker(references, lookup).value(tree.body)


class _Walker:
    def __init__(self, references: Dict[str, str], lookup: Callable[[str], Any]):
        self.references, self.lookup = references, lookup

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.value(item) for item in node.elts]
        if isinstance(node, ast.Name) and node.id in self.references:
            return self.lookup(self.references[node.id])
        if isinstance(node, ast.IfExp):
            return self.value(node.body) if self.value(node.test) else self.value(node.orelse)
        if isinstance(node, ast.BoolOp):
            return self._bool(node)
        if isinstance(node, ast.UnaryOp):
            return self._unary(node)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARISONS:
            left, right = self.value(node.left), self.value(node.comparators[0])
            try:
                return _COMPARISONS[type(node.ops[0])](left, right)
            except TypeError:
                raise NotPlainData(f"compares {type(left).__name__} with {type(right).__name__}") from None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._sum(node)
        if isinstance(node, ast.Name):
            raise NotPlainData(f"uses the name '{node.id}'")
        raise NotPlainData(f"uses {_describe(node)}")

    def _bool(self, node: ast.BoolOp) -> Any:
        result = self.value(node.values[0])
        for item in node.values[1:]:
            if isinstance(node.op, ast.And) and not result or isinstance(node.op, ast.Or) and result:
                return result
            result = self.value(item)
        return result

    def _unary(self, node: ast.UnaryOp) -> Any:
        operand = self.value(node.operand)
        if isinstance(node.op, ast.Not):
            return not operand
        if isinstance(node.op, (ast.USub, ast.UAdd)) and _is_number(operand):
            return -operand if isinstance(node.op, ast.USub) else operand
        raise NotPlainData(f"uses {_describe(node)}")

    def _sum(self, node: ast.BinOp) -> Any:
        left, right = self.value(node.left), self.value(node.right)
        if (
            (isinstance(left, str) and isinstance(right, str))
            or (isinstance(left, list) and isinstance(right, list))
            or (_is_number(left) and _is_number(right))
        ):
            return left + right
        raise NotPlainData(f"adds {type(left).__name__} and {type(right).__name__}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(node: ast.AST) -> str:
    names = {ast.Call: "a call", ast.Attribute: "an attribute", ast.Subscript: "a subscript"}
    return names.get(type(node), f"a {type(node).__name__}")
