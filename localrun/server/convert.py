"""Checked OpenAI bodies -> engine requests (sampling, grammar, tools) and the reply builder for each."""

from __future__ import annotations

from typing import Any

from localrun.engine.messages import GenerateRequest, LoadRequest
from localrun.errors import UserError
from localrun.limits import LimitExceeded, Limits
from localrun.server.protocol import ApiError, ChatBody, CompletionBody, _Sampling, check_tool_arguments
from localrun.server.replies import ChatReply, CompletionReply
from localrun.settings import SamplingParams, validated

# API fields named as the settings are: the penalties and DRY
PENALTY_FIELDS = (
    "presence_penalty",
    "frequency_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
)


API_OVERFLOW = "shorten it, or ask for a model loaded with a larger context"


def sampling(body: _Sampling, *, grammar: str | None = None, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """The request's sampling; what it leaves out comes from defaults (the model's recommended settings)."""
    values: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repeat_penalty": body.repetition_penalty,
        **{name: getattr(body, name) for name in PENALTY_FIELDS},
        "seed": body.seed,
        "stop": body.stops(),
        "ignore_eos": body.ignore_eos,
        "loop_guard": body.loop_guard,
        "grammar": grammar,
        "think": body.think_mode(),
        "think_budget": body.thinking_budget,
    }
    try:
        return validated(SamplingParams, {**(defaults or {}), **{k: v for k, v in values.items() if v is not None}})
    except UserError as exc:
        raise ApiError(400, str(exc)) from None


def chat_request(
    body: ChatBody,
    *,
    model_name: str,
    load: LoadRequest | None,
    recommended: Any = None,
    limits: Limits | None = None,
) -> tuple[GenerateRequest, ChatReply]:
    """The engine request and the reply builder for a chat body (400 for conflicting options).

    recommended: the model's catalog recommendation, whose sampling fills what the body leaves out and
    whose system prompt opens a chat that has none (as `localrun chat` and the UI do). limits: the
    server's, which the schema is checked against before its grammar is built."""
    limits = limits or Limits()
    check_tool_arguments(body.messages)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if choice not in (None, "none") and not tools:
        raise ApiError(400, "tool_choice needs tools: add the tools the model may call.", param="tool_choice")
    if choice == "none":
        tools = []
    grammar = _format_grammar(body, limits)
    forced = choice == "required" or (choice is not None and not isinstance(choice, str))
    if forced:
        if grammar is not None:
            raise ApiError(400, "response_format cannot be combined with a forced tool call.", param="response_format")
        from localrun.engine.structured import tool_call_grammar

        name = None if choice == "required" else choice.function.name
        grammar = _user_error_as_400(lambda: tool_call_grammar(tools, name=name, limits=limits), "tool_choice")
    params = sampling(body, grammar=grammar, defaults=_sampling_of(recommended))
    messages = [m.plain() for m in body.messages]
    system = getattr(recommended, "system", None)
    if system and messages[0]["role"] not in ("system", "developer"):
        messages.insert(0, {"role": "system", "content": system})
    request = GenerateRequest(
        messages=tuple(messages),
        params=params,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        tools=tuple(tools),
        overflow_advice=API_OVERFLOW,
        load=load,
    )
    names = [t["function"]["name"] for t in tools]
    return request, ChatReply(model_name, tool_names=names, parse_tools=bool(tools))


def _format_grammar(body: ChatBody, limits: Limits) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    from localrun.engine.structured import json_schema_grammar

    if fmt.type == "json_object":
        return json_schema_grammar(None, limits=limits)
    if fmt.json_schema is None:
        raise ApiError(400, "response_format json_schema needs a json_schema object.", param="response_format")
    schema = fmt.json_schema.schema_
    return _user_error_as_400(lambda: json_schema_grammar(schema, limits=limits), "response_format")


def _user_error_as_400(build: Any, param: str) -> str:
    try:
        return build()
    except LimitExceeded as exc:
        raise ApiError(400, str(exc), param=param, code="limit_exceeded") from None
    except UserError as exc:
        raise ApiError(400, str(exc), param=param) from None


def _sampling_of(recommended: Any) -> dict[str, Any]:
    return recommended.sampling() if recommended is not None else {}


def completion_request(
    body: CompletionBody,
    *,
    model_name: str,
    load: LoadRequest | None,
    recommended: Any = None,
    limits: Limits | None = None,
) -> tuple[GenerateRequest, CompletionReply]:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "prompt takes one string here (batches of prompts are not supported).", param="prompt")
        prompt = prompt[0]
    request = GenerateRequest(
        prompt=prompt,
        params=sampling(body, defaults=_sampling_of(recommended)),
        max_tokens=body.max_tokens,
        empty_hint="send some text to complete",
        overflow_advice=API_OVERFLOW,
        load=load,
    )
    return request, CompletionReply(model_name)
