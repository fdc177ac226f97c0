"""Request limits, declared once: the API server checks a request against them before any work is done
(before the body is parsed, a grammar built or the model process asked), and the UI's JSON-schema field
uses the same schema checks.

Each limit is a settings field (default, bounds, help), so `localrun serve` and `localrun ui --api` get
one flag per limit, and each refusal names the limit and the flag that raises it. The grammar a JSON
schema turns into is estimated from the schema before it is built: llama-cpp-python's converter spells
out every repetition (maxLength 1e9 is a string of gigabytes), and llama.cpp's parser recurses once per
nested repetition.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from localrun.errors import UserError
from localrun.settings import Meta, Settings, setting

_M = "limits"


class Limits(Settings):
    """What one request may ask of the server; raise a limit with its flag (--max-body-bytes ...)."""

    max_body_bytes: int = setting(
        4 << 20, ge=1024, le=1 << 30, help="Largest request body in bytes (413 above it).", meta=Meta("Body", _M)
    )
    max_messages: int = setting(1000, ge=1, le=1 << 20, help="Most messages in one chat request.", meta=Meta("", _M))
    max_json_depth: int = setting(
        64, ge=4, le=10_000, help="Deepest nesting of arrays and objects in a body or schema.", meta=Meta("", _M)
    )
    max_schema_length: int = setting(
        1000,
        ge=1,
        le=1 << 30,
        help="Largest string length (minLength/maxLength) and pattern repeat count {m,n} in a JSON schema.",
        meta=Meta("", _M),
    )
    max_schema_items: int = setting(
        1000, ge=1, le=1 << 30, help="Largest array size (minItems/maxItems) in a JSON schema.", meta=Meta("", _M)
    )
    max_schema_enum: int = setting(
        500, ge=1, le=1 << 24, help="Most values in one enum of a JSON schema.", meta=Meta("", _M)
    )
    max_schema_properties: int = setting(
        500, ge=1, le=1 << 24, help="Most properties in all the objects of a JSON schema.", meta=Meta("", _M)
    )
    max_grammar_bytes: int = setting(
        1 << 20,
        ge=1024,
        le=1 << 30,
        help="Largest grammar a JSON schema or tool list may turn into, estimated before it is built.",
        meta=Meta("", _M),
    )
    max_stop_chars: int = setting(1000, ge=1, le=1 << 20, help="Longest stop string, in characters.", meta=Meta("", _M))
    max_tools: int = setting(128, ge=1, le=1 << 16, help="Most tools in one request.", meta=Meta("", _M))


class LimitExceeded(UserError):
    """A request over one of the limits: the message names it and the flag that raises it."""

    def __init__(self, what: str, limit: str, value: int) -> None:
        flag = "--" + limit.replace("_", "-")
        super().__init__(f"{what}, over the limit {limit}={value}: a server started with {flag} N allows more.")
        self.limit = limit


# -- the raw body ------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_FLAT = re.compile(rb"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")
_BRACKETS = re.compile(rb"[\[\]{}]")


def check_depth(raw: bytes, limits: Limits, what: str = "The request body") -> None:
    """LimitExceeded when raw JSON nests deeper than max_json_depth; checked before json.loads recurses.

    Strings are blanked first; each pass then removes the innermost arrays and objects, so the
    number of passes is the depth (stopping at the limit), each one a linear scan in C."""
    text = _STRING.sub(b'""', raw)
    for _ in range(limits.max_json_depth):
        if not _BRACKETS.search(text):
            return
        text, removed = _FLAT.subn(b"", text)
        if not removed:  # unbalanced brackets: json.loads says where
            return
    if _BRACKETS.search(text):
        raise LimitExceeded(
            f"{what} nests deeper than {limits.max_json_depth} levels", "max_json_depth", limits.max_json_depth
        )


def loads(raw: bytes | str, limits: Limits, what: str = "The request body") -> Any:
    """json.loads behind the depth check; NaN and Infinity, which JSON does not have, are refused."""
    check_depth(raw.encode() if isinstance(raw, str) else raw, limits, what)

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(raw, parse_constant=constant)
    except RecursionError:  # unbalanced brackets the scan leaves to the parser, or a limit above its own
        raise LimitExceeded(
            f"{what} nests deeper than {limits.max_json_depth} levels (or than the JSON parser's own limit)",
            "max_json_depth",
            limits.max_json_depth,
        ) from None


# -- JSON schemas ------------------------------------------------------------------------------------

_QUANTIFIER = re.compile(r"(?<!\\)\{\s*(\d*)\s*(?:(,)\s*(\d*)\s*)?\}")
_RULE_BYTES = 24  # a rule name with its spaces, as the converter writes a reference to it
_NODE_BYTES = 64  # the rules one schema object adds, roughly


def _nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object in a schema, depth first, without recursion (the depth is checked elsewhere)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))


def _count(node: dict[str, Any], key: str) -> int:
    value = node.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def pattern_repeats(pattern: str) -> list[int]:
    """The repeat counts a pattern's {m}, {m,} and {m,n} quantifiers ask for (the larger of m and n)."""
    out = []
    for low, comma, high in _QUANTIFIER.findall(pattern):
        out.append(max(int(low or 0), int(high or 0) if comma else int(low or 0)))
    return out


def check_schema(schema: Any, limits: Limits, where: str = "The JSON schema") -> int:
    """LimitExceeded for a schema over a size limit; returns the estimated grammar size in bytes."""
    estimate, properties = 0, 0
    for node in _nodes(schema):
        estimate += _NODE_BYTES
        _check_lengths(node, limits, where)
        estimate += 12 * max(_count(node, "minLength"), _count(node, "maxLength"))
        estimate += (_RULE_BYTES + 8) * max(_count(node, "minItems"), _count(node, "maxItems"))
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            estimate += len(pattern) + (_RULE_BYTES + 4) * sum(pattern_repeats(pattern))
        enum = node.get("enum")
        if isinstance(enum, list):
            if len(enum) > limits.max_schema_enum:
                exc = LimitExceeded(
                    f"{where} has an enum of {len(enum)} values", "max_schema_enum", limits.max_schema_enum
                )
                raise exc
            estimate += sum(len(v) if isinstance(v, str) else 8 for v in enum) + 8 * len(enum)
        props = node.get("properties")
        if isinstance(props, dict):
            properties += len(props)
            if properties > limits.max_schema_properties:
                limit = limits.max_schema_properties
                raise LimitExceeded(f"{where} has more than {limit} properties", "max_schema_properties", limit)
            estimate += 4 * _RULE_BYTES * len(props)
        if estimate > limits.max_grammar_bytes:
            raise LimitExceeded(
                f"{where} would make a grammar of over {limits.max_grammar_bytes} bytes",
                "max_grammar_bytes",
                limits.max_grammar_bytes,
            )
    return estimate


def _check_lengths(node: dict[str, Any], limits: Limits, where: str) -> None:
    for key, limit in (("minLength", "max_schema_length"), ("maxLength", "max_schema_length")) + (
        ("minItems", "max_schema_items"),
        ("maxItems", "max_schema_items"),
    ):
        value = node.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > getattr(limits, limit):
            raise LimitExceeded(f"{where} sets {key} {value:g}", limit, getattr(limits, limit))
    pattern = node.get("pattern")
    for repeat in pattern_repeats(pattern) if isinstance(pattern, str) else ():
        if repeat > limits.max_schema_length:
            limit = limits.max_schema_length
            raise LimitExceeded(f"{where} has a pattern repeating {repeat} times", "max_schema_length", limit)


def check_grammar(grammar: str, limits: Limits, where: str = "The JSON schema") -> str:
    """The built grammar, checked again against max_grammar_bytes (the estimate is a guide, this is the bound)."""
    if len(grammar) > limits.max_grammar_bytes:
        raise LimitExceeded(
            f"{where} makes a grammar of {len(grammar)} bytes", "max_grammar_bytes", limits.max_grammar_bytes
        )
    return grammar
