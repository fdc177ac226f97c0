"""The request kinds the API adds to the worker protocol, and their handlers (run where the model is).

Each is one frozen dataclass and one handler that turns it into GenerationEvents. The server has
already checked the request's shape; what needs the loaded model (the prompt's length against the
context, grammar support) is checked here, before the first token, as a UserError.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from localrun.errors import UserError
from localrun.events import GenerationEvent
from localrun.settings import SamplingParams


@dataclass(frozen=True, slots=True)
class ApiChatRequest:
    """An OpenAI-style chat: messages (roles system/user/assistant/tool), optional tools.

    max_tokens None means the rest of the context, as the OpenAI API does.
    """

    messages: tuple[dict[str, Any], ...]
    params: SamplingParams
    max_tokens: int | None = None
    tools: tuple[dict[str, Any], ...] = ()
    model: str | None = None


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A plain completion: the prompt text as it is, no chat template."""

    prompt: str
    params: SamplingParams
    max_tokens: int | None = None
    model: str | None = None


@dataclass
class CancelWatch:
    """A cancel flag that also counts the tokens that came out after it was set (the overrun)."""

    event: threading.Event = field(default_factory=threading.Event)
    overrun_tokens: int = 0

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def run_chat(backend: Any, request: ApiChatRequest, cancel: CancelWatch) -> Iterator[GenerationEvent]:
    from localrun.tools import render_tool_chat

    prompt = render_tool_chat(backend, request.messages, request.tools)
    yield from _generate(backend, backend.tokenize(prompt), request.params, request.max_tokens, cancel)


def run_completion(backend: Any, request: CompletionRequest, cancel: CancelWatch) -> Iterator[GenerationEvent]:
    if not request.prompt:
        raise UserError("The prompt is empty: send some text to complete.")
    yield from _generate(backend, backend.tokenize(request.prompt), request.params, request.max_tokens, cancel)


HANDLERS = {ApiChatRequest: run_chat, CompletionRequest: run_completion}


def _generate(
    backend: Any, ids: Sequence[int], params: SamplingParams, max_tokens: int | None, cancel: CancelWatch
) -> Iterator[GenerationEvent]:
    from localrun.generate import stream_generate

    if params.grammar and not getattr(backend, "supports_grammar", False):
        raise UserError(
            f"response_format and forced tool calls need grammar-constrained sampling, which the {backend.name} backend does not have: use a GGUF model."
        )
    n_ctx = backend.report.n_ctx
    if len(ids) >= n_ctx:
        raise UserError(f"The prompt is {len(ids)} tokens, more than the model's context of {n_ctx} tokens.")
    room = n_ctx - len(ids)
    if max_tokens is not None and max_tokens > room:
        raise UserError(
            f"The prompt is {len(ids)} tokens and max_tokens {max_tokens}, more than the model's context of {n_ctx} tokens: lower max_tokens to {room} or less."
        )
    params = params.replace(max_tokens=max_tokens or room)
    for event in stream_generate(backend, ids, params, cancel=cancel.event):
        if cancel.is_set() and event.token_ids:
            cancel.overrun_tokens += len(event.token_ids)
        yield event
