"""What the routes talk to: submit a request, get its GenerationEvents; one request runs at a time.

The interface is small on purpose (submit, status, close), so the same routes can run on a model in
this process (`localrun serve`) or on the UI's worker process (`localrun ui --api`). Requests wait in
arrival order in a bounded queue; a full queue raises QueueFull before anything is queued.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from localrun.errors import UserError
from localrun.events import GenerationEvent
from localrun.server.jobs import HANDLERS, CancelWatch
from localrun.settings import LoadOptions

DEFAULT_MAX_QUEUE = 16


class QueueFull(Exception):
    """Every place in the queue is taken: the client should retry later (HTTP 429)."""


class Engine(Protocol):
    def submit(self, request: Any, cancel: CancelWatch) -> Iterator[GenerationEvent]:
        """Queue a request (QueueFull when full) and return its events; UserError for the user's mistakes."""
        ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Job:
    request: Any
    cancel: CancelWatch
    out: queue.Queue = field(default_factory=queue.Queue)


_DONE = object()


class LocalEngine:
    """A model loaded in this process and one thread that runs requests on it, in arrival order."""

    def __init__(self, model: str | None, options: LoadOptions | None = None, *, max_queue: int = DEFAULT_MAX_QUEUE):
        from localrun.catalog import resolve_model

        self.options = options or LoadOptions()
        self.max_queue = max_queue
        self._backend: Any = None
        self._spec: str | None = None
        self.model_name: str | None = None
        self.report: Any = None
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = False
        self._closing = False
        self._current: _Job | None = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._load(model, resolve_model(model))
        self._thread = threading.Thread(target=self._dispatch, name="localrun-serve", daemon=True)
        self._thread.start()

    def submit(self, request: Any, cancel: CancelWatch) -> Iterator[GenerationEvent]:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting already: retry in a moment.")
            self._waiting += 1
        job = _Job(request, cancel)
        self._jobs.put(job)
        return self._results(job)

    def _results(self, job: _Job) -> Iterator[GenerationEvent]:
        finished = False
        try:
            while (item := job.out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
            finished = True
        finally:
            if not finished:  # the consumer went away: stop the generation between two tokens
                job.cancel.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"model": self.model_name, "busy": self._running, "queued": self._waiting - self._running}

    def close(self) -> None:
        """Stop what runs and what waits, then free the model."""
        with self._lock:
            self._closing = True
            if self._current is not None:
                self._current.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _dispatch(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self._running, self._current = True, job
                if self._closing:
                    job.cancel.set()
            try:
                self._run(job)
            except UserError as exc:
                job.out.put(exc)
            except Exception as exc:  # a bug must not stop the dispatcher; the client gets a 500
                job.out.put(RuntimeError(f"{type(exc).__name__}: {exc}"))
            finally:
                with self._lock:
                    self._running, self._current = False, None
                    self._waiting -= 1
                job.out.put(_DONE)

    def _run(self, job: _Job) -> None:
        if job.cancel.is_set():
            return
        spec = getattr(job.request, "model", None)
        if spec is not None and spec != self._spec:
            from localrun.catalog import resolve_model

            self._load(spec, resolve_model(spec))
        handler = HANDLERS[type(job.request)]
        for event in handler(self._backend, job.request, job.cancel):
            job.out.put(event)

    def _load(self, spec: str | None, resolved: Any) -> None:
        from localrun.backends import load_backend

        if self._backend is not None:
            self._backend.close()
            self._backend = None
        self._backend = load_backend(resolved, self.options)
        self._spec, self.model_name, self.report = spec, resolved.name, self._backend.report
