"""A conversation with a loaded model: history, system prompt, regenerate. CLI and UI share it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from localrun.backends.base import Backend
from localrun.errors import UserError
from localrun.events import GenerationEvent, GenerationSummary
from localrun.generate import stream_generate
from localrun.settings import SamplingParams

# The fallback template writes "User: ..." turns: a model without its own template would go on to write
# the user's next turn too, so replies under it end where one begins.
FALLBACK_STOP = "\nUser:"


def has_chat_template(backend: Backend) -> bool:
    """False for a model that ships no chat template (base models): chat then uses the plain fallback."""
    report = getattr(backend, "report", None)
    return bool(getattr(report, "chat_template", True))


def complete(
    backend: Backend, text: str, params: SamplingParams, *, cancel: threading.Event | None = None
) -> Iterator[GenerationEvent]:
    """Plain completion of `text`, no roles: what a one-shot prompt means to a model without a chat template."""
    if not text.strip():
        raise UserError("The prompt is empty: type a message, or pass one with -p.")
    ids = backend.tokenize(text)
    if len(ids) >= backend.report.n_ctx:
        raise UserError(
            f"The prompt is {len(ids)} tokens, more than the context of {backend.report.n_ctx}: shorten it or load with a larger --n-ctx."
        )
    yield from stream_generate(backend, ids, params, cancel=cancel)


class ChatSession:
    """Keeps the messages; each reply streams GenerationEvents and is appended to the history.

    A reply that is stopped part-way keeps its partial text, as other chat tools do. A turn that
    produced nothing (an error, or stopped before the first token) is undone: send() takes its
    user message back out and regenerate() restores the previous reply, so roles keep alternating
    (some templates refuse anything else). When the conversation outgrows the context, the oldest
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
        if not text.strip():
            raise UserError("The prompt is empty: type a message, or pass one with -p.")
        self.messages.append({"role": "user", "content": text})
        yield from self._reply(params, cancel, undo=self.messages.pop)

    def regenerate(self, params: SamplingParams, *, cancel: threading.Event | None = None) -> Iterator[GenerationEvent]:
        """Drop the last reply and answer the last user message again."""
        previous = self.messages.pop() if self.messages and self.messages[-1]["role"] == "assistant" else None
        if not self.messages:
            raise UserError("There is nothing to regenerate yet: send a message first.")
        yield from self._reply(params, cancel, undo=lambda: previous and self.messages.append(previous))

    def prompt_ids(self, params: SamplingParams) -> list[int]:
        """The rendered conversation as token ids, trimmed to leave room for the reply."""
        n_ctx = self.backend.report.n_ctx
        room = n_ctx - min(params.max_tokens, n_ctx // 2)
        history = list(self.messages)
        while True:
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.backend.tokenize(self.backend.render_chat(head + history))
            if len(ids) <= room or len(history) <= 1:
                break
            history = history[2:] if len(history) > 2 else history[1:]
        if len(ids) >= n_ctx:
            raise UserError(
                f"The message is {len(ids)} tokens, more than the context of {n_ctx}: shorten it or load with a larger --n-ctx."
            )
        return ids

    def _reply(
        self, params: SamplingParams, cancel: threading.Event | None, *, undo: Callable[[], object]
    ) -> Iterator[GenerationEvent]:
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
            if reply:
                self.messages.append({"role": "assistant", "content": reply})
            else:
                undo()  # nothing came back: the turn did not happen
