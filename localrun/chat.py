"""A conversation with a loaded model: history, system prompt, regenerate. The CLI, the UI worker and the server share it."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from localrun.backends.base import Backend
from localrun.errors import UserError
from localrun.events import GenerationEvent, GenerationSummary
from localrun.generate import check_prompt_fits, check_prompt_text, stream_generate
from localrun.settings import SamplingParams

# The fallback template writes "User: ..." turns: a model without its own template would go on to write
# the user's next turn too, so replies under it end where one begins.
FALLBACK_STOP = "\nUser:"
CHAT_HINT = "type a message, or pass one with -p"


def has_chat_template(backend: Backend) -> bool:
    """False for a model that ships no chat template (base models): chat then uses the plain fallback."""
    report = getattr(backend, "report", None)
    return bool(getattr(report, "chat_template", True))


def complete(
    backend: Backend, text: str, params: SamplingParams, *, cancel: threading.Event | None = None
) -> Iterator[GenerationEvent]:
    """Plain completion of `text`, no roles: what a one-shot prompt means to a model without a chat template."""
    check_prompt_text(text, hint=CHAT_HINT)
    ids = backend.tokenize(text)
    check_prompt_fits(len(ids), backend.report.n_ctx)
    yield from stream_generate(backend, ids, params, cancel=cancel)


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
        if not messages:
            raise UserError("There is no message to answer: send one first.")
        before = self.messages
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        parts: list[str] = []
        if not has_chat_template(self.backend) and FALLBACK_STOP not in params.stop:
            params = params.replace(stop=(*params.stop, FALLBACK_STOP))
        try:
            ids = self.prompt_ids(params)  # inside the try: a refused prompt is undone too
            for event in stream_generate(self.backend, ids, params, cancel=cancel):
                parts.append(event.text)
                if event.summary is not None:
                    self.last = event.summary
                yield event
        finally:
            reply = "".join(parts)
            self.messages = after_turn(
                before, self.messages, {"role": "assistant", "content": reply} if reply else None
            )

    def prompt_ids(self, params: SamplingParams) -> list[int]:
        """The rendered conversation as token ids, trimmed to leave room for the reply."""
        n_ctx = self.backend.report.n_ctx
        room = n_ctx - min(params.max_tokens, n_ctx // 2)
        history = list(self.messages)
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.backend.tokenize(self.backend.render_chat(head + history))
            if not n_ctx or len(ids) <= room or len(history) <= 1:  # n_ctx 0: a remote engine's, unknown here
                break
            history = history[2:] if len(history) > 2 else history[1:]
        check_prompt_fits(len(ids), n_ctx)
        return ids


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
