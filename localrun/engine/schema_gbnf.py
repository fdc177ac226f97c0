"""JSON schema -> GBNF, enforcing every keyword the schema uses or refusing the schema.

llama-cpp-python's converter does the bulk of the work, but it silently skips some keywords (integer
minimum/maximum, format "email", minLength next to a pattern, required names without properties...).
A reply "enforced while sampling" must not depend on the model happening to respect those, so:

- `prepare()` walks the schema first. A keyword the grammar cannot enforce is a UserError naming it
  and where it is, never ignored. A few forms are rewritten into ones the converter enforces
  (a one-element allOf, a list of types, items missing beside minItems).
- integer minimum/maximum (and exclusive bounds) become a digit-range grammar of our own.

Enforced: type, properties, required, additionalProperties, items/prefixItems, minItems/maxItems,
enum, const, anyOf, oneOf (as anyOf: a reply matches at least one branch), $ref/$defs, minLength/
maxLength, pattern, format date/time/date-time/uuid, integer bounds. Annotations (title, description,
default, examples...) constrain nothing and pass through.
"""

from __future__ import annotations

import json
import math
from typing import Any

from localrun.errors import UserError

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly"}
    | {"writeOnly", "discriminator", "$defs", "definitions"}
)
_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
}
_KNOWN = frozenset({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}).union(*_BY_TYPE.values())
_UNBOUNDED_DIGITS = 15  # the converter's own integers stop at 16 digits; bounds default to 15


def prepare(schema: Any, where: str = "The JSON schema") -> dict[str, Any]:
    """A copy of schema in the forms the converter enforces; UserError for anything it would skip."""
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise UserError(f"{where} must be a JSON object (a schema), not {json.dumps(schema)[:40]}.")
    unknown = sorted(k for k in schema if k not in _KNOWN and k not in _ANNOTATIONS)
    if unknown:
        raise UserError(
            f"{where} uses {unknown[0]!r}, which localrun cannot enforce while sampling: leave it out "
            "(supported: type, properties, required, additionalProperties, items, prefixItems, minItems, "
            "maxItems, enum, const, anyOf, oneOf, $ref, minLength, maxLength, pattern, format, and integer bounds)."
        )
    out = dict(schema)
    for key in ("$defs", "definitions"):
        if key in out:
            out[key] = {n: prepare(s, _at(where, f"{key}/{n}")) for n, s in _object(out[key], key, where).items()}
    if "allOf" in out:
        out = _merge_all_of(out, where)
    if isinstance(out.get("type"), list):
        return _split_types(out, where)
    for combinator in ("anyOf", "oneOf", "$ref", "enum", "const"):
        if combinator in out:
            return _alone(out, combinator, where)
    kind = out.get("type")
    if kind is None:  # untyped: the keywords say which type is meant (the converter needs to know)
        families = [t for t, keys in _BY_TYPE.items() if keys & set(out)]
        if not families:
            return {}  # constrains nothing; the converter reads {} as any JSON object
        if len(families) > 1 or families == ["integer"]:
            raise UserError(f"{where} has no type but uses {', '.join(families)} keywords: give it a type.")
        out["type"] = kind = families[0]
    if kind not in _TYPES:
        raise UserError(f"{where} has type {kind!r}, which is not a JSON schema type.")
    for other, keys in _BY_TYPE.items():
        if kind != other and keys & set(out):  # e.g. maxLength on an integer: no effect
            out = {k: v for k, v in out.items() if k not in keys}
    if kind == "number" and {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(schema):
        raise UserError(f"{where} bounds a number, which localrun cannot enforce: use an integer, or drop the bound.")
    if kind == "object":
        out = _object_schema(out, where)
    if kind == "array":
        out = _array_schema(out, where)
    if kind == "string":
        _string_schema(out, where)
    if kind == "integer":
        integer_bounds(out, where)  # checks them now
    return out


def _object(value: Any, key: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be a JSON object.")
    return value


def _merge_all_of(schema: dict[str, Any], where: str) -> dict[str, Any]:
    parts = schema["allOf"]
    if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict):
        raise UserError(f"{where} uses allOf with several schemas, which localrun cannot enforce: merge them into one.")
    rest = {k: v for k, v in schema.items() if k != "allOf"}
    clash = (set(rest) & set(parts[0])) - _ANNOTATIONS
    if clash:
        raise UserError(f"{where} sets {sorted(clash)[0]!r} both beside and inside allOf: merge them into one.")
    return {**rest, **parts[0]}


def _split_types(schema: dict[str, Any], where: str) -> dict[str, Any]:
    types = schema["type"]
    rest = {k: v for k, v in schema.items() if k != "type"}
    if not types or not all(isinstance(t, str) for t in types):
        raise UserError(f"{where} has a type list that is empty or not made of names.")
    if len(types) == 1:
        return prepare({**rest, "type": types[0]}, where)
    branches = [prepare({**_no_annotations(rest), "type": t}, f"{where} (as {t})") for t in types]
    return {**_only_annotations(rest), "anyOf": branches}


def _alone(schema: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """anyOf/oneOf/$ref/enum/const: the converter looks at nothing else beside them."""
    if key in ("enum", "const"):  # the values themselves are the constraint; a type beside them adds nothing
        values = schema[key] if key == "enum" else [schema[key]]
        if key == "enum" and (not isinstance(values, list) or not values):
            raise UserError(f"{where}: enum must be a non-empty list.")
        _check_values_fit(schema, values, key, where)
        return {**_only_annotations(schema), key: schema[key]}
    others = sorted(set(_no_annotations(schema)) - {key})
    if others:
        raise UserError(
            f"{where} sets {others[0]!r} beside {key}, which localrun cannot enforce together: "
            f"move it into the {'referenced schema' if key == '$ref' else 'branches'}."
        )
    if key == "$ref":
        return dict(schema)
    branches = schema[key]
    if not isinstance(branches, list) or not branches:
        raise UserError(f"{where}: {key} must be a non-empty list of schemas.")
    return {**schema, key: [prepare(b, _at(where, f"{key}/{i}")) for i, b in enumerate(branches)]}


def _check_values_fit(schema: dict[str, Any], values: list[Any], key: str, where: str) -> None:
    kind = schema.get("type")
    names = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    for value in values:
        fits = (
            isinstance(value, names[kind])
            if kind in names
            else (isinstance(value, int) and not isinstance(value, bool))
            if kind == "integer"
            else (isinstance(value, int | float) and not isinstance(value, bool))
            if kind == "number"
            else True
        )
        if not fits:
            raise UserError(f"{where}: the {key} value {json.dumps(value)} is not of type {kind}.")


def _object_schema(schema: dict[str, Any], where: str) -> dict[str, Any]:
    props = _object(schema.get("properties", {}), "properties", where)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise UserError(f"{where}: required must be a list of property names.")
    missing = [r for r in required if r not in props]
    if missing:
        raise UserError(f"{where} requires {missing[0]!r} without describing it in properties: add it to properties.")
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {n: prepare(s, _at(where, f"properties/{n}")) for n, s in props.items()}
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = prepare(extra, _at(where, "additionalProperties"))
    elif extra is not None and not isinstance(extra, bool):
        raise UserError(f"{where}: additionalProperties must be true, false or a schema.")
    return out


def _array_schema(schema: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(schema)
    counts = [schema.get(k) for k in ("minItems", "maxItems") if k in schema]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise UserError(f"{where}: minItems and maxItems must be whole numbers, 0 or more.")
    if schema.get("minItems", 0) > schema.get("maxItems", math.inf):
        raise UserError(f"{where} allows no array: its minItems is above its maxItems.")
    if "prefixItems" in schema or isinstance(schema.get("items"), list):
        tuple_items = schema.get("prefixItems", schema.get("items"))
        if not isinstance(tuple_items, list) or not tuple_items:
            raise UserError(f"{where}: prefixItems must be a non-empty list of schemas.")
        if counts or ("prefixItems" in schema and schema.get("items", False) is not False):
            raise UserError(
                f"{where} gives prefixItems with items, minItems or maxItems; localrun enforces prefixItems only as "
                "an exact tuple: leave the others out."
            )
        out.pop("items", None)
        out["prefixItems"] = [prepare(s, _at(where, f"prefixItems/{i}")) for i, s in enumerate(tuple_items)]
    elif "items" in schema:
        out["items"] = prepare(schema["items"], _at(where, "items"))
    elif counts:
        out["items"] = {}  # the converter ignores minItems/maxItems without items
    return out


def _string_schema(schema: dict[str, Any], where: str) -> None:
    fmt, has_pattern = schema.get("format"), "pattern" in schema
    lengths = [k for k in ("minLength", "maxLength") if k in schema]
    if fmt is not None and fmt not in _FORMATS:
        raise UserError(
            f"{where} has format {fmt!r}, which localrun cannot enforce: use a pattern, or one of "
            f"{', '.join(sorted(_FORMATS))}."
        )
    if (fmt is not None or has_pattern) and (lengths or (fmt is not None and has_pattern)):
        used = [k for k in ("format", "pattern", *lengths) if k in schema]
        raise UserError(f"{where} combines {' and '.join(used)}, which localrun cannot enforce together: keep one.")
    pattern = schema.get("pattern", "^$")
    if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
        raise UserError(
            f"{where} has a pattern without ^ and $: localrun enforces whole-string patterns, so anchor it."
        )
    if has_pattern:
        schema["pattern"] = check_pattern(pattern, where)
    for k in lengths:
        if not isinstance(schema[k], int) or isinstance(schema[k], bool) or schema[k] < 0:
            raise UserError(f"{where}: {k} must be a whole number, 0 or more.")
    if schema.get("minLength", 0) > schema.get("maxLength", math.inf):
        raise UserError(f"{where} allows no string: its minLength is above its maxLength.")


# The converter copies escapes into GBNF as they are, and GBNF knows few; so they are rewritten first
# (\d as [0-9], \. as [\x2E]) and the ones without a GBNF form are refused.
_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_", "s": " \\t\\n\\r"}
_GBNF_ESCAPES = frozenset("\\tnr")
_LOOKS = {"=": "lookahead", "!": "lookahead", "<": "lookbehind or named group", ":": "non-capturing group"}


def check_pattern(pattern: str, where: str = "The JSON schema") -> str:
    """The pattern in the syntax the grammar writer handles; UserError naming what it cannot express."""
    import re

    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UserError(f"{where} has a pattern that is not a valid regular expression: {exc}.") from None
    body, out, i, in_class = pattern[1:-1], [], 0, False
    while i < len(body):
        c = body[i]
        if c == "\\":
            if i + 1 == len(body):
                raise UserError(f"{where} has a pattern whose $ is escaped: end it with an unescaped $.")
            out.append(_escape(body[i + 1], in_class, where))
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if body[i + 1 : i + 2] == "]":  # a ] first in a class is a literal
                out.append("[\\x5D")
                i += 2
                continue
        elif c == "(" and body[i + 1 : i + 2] == "?":
            kind = _LOOKS.get(body[i + 2 : i + 3], "group flag")
            raise UserError(f"{where} has a pattern with a {kind} '(?', which localrun cannot enforce: leave it out.")
        elif c in "^$":
            raise UserError(f"{where} has a pattern with {c!r} inside it: localrun only enforces ^ and $ at the ends.")
        elif c in "*+?}" and body[i + 1 : i + 2] in ("?", "+"):
            raise UserError(
                f"{where} has a pattern with a lazy or possessive quantifier, which localrun cannot enforce."
            )
        out.append(c)
        i += 1
    return "^" + "".join(out) + "$"


def _escape(esc: str, in_class: bool, where: str) -> str:
    """One regex escape (the character after the backslash) in GBNF-safe regex."""
    if esc in _CLASSES:
        return _CLASSES[esc] if in_class else f"[{_CLASSES[esc]}]"
    if esc.lower() in _CLASSES and not in_class:
        return f"[^{_CLASSES[esc.lower()]}]"
    if esc in _GBNF_ESCAPES or (in_class and esc in "[]"):
        return "\\" + esc
    if not esc.isalnum():
        code = f"\\x{ord(esc):02X}"
        return code if in_class else f"[{code}]"
    what = "a backreference" if esc.isdigit() or esc == "k" else f"the escape \\{esc}"
    raise UserError(f"{where} has a pattern with {what}, which localrun cannot enforce: leave it out.")


def _at(where: str, pointer: str) -> str:
    """Where a nested schema is, for messages: "The JSON schema at /properties/age"."""
    return f"{where}/{pointer}" if " at /" in where else f"{where} at /{pointer}"


def _only_annotations(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k in _ANNOTATIONS}


def _no_annotations(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in _ANNOTATIONS}


# -- integers in a range ----------------------------------------------------------------------------


def integer_bounds(schema: dict[str, Any], where: str = "The JSON schema") -> tuple[int | None, int | None] | None:
    """(lowest, highest) allowed for an integer schema with bounds, None when it has none."""
    keys = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    if schema.get("type") != "integer" or not any(k in schema for k in keys):
        return None
    for k in keys:
        if k in schema and (isinstance(schema[k], bool) or not isinstance(schema[k], int | float)):
            raise UserError(f"{where}: {k} must be a number.")
    lows = [math.ceil(schema["minimum"])] if "minimum" in schema else []
    lows += [math.floor(schema["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in schema else []
    highs = [math.floor(schema["maximum"])] if "maximum" in schema else []
    highs += [math.ceil(schema["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in schema else []
    low, high = max(lows, default=None), min(highs, default=None)
    if low is not None and high is not None and low > high:
        raise UserError(f"{where} allows no integer: its minimum is above its maximum.")
    return low, high


def integer_range_rule(low: int | None, high: int | None) -> str:
    """GBNF for the integers in [low, high] (None: up to 15 digits that way), without leading zeros."""
    limit = 10**_UNBOUNDED_DIGITS - 1
    low = -limit if low is None else low
    high = limit if high is None else high
    alts: list[str] = []
    if low < 0:  # negatives: "-" then the magnitude
        alts += [f'"-" {a}' for a in _natural_range(max(1, -high), -low)]
    if high >= 0:
        alts += _natural_range(max(0, low), high)
    return "(" + " | ".join(alts) + ")"


def _natural_range(low: int, high: int) -> list[str]:
    """Alternatives matching the decimal numbers low..high (low >= 0), one length of number at a time."""
    alts: list[str] = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        first = 0 if digits == 1 else 10 ** (digits - 1)
        lo, hi = max(low, first), min(high, 10**digits - 1)
        if lo <= hi:
            alts += [" ".join(seq) for seq in _same_length(str(lo), str(hi))]
    return alts


def _same_length(lo: str, hi: str) -> list[list[str]]:
    """Sequences of GBNF items matching the digit strings from lo to hi, which have the same length."""
    k = next((i for i, (a, b) in enumerate(zip(lo, hi, strict=True)) if a != b), len(lo))
    prefix = [f'"{lo[:k]}"'] if k else []
    if k == len(lo):
        return [prefix]
    a, b, rest = int(lo[k]), int(hi[k]), len(lo) - k - 1
    tail_lo, tail_hi = lo[k + 1 :], hi[k + 1 :]
    any_digits = ["[0-9]"] * rest
    out: list[list[str]] = []
    start, end = a, b
    if tail_lo != "0" * rest:
        out += [[*prefix, f'"{a}"', *seq] for seq in _same_length(tail_lo, "9" * rest)]
        start = a + 1
    tail_end: list[list[str]] = []
    if tail_hi != "9" * rest:
        tail_end = [[*prefix, f'"{b}"', *seq] for seq in _same_length("0" * rest, tail_hi)]
        end = b - 1
    if start <= end:
        out.append([*prefix, _digit_class(start, end), *any_digits])
    return out + tail_end


def _digit_class(a: int, b: int) -> str:
    return f'"{a}"' if a == b else f"[{a}-{b}]"
