"""Tool calls: rendering tool schemas into a prompt, and finding the calls in a model's output.

A model's own chat template renders the tools when it knows how (the template is given `tools=`).
Where it ignores them (SmolLM2's does), the tools go into the system prompt in this format, the
Hermes/Qwen convention that many small models were trained on:

    You can call functions. To call one, reply with only:
    <tool_call>
    {"name": "<function name>", "arguments": {<arguments as JSON>}}
    </tool_call>
    The functions, as JSON schemas:
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}

Earlier calls in the history are written back in the same tagged form, and tool results go in as
user messages wrapped in <tool_response> tags.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localrun.engine.structured import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

TOOLS_PREAMBLE = (
    "You can call functions. To call one, reply with only:\n"
    f"{TOOL_CALL_OPEN}\n"
    '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n'
    f"{TOOL_CALL_CLOSE}\n"
    "The functions, as JSON schemas:\n"
)
_PROBE_NAME = "localrun_probe_7f3a"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed call: arguments are JSON text, as the OpenAI API carries them."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """What a reply said: plain content, tool calls, and why a call could not be read (if so)."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    error: str | None = None


def template_renders_tools(backend: Any) -> bool:
    """Whether the model's chat template puts the tools into the prompt (probed by rendering one)."""
    probe = [{"type": "function", "function": {"name": _PROBE_NAME, "parameters": {"type": "object"}}}]
    try:
        text = backend.render_chat([{"role": "user", "content": "hi"}], tools=probe)
    except Exception:  # a template that chokes on tools does not render them
        return False
    return _PROBE_NAME in text


def render_tool_chat(
    backend: Any,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]],
    variables: dict[str, Any] | None = None,
) -> str:
    """The prompt for a chat that may involve tools, through the template or the documented fallback.
    variables: more for the template (enable_thinking, reasoning_effort), passed only when there are some."""
    extra = {"variables": variables} if variables else {}
    if tools and template_renders_tools(backend):
        return backend.render_chat([_native(m) for m in messages], tools=tools, **extra)
    return backend.render_chat(inline_tools(messages, tools), **extra)


def inline_tools(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Plain role/content messages: tools in the system prompt, calls and results as tagged text."""
    out: list[dict[str, str]] = []
    if tools:
        listing = TOOLS_PREAMBLE + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        first = messages[0] if messages else None
        if first is not None and first["role"] in ("system", "developer"):
            out.append({"role": "system", "content": f"{first.get('content') or ''}\n\n{listing}".lstrip()})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": listing})
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            content = f"{content}\n{calls}".lstrip()
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if out and out[-1]["role"] == role == "user":  # tool results in a row: one user turn
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{content}"}
        else:
            out.append({"role": role, "content": content})
    return out


def format_call(name: str, arguments: str | dict) -> str:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def _native(m: dict[str, Any]) -> dict[str, Any]:
    """A message for a template that knows tools: call arguments as objects, as HF templates expect."""
    if m["role"] != "assistant" or not m.get("tool_calls"):
        return m
    calls = [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
        for c in m["tool_calls"]
    ]
    return {**m, "tool_calls": calls}


def parse_reply(text: str, tool_names: Sequence[str]) -> ParsedReply:
    """Split a reply into content and <tool_call> blocks; a block that does not parse keeps the raw text."""
    if TOOL_CALL_OPEN not in text:
        return ParsedReply(text)
    head, _, rest = text.partition(TOOL_CALL_OPEN)
    calls: list[ToolCall] = []
    for block in (TOOL_CALL_OPEN + rest).split(TOOL_CALL_OPEN)[1:]:
        body, closed, _tail = block.partition(TOOL_CALL_CLOSE)
        problem = _check_call(body, closed, tool_names)
        if isinstance(problem, str):
            return ParsedReply(text, (), f"The model's tool call could not be parsed: {problem}.")
        calls.append(problem)
    return ParsedReply(head.strip(), tuple(calls))


def _check_call(body: str, closed: str, tool_names: Sequence[str]) -> ToolCall | str:
    if not closed:
        return f"no closing {TOOL_CALL_CLOSE} tag (the reply may have hit max_tokens)"
    try:
        call = json.loads(body)
    except ValueError as exc:
        return f"it is not valid JSON ({exc})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return 'it has no "name"'
    if call["name"] not in tool_names:
        return f"it names {call['name']!r}, which is not among the tools"
    args = call.get("arguments", call.get("parameters", {}))
    if not isinstance(args, dict):
        return '"arguments" is not a JSON object'
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(args, ensure_ascii=False))
