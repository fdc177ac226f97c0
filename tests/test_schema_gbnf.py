"""JSON schema -> GBNF: every keyword is enforced or refused, and integer ranges hold while sampling."""

from __future__ import annotations

import json
import re

import pytest

from localrun.engine.schema_gbnf import integer_bounds, integer_range_rule, prepare
from localrun.errors import UserError


def _as_regex(rule: str) -> str:
    """The range rule's GBNF (literals, [a-b] classes, alternation, one group) read as a regex."""
    return re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), rule).replace(" ", "")


@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 120), (-15, 7), (13, 2871), (-300, -12), (5, 5), (0, 0), (-1, 0), (999, 1000), (None, 5), (100, None)],
)
def test_integer_range_rule_matches_exactly_the_range(low, high):
    regex = _as_regex(integer_range_rule(low, high))
    lo = -(10**15) + 1 if low is None else low
    hi = 10**15 - 1 if high is None else high
    for n in range(-3100, 3100):
        assert bool(re.fullmatch(regex, str(n))) == (lo <= n <= hi), n
    for text in ("-0", "007", "01", "+1", ""):  # JSON has no leading zeros or plus signs
        assert not re.fullmatch(regex, text)
    if low is None:
        assert re.fullmatch(regex, str(-(10**15) + 1)) and not re.fullmatch(regex, str(-(10**15)))


def test_integer_bounds_read_every_form():
    assert integer_bounds({"type": "integer", "minimum": 1.5, "exclusiveMaximum": 10}) == (2, 9)
    assert integer_bounds({"type": "integer", "exclusiveMinimum": -1, "maximum": 3.9}) == (0, 3)
    assert integer_bounds({"type": "integer"}) is None
    with pytest.raises(UserError, match="no integer"):
        integer_bounds({"type": "integer", "minimum": 5, "maximum": 4})


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "number", "minimum": 0}, "bounds a number"),
        ({"type": "string", "format": "email"}, "format 'email'"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "pattern and maxLength"),
        ({"type": "object", "required": ["x"]}, "requires 'x'"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"not": {"type": "string"}}, "'not'"),
        ({"type": "object", "minProperties": 1}, "'minProperties'"),
        ({"allOf": [{"type": "object"}, {"required": []}]}, "allOf with several"),
        ({"anyOf": [{"type": "string"}], "maxLength": 2}, "beside anyOf"),
        ({"$ref": "#/$defs/a", "minLength": 2, "$defs": {"a": {"type": "string"}}}, "beside $ref"),
        ({"type": "integer", "multipleOf": 5}, "'multipleOf'"),
        ({"type": "string", "pattern": "ab+"}, "without ^ and $"),
        ({"minimum": 3}, "give it a type"),
        ({"type": "string", "enum": ["a", 3]}, "not of type string"),
        ({"type": "object", "properties": {"a": {"type": "integer", "maximum": "9"}}}, "maximum must be a number"),
        ({"type": "array", "prefixItems": [{"type": "string"}], "minItems": 2}, "exact tuple"),
    ],
)
def test_unenforceable_keywords_are_refused(schema, words):
    with pytest.raises(UserError, match=re.escape(words)):
        prepare(schema)


def test_enforceable_forms_are_rewritten_not_refused():
    optional = {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}], "default": None, "title": "Nick"}
    assert prepare(optional) == {**optional, "anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}
    assert prepare({"type": ["string", "null"], "maxLength": 2}) == {
        "anyOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]
    }
    assert prepare({"allOf": [{"$ref": "#/$defs/c"}], "description": "d", "$defs": {"c": {"enum": [1]}}})["$ref"]
    assert prepare({"type": "array", "maxItems": 2}) == {"type": "array", "maxItems": 2, "items": {}}
    assert prepare({"type": "integer", "maxLength": 4}) == {"type": "integer"}  # a string keyword: no effect
    assert prepare({"properties": {"a": {"type": "boolean"}}})["type"] == "object"


def test_sampled_integers_stay_in_range(llama_backend):
    """High-temperature sampling through llama.cpp's grammar sampler: every integer lands in its range."""
    from localrun.engine.generate import generate
    from localrun.engine.structured import json_schema_grammar
    from localrun.settings import SamplingParams

    schema = {
        "type": "object",
        "properties": {
            "year": {"type": "integer", "minimum": 1890, "exclusiveMaximum": 1915},
            "delta": {"type": "integer", "minimum": -7, "maximum": 3},
            "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 2},
        },
        "required": ["year", "delta", "tags"],
        "additionalProperties": False,
    }
    grammar = json_schema_grammar(schema)
    prompt = llama_backend.render_chat([{"role": "user", "content": "Give me a year and a number as JSON."}])
    for seed in range(4):
        params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=60, seed=seed)
        summary = generate(llama_backend, llama_backend.tokenize(prompt), params.replace(grammar=grammar))
        assert summary.finish_reason == "stop", summary.text
        reply = json.loads(summary.text)
        assert 1890 <= reply["year"] < 1915 and -7 <= reply["delta"] <= 3, reply
        assert 1 <= len(reply["tags"]) <= 2 and set(reply["tags"]) <= {"x", "y"}
