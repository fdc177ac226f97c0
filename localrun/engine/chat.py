"""A conversation with a loaded model: history, system prompt, regenerate. The REPL and replay keep one; each
turn is a GenerateRequest run by the engine (localrun.engine.jobs), as the UI's and the API's are."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from localrun.backends.base import Backend
from localrun.engine.events import GenerationEvent, GenerationSummary
from localrun.engine.generate import check_prompt_text
from localrun.engine.jobs import FALLBACK_STOP, has_chat_template, run
from localrun.engine.messages import GenerateRequest, clean_messages
from localrun.errors import UserError
from localrun.settings import SamplingParams

__all__ = ["FALLBACK_STOP", "ChatSession", "complete", "has_chat_template"]

CHAT_HINT = "type a message, or pass one with -p"


def complete(
    backend: Backend, text: str, params: SamplingParams, *, cancel: threading.Event | None = None
) -> Iterator[GenerationEvent]:
    """Plain completion of `text`, no roles: what a one-shot prompt means to a model without a chat template."""
    request = GenerateRequest(prompt=text, params=params, max_tokens=params.max_tokens, empty_hint=CHAT_HINT)
    yield from run(backend, request, cancel)


class ChatSession:
    """Keeps the messages; each reply streams GenerationEvents and is appended to the history.

    answer() replies to a given history; send() and regenerate() are answer() on the session's own.
    A reply that is stopped part-way keeps its partial text, as other chat tools do. A turn that
    produced nothing (an error, or stopped before the first token) is undone: the history goes back
    to what it was (send() loses its user message, regenerate() gets the previous reply back), so
    roles keep alternating (some templates refuse anything else). When the conversation outgrows the context, the oldest
    turns are dropped (the system prompt stays).
    """

    def __init__(self, backend: Backend, *, system: str | None = None) -> None:
        self.backend = backend
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last: GenerationSummary | None = None

    def clear(self) -> None:
        self.messages.clear()
        self.last = None

    def send(
        self, text: str, params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        """Add a user message and stream the assistant's reply."""
        check_prompt_text(text, hint=CHAT_HINT)
        yield from self.answer([*self.messages, {"role": "user", "content": text}], params, cancel=cancel)

    def regenerate(self, params: SamplingParams, *, cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Drop the last reply and answer the last user message again."""
        yield from self.answer(without_last_reply(self.messages), params, cancel=cancel)

    def answer(
        self, messages: Sequence[dict[str, str]], params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> Iterator[GenerationEvent]:
        """Make messages the history and stream the reply to its last message (appended when it ends).

        A turn that produces nothing is undone: the history goes back to what it was before the call."""
        before = self.messages
        self.messages = list(clean_messages(messages))
        parts: list[str] = []
        try:
            request = GenerateRequest.chat(self.messages, params, system=self.system)
            for event in run(self.backend, request, cancel):  # a refused prompt (none, too long) is undone too
                parts.append(event.text)
                if event.summary is not None:
                    self.last = event.summary
                yield event
        finally:
            reply = "".join(parts)
            self.messages = after_turn(
                before, self.messages, {"role": "assistant", "content": reply} if reply else None
            )


def without_last_reply(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """What regenerating answers: the history without its trailing replies (UserError when nothing is left)."""
    history = list(messages)
    while history and history[-1]["role"] == "assistant":
        history.pop()
    if not history:
        raise UserError("There is nothing to regenerate yet: send a message first.")
    return history


def after_turn(before: list[dict[str, str]], turn: list[dict[str, str]], reply: dict[str, str] | None) -> list:
    """The history after a turn: the turn and its reply, or, when nothing came back, the history from before
    the turn (it did not happen; a second user message in a row would be refused by some templates)."""
    return [*turn, reply] if reply is not None else list(before)
