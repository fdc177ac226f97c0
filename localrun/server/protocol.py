"""The OpenAI request bodies we accept, checked strictly: a field we do not support is a 400, never ignored.

A few fields clients send by habit (logprobs false, n 1, user) are accepted when they ask for nothing.
top_k, min_p, repetition_penalty, ignore_eos and the DRY fields are accepted as extensions, named as
llama-server names them. The bounds of the sampling fields are the settings' own (localrun.settings).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localrun.limits import LimitExceeded, Limits, loads
from localrun.records import fields
from localrun.settings import SamplingParams

# Fields that are fine when they ask for the default behaviour, and refused otherwise.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "parallel_tool_calls": (None, True, False),
    "user": (),  # any value: an end-user id for abuse tracking, which a local server has no use for
    "store": (None, False),
    "metadata": (None, {}),
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": (None, ""),
}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict[str, Any]:
        """The message as the engine takes it: content as one string."""
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


def _setting(name: str) -> Any:
    """An optional API field bounded as the settings field `name` is (one declaration of the bounds)."""
    c = fields(SamplingParams)[name].check
    return Field(None, ge=c.ge, gt=c.gt, le=c.le)


class _Sampling(_Strict):
    model: str
    temperature: float | None = _setting("temperature")
    top_p: float | None = _setting("top_p")
    max_tokens: int | None = _setting("max_tokens")
    stop: str | list[str] | None = None
    seed: int | None = _setting("seed")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    # extensions (vLLM and llama-server accept these too)
    top_k: int | None = _setting("top_k")
    min_p: float | None = _setting("min_p")
    repetition_penalty: float | None = _setting("repeat_penalty")
    presence_penalty: float | None = _setting("presence_penalty")
    frequency_penalty: float | None = _setting("frequency_penalty")
    dry_multiplier: float | None = _setting("dry_multiplier")
    dry_base: float | None = _setting("dry_base")
    dry_allowed_length: int | None = _setting("dry_allowed_length")
    dry_penalty_last_n: int | None = _setting("dry_penalty_last_n")
    ignore_eos: bool = False
    loop_guard: bool | None = None  # ours: false lets a looping reply run on
    keep_alive: float | str | None = None  # as Ollama's: how long the model stays loaded once idle ("5m", 0, -1)
    # thinking models: OpenAI's reasoning_effort ("none" answers without thinking), Ollama's think, a budget
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    thinking_budget: int | None = _setting("think_budget")

    def think_mode(self) -> str | None:
        """The settings' think value the request asks for (None: the model's default)."""
        if self.think is not None and self.reasoning_effort is not None:
            raise ApiError(400, "Give think or reasoning_effort, not both.", param="think")
        if self.reasoning_effort is not None:
            return {"none": "off", "minimal": "low"}.get(self.reasoning_effort, self.reasoning_effort)
        if isinstance(self.think, bool):
            return "on" if self.think else "off"
        return self.think

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "stop takes at most 4 strings.", param="stop")
        return tuple(stops)


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = _setting("max_tokens")
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str]


def parse_body(raw: bytes, model: type[_Sampling], limits: Limits | None = None) -> Any:
    """Parse and check a request body, raising ApiError(400) with the offending parameter.

    The limits are checked first: nesting depth before json.loads, counts before pydantic."""
    limits = limits or Limits()
    try:
        data = loads(raw, limits)
    except LimitExceeded as exc:
        raise ApiError(400, str(exc), code="limit_exceeded") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    _check_counts(data, limits)
    for key in [k for k in data if k not in model.model_fields]:
        neutral = _NEUTRAL.get(key)
        if neutral is None or (neutral and data[key] not in neutral):
            raise ApiError(
                400,
                f"localrun does not support the parameter {key!r} (value {_short(data[key])}): leave it out.",
                param=key,
                code="unsupported_parameter",
            )
        del data[key]
    try:
        body = model.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise ApiError(400, f"Invalid {param}: {err['msg']}.", param=param) from None
    if body.stream_options is not None and not body.stream:  # as OpenAI answers: it would have no effect
        raise ApiError(400, "stream_options is only allowed when stream is true.", param="stream_options")
    return body


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_counts(data: dict[str, Any], limits: Limits) -> None:
    """The limits on counts and lengths, before validation spends time on a body over them."""
    counted = (("messages", "max_messages", "messages"), ("tools", "max_tools", "tools"))
    for key, limit, noun in counted:
        items = data.get(key)
        if isinstance(items, list) and len(items) > getattr(limits, limit):
            exc = LimitExceeded(f"The request has {len(items)} {noun}", limit, getattr(limits, limit))
            raise ApiError(400, str(exc), param=key, code="limit_exceeded")
    stops = data.get("stop")
    for stop in [stops] if isinstance(stops, str) else stops if isinstance(stops, list) else []:
        if isinstance(stop, str) and len(stop) > limits.max_stop_chars:
            exc = LimitExceeded(f"A stop string of {len(stop)} characters", "max_stop_chars", limits.max_stop_chars)
            raise ApiError(400, str(exc), param="stop", code="limit_exceeded")


def check_tool_arguments(messages: list[Message]) -> None:
    """400 for an assistant tool call in the history whose arguments are not a JSON object."""
    for i, message in enumerate(messages):
        for j, call in enumerate(message.tool_calls or []):
            where = f"messages.{i}.tool_calls.{j}.function.arguments"
            try:
                args = json.loads(call.function.arguments or "{}", parse_constant=_no_constant)
            except (ValueError, RecursionError):
                args = None
            if not isinstance(args, dict):
                raise ApiError(400, f"Invalid {where}: it must be a JSON object, as text.", param=where)


def _no_constant(name: str) -> Any:
    raise ValueError(name)
