"""OpenAI response shapes built from GenerationEvents: chunks for streaming, whole objects otherwise."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from localrun.engine.events import GenerationEvent, GenerationSummary
from localrun.engine.structured import TOOL_CALL_OPEN
from localrun.engine.tools import ParsedReply, parse_reply


def usage(summary: GenerationSummary) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens are the prompt tokens the model's cache held already."""
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.generated_tokens,
        "total_tokens": summary.prompt_tokens + summary.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens(summary)},
        "completion_tokens_details": {"reasoning_tokens": summary.reasoning_tokens},
    }


def cached_tokens(summary: GenerationSummary) -> int:
    return max(summary.prompt_tokens - summary.prefill_tokens, 0) if summary.generated_tokens else 0


def openai_finish(summary: GenerationSummary) -> str:
    """The finish reason an OpenAI client understands: our loop guard's "repetition" is a "stop" there (the
    localrun field says which)."""
    return "stop" if summary.finish_reason == "repetition" else summary.finish_reason


def figures(summary: GenerationSummary, *, tool_call_error: str | None = None) -> dict[str, Any]:
    """Our own figures, in an extra field standard clients ignore (finish_reason: ours, "repetition" too)."""
    out = {
        "finish_reason": summary.finish_reason,
        "ttft_s": summary.ttft_s,
        "prompt_tps": summary.prompt_tps,
        "decode_tps": summary.decode_tps,
        "cached_tokens": summary.cached_tokens,
        "draft_tokens": summary.draft_tokens,
        "accepted_tokens": summary.accepted_tokens,
        "acceptance_rate": summary.acceptance_rate,
        "peak_ram_bytes": summary.peak_ram_bytes,
        "peak_vram_bytes": summary.peak_vram_bytes,
        "backend": summary.backend,
        "device": summary.device,
        "reasoning_tokens": summary.reasoning_tokens,
        "reasoning_s": summary.reasoning_s,
        "reasoning_cut": summary.reasoning_cut,
    }
    if tool_call_error:
        out["tool_call_error"] = tool_call_error
    return out


class ToolCallSplitter:
    """Streams content until a <tool_call> tag starts, then holds the rest back to parse at the end."""

    def __init__(self, tool_names: Sequence[str]) -> None:
        self.tool_names = tuple(tool_names)
        self._buf = ""
        self._in_call = False

    def feed(self, text: str) -> str:
        """The text that is safe to stream as content now."""
        if self._in_call:
            self._buf += text
            return ""
        buf = self._buf + text
        start = buf.find(TOOL_CALL_OPEN)
        if start >= 0:
            self._in_call, self._buf = True, buf[start:]
            return buf[:start]
        hold = next(
            (k for k in range(min(len(TOOL_CALL_OPEN) - 1, len(buf)), 0, -1) if buf.endswith(TOOL_CALL_OPEN[:k])), 0
        )
        self._buf = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def finish(self) -> ParsedReply:
        """The held-back tail: parsed calls, or the raw text with the reason it did not parse."""
        if not self._in_call:
            return ParsedReply(self._buf)
        return parse_reply(self._buf, self.tool_names)


class _Reply:
    """What every reply of one request shares: its id, model and creation time, and the usage chunk."""

    chunk_object = ""

    def __init__(self, model: str, id_prefix: str) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def usage_chunk(self, summary: GenerationSummary) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage=usage(summary), localrun=figures(summary))

    def outcome(self, summary: GenerationSummary) -> str:
        """The finish reason the client is told, for the metrics."""
        return openai_finish(summary)


class ChatReply(_Reply):
    """Builds chat.completion chunks (and the whole object) for one request."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, model: str, *, tool_names: Sequence[str] = (), parse_tools: bool = False) -> None:
        super().__init__(model, "chatcmpl")
        self.splitter = ToolCallSplitter(tool_names) if parse_tools else None

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._envelope(self.chunk_object, [choice], **extra)

    def first_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def outcome(self, summary: GenerationSummary) -> str:
        if self.splitter and parse_reply(summary.text, self.splitter.tool_names).tool_calls:
            return "tool_calls"
        return super().outcome(summary)

    def chunks(self, event: GenerationEvent) -> list[dict[str, Any]]:
        """The chunks one event produces (the last event adds tool calls and the finish reason)."""
        text = self.splitter.feed(event.text) if self.splitter else event.text
        out = [self._chunk({"reasoning_content": event.reasoning})] if event.reasoning else []
        if text:
            out.append(self._chunk({"content": text}))
        if event.summary is None:
            return out
        parsed = self.splitter.finish() if self.splitter else ParsedReply("")
        if parsed.content:
            out.append(self._chunk({"content": parsed.content}))
        for i, call in enumerate(parsed.tool_calls):
            head = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append(self._chunk({"tool_calls": [head]}))
            out.append(self._chunk({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}))
        finish = "tool_calls" if parsed.tool_calls else openai_finish(event.summary)
        out.append(self._chunk({}, finish, localrun=figures(event.summary, tool_call_error=parsed.error)))
        return out

    def whole(self, summary: GenerationSummary) -> dict[str, Any]:
        parsed = parse_reply(summary.text, self.splitter.tool_names) if self.splitter else ParsedReply(summary.text)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None, "refusal": None}
        if summary.reasoning:  # a thinking model's block, as DeepSeek, vLLM and llama-server name it
            message["reasoning_content"] = summary.reasoning
        if parsed.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in parsed.tool_calls
            ]
        else:
            message["content"] = parsed.content
        finish = "tool_calls" if parsed.tool_calls else openai_finish(summary)
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return self._envelope(
            "chat.completion", [choice], usage=usage(summary), localrun=figures(summary, tool_call_error=parsed.error)
        )


class CompletionReply(_Reply):
    """Builds text_completion chunks and objects."""

    chunk_object = "text_completion"

    def __init__(self, model: str) -> None:
        super().__init__(model, "cmpl")

    def _obj(self, text: str, finish: str | None, reasoning: str = "", **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if reasoning:  # a thinking model's block, apart from the text (an extension, as in chat replies)
            choice["reasoning_content"] = reasoning
        return self._envelope(self.chunk_object, [choice], **extra)

    def first_chunk(self) -> None:
        return None

    def chunks(self, event: GenerationEvent) -> list[dict[str, Any]]:
        if event.summary is None:
            return [self._obj(event.text, None, event.reasoning)] if event.text or event.reasoning else []
        finish = openai_finish(event.summary)
        return [self._obj(event.text, finish, event.reasoning, localrun=figures(event.summary))]

    def whole(self, summary: GenerationSummary) -> dict[str, Any]:
        return self._obj(
            summary.text, openai_finish(summary), summary.reasoning, usage=usage(summary), localrun=figures(summary)
        )
