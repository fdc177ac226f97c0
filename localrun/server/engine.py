"""What the routes talk to: the model pool (localrun.engine.pool), shared with the UI under `ui --api`.

Requests to one model run together up to its slots (continuous batching); the rest wait in arrival order. The
API bounds its own share of each model's queue: with max_queue requests waiting beyond the slots, submit()
raises QueueFull (HTTP 429) and queues nothing.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from localrun.engine.events import GenerationEvent
from localrun.engine.messages import Failed, Loaded, LoadRequest
from localrun.engine.pool import MemoryBusy
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
    """API requests on a ModelPool: model names to LoadRequests, Failed to exceptions, a bounded queue."""

    def __init__(self, worker: Any, *, options: LoadOptions | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        self.worker = worker
        self.options = options or LoadOptions()
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._in_flight: dict[str | None, int] = {}  # per model spec
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

    def submit(
        self, request: Any, cancel: CancelWatch, *, keep_alive_s: float | None = None
    ) -> Iterator[GenerationEvent]:
        """Queue a request (QueueFull when the API's share of its model's queue is full) and return its events.
        keep_alive_s: how long its model stays loaded once idle (None: the pool's keep-alive)."""
        load = getattr(request, "load", None)
        model = load.model if load is not None else None
        slots = self.worker.slots_for(load)
        with self._lock:
            waiting = self._in_flight.get(model, 0) - slots  # the requests beyond the model's slots wait
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} API requests are waiting already: retry in a moment.")
            self._in_flight[model] = self._in_flight.get(model, 0) + 1
        owner = f"api-{next(self._ids)}"
        cancel.stop = lambda: self.worker.cancel(owner)
        return self._events(request, owner, cancel, model, keep_alive_s)

    def _events(
        self, request: Any, owner: str, cancel: CancelWatch, model: str | None, keep_alive_s: float | None
    ) -> Iterator[GenerationEvent]:
        try:
            for update in self.worker.submit(request, owner=owner, keep_alive_s=keep_alive_s):
                if isinstance(update, Failed):
                    if update.kind == "busy":
                        raise MemoryBusy(update.message)
                    raise UserError(update.message) if update.kind == "user" else RuntimeError(update.message)
                if isinstance(update, Loaded):
                    self.last_loaded = update
                if isinstance(update, GenerationEvent):
                    if update.summary is not None:  # the model process counts what came after Stop
                        cancel.overrun_tokens = update.summary.overrun_tokens
                    yield update
        finally:
            with self._lock:
                self._in_flight[model] -= 1

    def status(self) -> dict[str, Any]:
        state = self.worker.status()
        keys = ("model", "busy", "queued", "slots", "running")
        return {**{k: state[k] for k in keys if k in state}, "loaded_models": len(state.get("models", ()))}

    def close(self) -> None:
        self.worker.close()
