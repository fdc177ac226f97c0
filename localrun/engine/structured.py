"""Structured output: JSON schemas and tool calls turned into GBNF grammars for llama.cpp's grammar sampler.

The conversion itself is llama-cpp-python's schema converter, behind `localrun.engine.schema_gbnf`, which
refuses any keyword the grammar would not enforce and adds integer ranges. This module decides what to
constrain (any JSON object, one schema, or a tool call wrapped in <tool_call> tags) and names the rules
so that grammars can be combined.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from localrun.errors import UserError
from localrun.limits import Limits

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# The converter's string characters allow raw control characters (a newline inside a string), which
# JSON forbids; llama.cpp's own converter now excludes them, and so do we. \u escapes of UTF-16
# surrogates are left out too: a pair counts as two characters here but decodes to one.
_CHAR_RULE = r"""char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-CefEF] [0-9a-fA-F] | [dD] [0-7]) [0-9a-fA-F] [0-9a-fA-F])"""


def json_schema_grammar(schema: dict[str, Any] | None, *, limits: Limits | None = None) -> str:
    """GBNF for JSON text that validates against schema (None: any JSON object).

    limits: the size limits the schema is checked against before anything is built (default: Limits())."""
    from localrun.limits import check_grammar, check_schema

    limits = limits or Limits()
    check_schema(schema, limits)
    return check_grammar(_convert(_ANY_OBJECT_SCHEMA if schema is None else schema), limits)


def tool_call_grammar(tools: Sequence[dict[str, Any]], *, name: str | None = None, limits: Limits | None = None) -> str:
    """GBNF for exactly one tool call: <tool_call>{"name": ..., "arguments": {...}}</tool_call>.

    name picks one function (tool_choice naming it); None allows any of the tools.
    """
    from localrun.engine.schema_gbnf import prepare
    from localrun.limits import check_grammar, check_schema

    limits = limits or Limits()
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise UserError(f"tool_choice names {name!r}, which is not among the tools of the request.")
    check_schema([f.get("parameters") for f in functions], limits, "The tools' parameters schemas")
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": prepare(
                    f.get("parameters") or {"type": "object", "properties": {}},
                    f"The parameters schema of {f['name']!r}",
                ),
            },
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    body = _convert(calls[0] if len(calls) == 1 else {"anyOf": calls}, prop_order=["name", "arguments"])
    body = re.sub(r"^root ::=", "tool-call ::=", body, count=1, flags=re.MULTILINE)
    grammar = f'root ::= "{TOOL_CALL_OPEN}\\n" tool-call "\\n{TOOL_CALL_CLOSE}"\n{body}'
    return check_grammar(grammar, limits, "The tools' parameters schemas")


def _convert(schema: dict[str, Any], *, prop_order: Sequence[str] = (), where: str = "The JSON schema") -> str:
    from localrun.engine.schema_gbnf import prepare

    if not isinstance(schema, dict):
        raise UserError(f"{where} must be a JSON object.")
    schema = prepare(schema, where)
    try:
        converter = _converter(prop_order)
        converter.visit(converter.resolve_refs(schema, "stdin"), "")
        grammar = converter.format_grammar()
    except Exception as exc:  # the converter raises bare ValueError/KeyError/AssertionError on schemas it rejects
        raise UserError(f"{where} cannot be turned into a grammar: {exc or type(exc).__name__}.") from None
    return re.sub(r"^char ::= .*$", lambda _: _CHAR_RULE, grammar, count=1, flags=re.MULTILINE)


def _converter(prop_order: Sequence[str]) -> Any:
    """llama-cpp-python's SchemaConverter, with integer bounds turned into digit ranges."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    from localrun.engine.schema_gbnf import integer_bounds, integer_range_rule

    class Converter(SchemaConverter):
        def visit(self, schema: dict[str, Any], name: str) -> str:
            bounds = integer_bounds(schema) if "enum" not in schema and "const" not in schema else None
            if bounds is None:
                return super().visit(schema, name)
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._add_rule(rule_name, f"{integer_range_rule(*bounds)} space")

    order = {n: i for i, n in enumerate(prop_order)}
    return Converter(prop_order=order, allow_fetch=False, dotall=False, raw_pattern=False)


def with_json_schema(params: Any, schema_text: str | None) -> Any:
    """SamplingParams whose grammar makes replies follow a JSON schema given as text (blank: unchanged).

    The chat tab's "JSON schema" field uses this; the API's response_format takes the same path."""
    if not schema_text or not schema_text.strip():
        return params
    from localrun.limits import loads

    try:
        schema = loads(schema_text, Limits(), "The JSON schema")
    except ValueError as exc:
        raise UserError(f"The JSON schema is not valid JSON: {exc}.") from None
    return params.replace(grammar=json_schema_grammar(schema))
