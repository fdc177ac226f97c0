"""The model runs in a worker process, never in the Gradio process.

A native crash or an out-of-memory kill in llama.cpp or torch then takes down only the worker: the UI shows
the error, and the next request starts a fresh worker that reloads the last model. One dispatcher thread
owns the pipe and runs requests one at a time in arrival order, so replies from several browser tabs never
interleave. Stop reaches the worker through a multiprocessing.Event checked between tokens.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from localrun.backends.base import LoadReport
from localrun.errors import UserError
from localrun.events import GenerationEvent
from localrun.settings import LoadOptions, SamplingParams

_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Progress:
    """A line about what the worker is doing (starting, loading, reloading after a crash)."""

    text: str


@dataclass(frozen=True, slots=True)
class Loaded:
    """A model is loaded: what the user asked for, its display name and the backend's report."""

    spec: str | None
    name: str
    options: LoadOptions
    report: LoadReport


@dataclass(frozen=True, slots=True)
class Failed:
    """A request ended in an error: kind is "user" (fixable), "crash" (worker died) or "internal"."""

    message: str
    kind: str


Update = Progress | Loaded | Failed | GenerationEvent


# ---- the worker process ------------------------------------------------------------------------


def _child_main(conn: Any, cancel: Any) -> None:
    """Serve load/chat commands until the pipe closes; every command ends with a "done" message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the parent's to handle
    state: dict[str, Any] = {"backend": None}
    while True:
        try:
            rid, cmd, args = conn.recv()
        except (EOFError, OSError):  # the UI process went away
            break
        if cmd == "quit":
            break
        try:
            if cmd == "load":
                _child_load(conn, rid, state, *args)
            elif cmd == "chat":
                _child_chat(conn, rid, state, cancel, *args)
        except UserError as exc:
            conn.send((rid, "error", ("user", str(exc))))
        except Exception as exc:  # an internal failure must not end the worker's loop
            conn.send((rid, "error", ("internal", f"{type(exc).__name__}: {exc}")))
        conn.send((rid, "done", None))
    if state["backend"] is not None:
        state["backend"].close()


def _child_load(conn: Any, rid: int, state: dict[str, Any], spec: str | None, options: LoadOptions) -> None:
    from localrun.backends import load_backend
    from localrun.catalog import resolve_model

    resolved = resolve_model(spec)  # a mistyped name fails here, with the current model still loaded
    if resolved.kind == "gguf":
        from localrun.gguf_info import inspect_gguf

        inspect_gguf(resolved.path)  # so does a missing or corrupt file (a header read, no weights)
    if state["backend"] is not None:  # free the old model's memory before loading the next one
        conn.send((rid, "progress", "Unloading the previous model"))
        state["backend"].close()
        state["backend"] = None
        conn.send((rid, "unloaded", None))
    conn.send((rid, "progress", f"Loading {resolved.name} from {resolved.path or resolved.hub_id}"))
    backend = load_backend(resolved, options)
    state["backend"] = backend
    conn.send((rid, "loaded", (resolved.name, backend.report)))


def _child_chat(
    conn: Any,
    rid: int,
    state: dict[str, Any],
    cancel: Any,
    messages: list[dict[str, str]],
    system: str | None,
    params: SamplingParams,
) -> None:
    from localrun.chat import ChatSession

    if state["backend"] is None:
        raise UserError("No model is loaded: pick one and press Load.")
    session = ChatSession(state["backend"], system=system)
    session.messages = list(messages)
    # The history (ending with the user's message) comes from the browser session; regenerate()
    # answers its last user message without adding one.
    for event in session.regenerate(params, cancel=cancel):
        conn.send((rid, "event", event))


# ---- the UI side ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    id: int
    kind: str  # "load" or "chat"
    args: tuple[Any, ...]
    owner: str
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    fallback: tuple[str | None, LoadOptions] | None = None


class _Crashed(Exception):
    pass


_DONE = object()


class WorkerClient:
    """Runs one model in a spawned worker process and serialises requests to it."""

    def __init__(self, *, start: bool = True) -> None:
        self._ctx = mp.get_context("spawn")
        self._cancel = self._ctx.Event()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()  # guards the bookkeeping below, never held across a request
        self._pending: list[_Job] = []
        self._running: _Job | None = None
        self._proc: Any = None
        self._conn: Any = None
        self._ids = itertools.count(1)
        self.loaded: Loaded | None = None
        self._reload: tuple[str | None, LoadOptions] | None = None
        self._reload_name: str | None = None
        self._loading = False
        self.crashes = 0
        self.last_crash: str | None = None
        self._thread = threading.Thread(target=self._dispatch, name="localrun-worker", daemon=True)
        self._thread.start()
        if start:
            self._jobs.put(_Job(0, "start", (), ""))

    # -- public API ---------------------------------------------------------------------------

    def load(self, spec: str | None, options: LoadOptions, *, owner: str = "") -> Iterator[Progress | Loaded | Failed]:
        """Load a model (unloading the current one); yields progress, then Loaded or Failed."""
        with self._lock:
            if self._loading:
                raise UserError("A model is loading already: wait for it to finish.")
            self._loading = True
        try:
            yield from self._submit(_Job(next(self._ids), "load", (spec, options), owner))
        finally:
            with self._lock:
                self._loading = False

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        params: SamplingParams,
        system: str | None = None,
        owner: str = "",
        fallback: tuple[str | None, LoadOptions] | None = None,
    ) -> Iterator[Update]:
        """Answer the last user message of a history; fallback is loaded first when no model is."""
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        job = _Job(next(self._ids), "chat", (clean, system or None, params), owner, fallback=fallback)
        yield from self._submit(job)

    def cancel(self, owner: str) -> bool:
        """Stop owner's running or queued requests; True when there was one."""
        found = False
        with self._lock:
            for job in [*self._pending, self._running]:
                if job is not None and job.owner == owner and job.kind == "chat":
                    job.cancelled.set()
                    found = True
            if self._running is not None and self._running.owner == owner and self._running.kind == "chat":
                self._cancel.set()
        return found

    def status(self) -> dict[str, Any]:
        """pid, alive, the loaded model, queue length and crash count (for the System tab and tests)."""
        with self._lock:
            proc = self._proc
            loaded = self.loaded
            return {
                "pid": proc.pid if proc is not None else None,
                "alive": bool(proc is not None and proc.is_alive()),
                "model": loaded.name if loaded else None,
                "load_report": loaded.report.describe() if loaded else None,
                "busy": self._running is not None and self._running.kind != "start",
                "queued": len(self._pending),
                "loading": self._loading,
                "crashes": self.crashes,
                "last_crash": self.last_crash,
            }

    def close(self) -> None:
        """Stop the dispatcher and the worker process."""
        self._jobs.put(None)
        self._thread.join(timeout=10)

    # -- the dispatcher thread ---------------------------------------------------------------

    def _submit(self, job: _Job) -> Iterator[Update]:
        with self._lock:
            ahead = len(self._pending) + (self._running is not None and self._running.kind != "start")
            self._pending.append(job)
        if ahead:
            job.out.put(Progress(f"Waiting for {ahead} earlier request(s) to finish"))
        self._jobs.put(job)
        finished = False
        try:
            while True:
                item = job.out.get()
                if item is _DONE:
                    finished = True
                    return
                yield item
        finally:
            if not finished:  # the consumer went away (browser tab closed): do not keep the worker busy
                job.cancelled.set()
                with self._lock:
                    if self._running is job:
                        self._cancel.set()

    def _dispatch(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
                self._running = job
            try:
                self._run(job)
            except _Crashed as exc:
                job.out.put(Failed(str(exc), "crash"))
            except Exception as exc:  # a bug here must not stop the dispatcher
                job.out.put(Failed(f"{type(exc).__name__}: {exc}", "internal"))
            finally:
                with self._lock:
                    self._running = None
                job.out.put(_DONE)
        self._stop_process()

    def _run(self, job: _Job) -> None:
        if job.kind == "start":
            self._ensure_process(job)
            return
        if job.cancelled.is_set():
            job.out.put(Progress("Stopped before it started."))
            return
        self._ensure_process(job)
        if job.kind == "load":
            spec, options = job.args
            self._load(job, spec, options)
            return
        if self.loaded is None and job.fallback is not None:
            if not self._load(job, *job.fallback):
                return
        self._cancel.clear()
        if job.cancelled.is_set():  # Stop pressed while the model was loading
            job.out.put(Progress("Stopped before it started."))
            return
        self._request(job, "chat", job.args)

    def _load(self, job: _Job, spec: str | None, options: LoadOptions) -> bool:
        loaded = self.loaded
        if loaded is not None and loaded.spec == spec and loaded.options == options:
            job.out.put(loaded)
            return True
        return self._request(job, "load", (spec, options))

    def _ensure_process(self, job: _Job) -> None:
        """Start the worker if it is not running; after a crash, reload the model it had."""
        if self._proc is not None and self._proc.is_alive():
            return
        if self._proc is not None:
            self._reap()
        job.out.put(Progress("Starting the model process"))
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main, args=(child, self._cancel), name="localrun-model", daemon=True)
        proc.start()
        child.close()  # only the child holds its end, so its death reads as EOF here
        with self._lock:
            self._proc, self._conn = proc, parent
        if self._reload is not None and job.kind == "chat":
            spec, options = self._reload
            job.out.put(Progress(f"The model process restarted: reloading {self._reload_name}"))
            self._request(job, "load", (spec, options))

    def _request(self, job: _Job, cmd: str, args: tuple[Any, ...]) -> bool:
        """Send one command and relay its replies to the job until "done"; False when it failed."""
        self._conn.send((job.id, cmd, args))
        ok = True
        while True:
            rid, kind, payload = self._receive()
            if rid != job.id:
                continue  # a late message from a request that was given up on
            if kind == "done":
                return ok
            if kind == "event":
                job.out.put(payload)
            elif kind == "progress":
                job.out.put(Progress(payload))
            elif kind == "unloaded":
                self.loaded = None
            elif kind == "loaded":
                name, report = payload
                self.loaded = Loaded(args[0], name, args[1], report)
                self._reload, self._reload_name = (args[0], args[1]), name
                job.out.put(self.loaded)
            elif kind == "error":
                ok = False
                job.out.put(Failed(payload[1], payload[0]))

    def _receive(self) -> tuple[int, str, Any]:
        while True:
            try:
                if self._conn.poll(_POLL_S):
                    return self._conn.recv()
            except (EOFError, OSError):
                raise self._crash() from None
            if not self._proc.is_alive():
                raise self._crash()

    def _crash(self) -> _Crashed:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"died from signal {-code}"
            if -code == signal.SIGKILL:
                how += " (often the system running out of memory)"
        else:
            how = f"exited with status {code}"
        self._reap()
        self.crashes += 1
        self.loaded = None
        what = self._reload_name or "the model"
        self.last_crash = f"{time.strftime('%H:%M:%S')}: the model process {how}"
        return _Crashed(f"The model process {how}. It restarts and reloads {what} with your next message.")

    def _reap(self) -> None:
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
            self.loaded = None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(timeout=5)

    def _stop_process(self) -> None:
        with self._lock:
            proc, conn = self._proc, self._conn
        if conn is not None:
            try:
                conn.send((0, "quit", ()))
            except OSError:
                pass
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self._reap()
