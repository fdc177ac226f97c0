"""Structured output and tool calls through `localrun serve`, with the official openai client, on the default
model: JSON-schema replies, a tool round trip, calls that do not parse, and the chat tab's JSON schema field."""

from __future__ import annotations

import json

import pytest

from tests.serve_support import KEY, keyed_server, metric

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    yield from keyed_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "mood", "likes_tea"],
    "additionalProperties": False,
}
SUBJECTS = [
    "a baker",
    "a pilot",
    "a child",
    "a farmer",
    "a poet",
    "a nurse",
    "a chess player",
    "a sailor",
    "a teacher",
    "a painter",
    "a runner",
    "a cook",
    "a doctor",
    "a singer",
    "a miner",
    "a monk",
    "a driver",
    "a judge",
    "a gardener",
    "a student",
]


def _validate(obj: object) -> None:
    """PERSON_SCHEMA by hand (the test must not trust the code under test to check it)."""
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "mood", "likes_tea"}
    assert isinstance(obj["name"], str) and 1 <= len(obj["name"]) <= 24
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    assert obj["mood"] in ("happy", "sad", "calm") and isinstance(obj["likes_tea"], bool)


def test_json_schema_replies_validate(client, model):
    """Every keyword of PERSON_SCHEMA is in the grammar (bounded strings and integers), so each reply can
    only end once the object is complete: 300 tokens is more than the longest one the grammar allows."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    for i, subject in enumerate(SUBJECTS):
        sampled = i % 2 == 1
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Describe {subject} as JSON."}],
            response_format=fmt,
            max_tokens=300,
            temperature=0.8 if sampled else 0,
            seed=i,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        _validate(json.loads(choice.message.content))


def test_openai_parse_helper_gets_a_pydantic_object(client, model):
    """`client.chat.completions.parse(response_format=Model)` sends a strict schema and parses the reply."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(min_length=1, max_length=30)
        population_millions: int = Field(ge=0, le=50)
        continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]

    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris."}],
        response_format=City,
        max_tokens=200,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)
    assert choice.message.parsed == City.model_validate_json(choice.message.content)


def test_json_object_and_bad_schema(client, model):
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # a free-form object may run long; what came out is still a JSON prefix starting an object
        assert reply.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}},
        )
    assert err.value.body["param"] == "response_format"
    email = {"type": "object", "properties": {"to": {"type": "string", "format": "email"}}}
    with pytest.raises(openai.BadRequestError) as err:  # a keyword the grammar would skip: refused, not ignored
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": email}},
        )
    assert err.value.status_code == 400 and "'email'" in err.value.body["message"]
    assert err.value.body["param"] == "response_format"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


NAMED_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


def test_tool_round_trip(server, client, model):
    """The openai package's streaming helper accumulates the call; a strict tool gets its arguments parsed."""
    counted = 'localrun_requests_total{route="/v1/chat/completions",status="tool_calls"}'
    calls_before = metric(server, counted)
    strict_tool = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.chat.completions.stream(
        model=model, messages=messages, tools=[strict_tool], tool_choice=NAMED_CHOICE, max_tokens=100, temperature=0
    ) as stream:
        events = list(stream)
        completion = stream.get_final_completion()
    deltas = [
        d for e in events if e.type == "chunk" and e.chunk.choices for d in e.chunk.choices[0].delta.tool_calls or []
    ]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])  # later deltas only carry arguments
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [e.name for e in done] == ["get_weather"]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert metric(server, counted) == calls_before + 1  # the metrics count what the client was told
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.id == deltas[0].id and call.function.parsed_arguments == arguments == done[0].parsed_arguments
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str) and len(arguments["city"]) <= 40
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    final = list(
        client.chat.completions.create(
            model=model, messages=messages, tools=[WEATHER_TOOL], max_tokens=40, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in final if c.choices)
    assert text.strip() and final[-1].choices[0].finish_reason in ("stop", "length")
    assert not any(c.choices[0].delta.tool_calls for c in final if c.choices)


def test_truncated_tool_call_keeps_the_raw_text(client, model):
    """A call cut short by max_tokens does not parse: the reply is its raw text and says why, streamed or not."""
    request = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": NAMED_CHOICE,
        "max_tokens": 6,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("<tool_call>")
    assert "could not be parsed" in whole.model_extra["localrun"]["tool_call_error"]
    chunks = [c for c in client.chat.completions.create(**request, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["localrun"]["tool_call_error"] == whole.model_extra["localrun"]["tool_call_error"]


def test_unparsable_tool_call_keeps_the_raw_text():
    from localrun.server.replies import ToolCallSplitter

    splitter = ToolCallSplitter(["get_weather"])
    shown = splitter.feed("Let me check. <tool_") + splitter.feed('call>\n{"name": "get_weather", "arguments": {"ci')
    parsed = splitter.finish()
    assert shown == "Let me check. "
    assert parsed.tool_calls == () and parsed.content.startswith("<tool_call>") and "closing" in parsed.error


def test_chat_tab_json_schema_field_uses_the_grammar(llama_backend):
    """The UI's "JSON schema" field: the same grammar path, straight on the engine."""
    from localrun.engine.generate import generate
    from localrun.engine.structured import with_json_schema
    from localrun.errors import UserError
    from localrun.settings import SamplingParams

    params = with_json_schema(SamplingParams(temperature=0, max_tokens=120), json.dumps(PERSON_SCHEMA))
    prompt = llama_backend.render_chat([{"role": "user", "content": "Describe a fisherman."}])
    summary = generate(llama_backend, llama_backend.tokenize(prompt), params)
    assert summary.finish_reason == "stop"
    _validate(json.loads(summary.text))
    assert with_json_schema(params.replace(grammar=None), "  ").grammar is None
    with pytest.raises(UserError, match="not valid JSON"):
        with_json_schema(params, "{type: object}")
