"""The model worker process: runs typed requests (localrun.engine.messages), each on a thread of its own, and
answers with typed replies tagged with the request's id.

A request kind is one dataclass in localrun.engine.messages and one handler in HANDLERS below: `handler(request, task)`
sends its replies with `task.send()`, reads Stop from `task.cancel`, and wraps long native steps (loading,
prefill, a job) in `task.busy()` so heartbeats tell the parent's watchdog it is alive. Every request ends with Done.
The parent (localrun.engine.worker) decides what runs together: a load alone, generations up to the model's slots.
"""

from __future__ import annotations

import importlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from localrun.engine.events import GenerationEvent
from localrun.engine.messages import (
    Done,
    EngineStatus,
    Failed,
    GenerateRequest,
    Heartbeat,
    Loaded,
    LoadRequest,
    Progress,
    Reply,
    Unloaded,
)
from localrun.errors import UserError

STREAM_INTERVAL_S = 0.05  # 20 messages a second at most while a reply streams (see Task.stream)
ENGINE_STATUS_S = 1.0  # the batching engine's figures go to the parent at most this often (what /metrics shows)


CANCEL_SLOTS = 256  # Stop values in the shared array: request n reads entry n % CANCEL_SLOTS


class CancelFlag:
    """Stop for one request: the parent writes the request's id into its entry of a shared int64 array.

    Reading it takes no lock, so a worker killed at any moment cannot leave the parent blocked, and the
    array is created afresh for every worker process."""

    def __init__(self, shared: Any, request_id: int) -> None:
        self._shared, self._id, self._at = shared, request_id, request_id % CANCEL_SLOTS

    def is_set(self) -> bool:
        return self._shared[self._at] == self._id


@dataclass
class _State:
    backend: Any = None
    loaded: Loaded | None = None


class Task:
    """What a handler gets: the worker's state, a way to reply, Stop, and heartbeats for long steps."""

    def __init__(self, worker: _Worker, request_id: int) -> None:
        self._worker = worker
        self.request_id = request_id
        self.state = worker.state
        self.cancel = CancelFlag(worker.cancel_value, request_id)

    def send(self, reply: Reply) -> None:
        self._worker.send(self.request_id, reply)

    def stream(self, events: Iterator[GenerationEvent]) -> None:
        """Send a reply's events: the first at once, then at most one message every STREAM_INTERVAL_S, the
        events that came meanwhile merged into it (the final one always goes at once).

        Every message wakes the parent (the UI server or the API server) on the cores the model decodes on,
        and llama.cpp's threads wait for each other at every step, so a wake-up per token costs decode speed.
        The final event's summary counts the tokens generated after Stop was seen."""
        held: GenerationEvent | None = None
        sent, overrun, stopping = 0.0, 0, False
        with self.busy() as streaming:  # the prompt is evaluated before the first event comes
            for event in events:
                streaming()  # each token is a reply now: the heartbeats stop
                if stopping:
                    overrun += len(event.token_ids)
                stopping = stopping or self.cancel.is_set()
                held = event if held is None else held.merged(event)
                now = time.monotonic()
                if held.is_final or stopping or sent == 0.0 or now - sent >= STREAM_INTERVAL_S:
                    if held.summary is not None and overrun:
                        held = replace(held, summary=replace(held.summary, overrun_tokens=overrun))
                    self.send(held)
                    held, sent = None, now
            if held is not None:
                self.send(held)

    @contextmanager
    def busy(self) -> Iterator[Callable[[], None]]:
        """Heartbeats while a long step runs; call the yielded function once replies flow on their own."""
        worker = self._worker
        worker.busy(+1)
        done = False

        def streaming() -> None:
            nonlocal done
            if not done:
                done = True
                worker.busy(-1)

        try:
            yield streaming
        finally:
            streaming()


class _Worker:
    def __init__(self, conn: Any, cancel_value: Any, beat_s: float) -> None:
        self.conn, self.cancel_value, self.beat_s = conn, cancel_value, beat_s
        self.state = _State()
        self._busy = 0  # tasks inside busy(): while any is, silence gets heartbeats
        self._send_lock = threading.Lock()  # the tasks and the heartbeat thread share the pipe
        self._last_send = time.monotonic()
        threading.Thread(target=self._beat, name="localrun-heartbeat", daemon=True).start()

    def send(self, request_id: int, reply: Reply) -> None:
        with self._send_lock:
            self.conn.send((request_id, reply))
            self._last_send = time.monotonic()

    def busy(self, delta: int) -> None:
        with self._send_lock:
            self._busy += delta

    def _beat(self) -> None:
        status_at, last_status = 0.0, None
        while True:
            time.sleep(self.beat_s / 2)
            now = time.monotonic()
            try:
                if self._busy > 0 and now - self._last_send >= self.beat_s:
                    self.send(0, Heartbeat())
                if now - status_at >= ENGINE_STATUS_S:
                    status_at, figures = now, self._engine_figures()
                    if figures is not None and figures != last_status:
                        self.send(0, EngineStatus(figures))
                        last_status = figures
            except OSError:  # the parent went away
                return

    def _engine_figures(self) -> dict[str, int] | None:
        """The batching engine's status, when the loaded model has one (several slots)."""
        scheduler = getattr(self.state.backend, "scheduler", None)
        return scheduler.status() if scheduler is not None else None

    def run(self, request_id: int, request: Any, handler: Callable[[Any, Task], None]) -> None:
        task = Task(self, request_id)
        try:
            handler(request, task)
        except UserError as exc:
            task.send(Failed(str(exc), "user"))
        except Exception as exc:  # an internal failure must not end the worker's loop
            task.send(Failed(f"{type(exc).__name__}: {exc}", "internal"))
        try:
            task.send(Done())
        except OSError:  # the parent went away
            pass


def child_main(conn: Any, cancel_value: Any, beat_s: float, plugins: tuple[str, ...] = ()) -> None:
    """Serve requests until the pipe closes or None arrives. plugins: modules whose HANDLERS add request kinds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the parent's to handle
    handlers = dict(HANDLERS)
    for name in plugins:
        handlers.update(importlib.import_module(name).HANDLERS)
    worker = _Worker(conn, cancel_value, beat_s)
    worker.send(0, Heartbeat())  # ready: the parent's watchdog starts counting from here
    threads: list[threading.Thread] = []
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the UI process went away
            break
        match message:
            case (int(request_id), request) if type(request) in handlers:
                thread = threading.Thread(
                    target=worker.run, args=(request_id, request, handlers[type(request)]), daemon=True
                )
                thread.start()
                threads = [t for t in threads if t.is_alive()] + [thread]
            case (int(request_id), request):
                worker.send(request_id, Failed(f"The worker has no handler for {type(request).__name__}.", "internal"))
                worker.send(request_id, Done())
            case _:
                break
    for thread in threads:
        thread.join(timeout=5)
    if worker.state.backend is not None:
        worker.state.backend.close()


# ---- handlers -----------------------------------------------------------------------------------------


def load(request: LoadRequest, task: Task) -> None:
    """Load a model (a mistyped name or a corrupt file fails before the current model is unloaded)."""
    from localrun.backends import load_backend, resolve_for

    state = task.state
    if state.loaded is not None and state.loaded.request == request:
        task.send(state.loaded)
        return
    resolved = resolve_for(request.model, request.options)
    if resolved.kind == "gguf":
        from localrun.models.gguf_info import inspect_gguf

        inspect_gguf(resolved.path)  # a header read, no weights
    if state.backend is not None:  # free the old model's memory before loading the next one
        task.send(Progress("Unloading the previous model"))
        unload(task)
    task.send(
        Progress(
            f"Loading {resolved.name or 'the first model'} from {resolved.path or resolved.hub_id or resolved.url}"
        )
    )
    with task.busy():
        backend = load_backend(resolved, request.options)
    state.backend = backend
    state.loaded = Loaded(request, resolved.name, backend.report)
    task.send(state.loaded)


def unload(task: Task) -> None:
    """Close the loaded model, if any, and tell the parent (its memory is free)."""
    state = task.state
    if state.backend is not None:
        state.backend.close()
        state.backend = state.loaded = None
        task.send(Unloaded())


def generate(request: GenerateRequest, task: Task) -> None:
    """A chat or a completion from any edge, loading request.load first when another model (or none) is loaded."""
    from localrun.engine.jobs import run

    state = task.state
    if request.load is not None and (state.loaded is None or state.loaded.request != request.load):
        load(request.load, task)
    if state.backend is None:
        raise UserError("No model is loaded: pick one and press Load, or name one in the request's model field.")
    if task.cancel.is_set():  # Stop pressed while the model was loading
        task.send(Progress("Stopped before it started."))
        return
    task.stream(run(state.backend, request, task.cancel))


HANDLERS: dict[type, Callable[[Any, Task], None]] = {
    LoadRequest: load,
    GenerateRequest: generate,
}
