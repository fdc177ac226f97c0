"""What the routes talk to: the model worker process (localrun.engine.worker), shared with the UI under `ui --api`.

Requests run together up to the model's slots (continuous batching); the rest wait in arrival order. The
API bounds its own share of that queue: with max_queue requests waiting beyond the slots, submit() raises
QueueFull (HTTP 429) and queues nothing.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from localrun.engine.events import GenerationEvent
from localrun.engine.messages import Failed, Loaded, LoadRequest
from localrun.errors import UserError
from localrun.settings import LoadOptions

DEFAULT_MAX_QUEUE = 16


class QueueFull(Exception):
    """Every place in the queue is taken: the client should retry later (HTTP 429)."""


@dataclass
class CancelWatch:
    """Stop for one API request; counts the tokens that still arrive after it was set."""

    stop: Any = None  # called once, by set()
    overrun_tokens: int = 0
    _event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        if not self._event.is_set():
            self._event.set()
            if self.stop is not None:
                self.stop()

    def is_set(self) -> bool:
        return self._event.is_set()


class WorkerEngine:
    """API requests on a WorkerClient: model names to LoadRequests, Failed to exceptions, a bounded queue."""

    def __init__(self, worker: Any, *, options: LoadOptions | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        self.worker = worker
        self.options = options or LoadOptions()
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._in_flight = 0
        self._ids = itertools.count(1)
        self._last: LoadRequest | None = None  # what to reload after a crash
        self.last_loaded: Loaded | None = None  # the last model loaded, which a crash does not forget

    def load(self, model: str | None) -> Loaded:
        """Load a model now (at start-up); a user mistake raises UserError."""
        self._last = LoadRequest(model, self.options)
        for update in self.worker.submit(self._last):
            if isinstance(update, Failed):
                raise UserError(update.message) if update.kind == "user" else RuntimeError(update.message)
            if isinstance(update, Loaded):
                self.last_loaded = update
                return update
        raise RuntimeError("The model process ended the load without a result.")

    def load_request(self, spec: str | None) -> LoadRequest | None:
        """The LoadRequest for a model on disk, or for the loaded model when spec is None."""
        if spec is not None:
            self._last = LoadRequest(spec, self.options)
            return self._last
        loaded = self.worker.loaded or self.last_loaded
        return loaded.request if loaded is not None else self._last

    def submit(self, request: Any, cancel: CancelWatch) -> Iterator[GenerationEvent]:
        """Queue a request (QueueFull when the API's share is full) and return its events."""
        slots = self.worker.status().get("slots", 1)
        with self._lock:
            waiting = self._in_flight - slots  # the requests beyond the model's slots wait in the queue
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} API requests are waiting already: retry in a moment.")
            self._in_flight += 1
        owner = f"api-{next(self._ids)}"
        cancel.stop = lambda: self.worker.cancel(owner)
        return self._events(request, owner, cancel)

    def _events(self, request: Any, owner: str, cancel: CancelWatch) -> Iterator[GenerationEvent]:
        try:
            for update in self.worker.submit(request, owner=owner):
                if isinstance(update, Failed):
                    raise UserError(update.message) if update.kind == "user" else RuntimeError(update.message)
                if isinstance(update, Loaded):
                    self.last_loaded = update
                if isinstance(update, GenerationEvent):
                    if update.summary is not None:  # the model process counts what came after Stop
                        cancel.overrun_tokens = update.summary.overrun_tokens
                    yield update
        finally:
            with self._lock:
                self._in_flight -= 1

    def status(self) -> dict[str, Any]:
        state = self.worker.status()
        keys = ("model", "busy", "queued", "slots", "running")
        return {k: state[k] for k in keys if k in state}

    def close(self) -> None:
        self.worker.close()
