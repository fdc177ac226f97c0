"""The model runs in a worker process, never in the process that serves users (the web UI, `localrun serve`).

A native crash or an out-of-memory kill in llama.cpp or torch then takes down only the worker: the caller sees
one sentence, and the next request starts a fresh worker (a chat reloads its model). One dispatcher thread owns
the pipe and runs requests one at a time in arrival order, so replies for several callers never interleave.

Stop reaches the worker through a shared integer made afresh for each worker process and read without a lock.
A watchdog kills a worker that ignores Stop for `stop_grace_s`, or that sends nothing for `silence_s` while busy
(the worker sends heartbeats during long steps such as loading and prefill, so only a stuck one is killed).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from localrun.errors import UserError
from localrun.requests import Done, Failed, Heartbeat, Loaded, LoadRequest, Progress, Unloaded, Update
from localrun.worker_child import child_main

_POLL_S = 0.1
STOP_GRACE_S = 5.0
SILENCE_S = 120.0


@dataclass(eq=False)
class _Job:
    id: int
    request: Any  # None: only start the worker process
    owner: str
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_at: float | None = None  # when Stop reached the running request (for the watchdog)

    @property
    def stoppable(self) -> bool:
        return bool(getattr(self.request, "stoppable", False))


class _Crashed(Exception):
    pass


_DONE = object()


class WorkerClient:
    """Runs one model in a spawned worker process and serialises typed requests to it."""

    def __init__(
        self,
        *,
        start: bool = True,
        stop_grace_s: float = STOP_GRACE_S,
        silence_s: float = SILENCE_S,
        plugins: tuple[str, ...] = (),
    ) -> None:
        """plugins: modules imported in the worker whose HANDLERS add request kinds (tests use one)."""
        self._ctx = mp.get_context("spawn")
        self.stop_grace_s, self.silence_s, self._plugins = stop_grace_s, silence_s, plugins
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()  # guards the bookkeeping below, never held across a request
        self._pending: list[_Job] = []
        self._running: _Job | None = None
        self._proc: Any = None
        self._conn: Any = None
        self._cancel: Any = None  # the current process's shared "stop request N" value
        self._ids = itertools.count(1)
        self.loaded: Loaded | None = None
        self._last_name: str | None = None
        self._loading = False
        self.crashes = 0
        self.last_crash: str | None = None
        self._thread = threading.Thread(target=self._dispatch, name="localrun-worker", daemon=True)
        self._thread.start()
        if start:
            self._jobs.put(_Job(0, None, ""))

    # -- public API ---------------------------------------------------------------------------

    def submit(self, request: Any, *, owner: str = "") -> Iterator[Update]:
        """Queue a request and stream its updates: progress, Loaded, generation events, Failed."""
        if not isinstance(request, LoadRequest):
            yield from self._submit(_Job(next(self._ids), request, owner))
            return
        with self._lock:
            if self._loading:
                raise UserError("A model is loading already: wait for it to finish.")
            self._loading = True
        try:
            yield from self._submit(_Job(next(self._ids), request, owner))
        finally:
            with self._lock:
                self._loading = False

    def cancel(self, owner: str) -> bool:
        """Stop owner's running or queued requests (loads run to the end); True when there was one."""
        found = False
        with self._lock:
            for job in [*self._pending, self._running]:
                if job is not None and job.owner == owner and job.stoppable:
                    self._stop(job)
                    found = True
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
                "busy": self._running is not None and self._running.request is not None,
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

    def _stop(self, job: _Job) -> None:
        """Mark a job stopped; when it is running, tell the worker and start the watchdog's clock (lock held)."""
        job.cancelled.set()
        if self._running is job and self._cancel is not None:
            self._cancel.value = job.id
            job.stop_at = job.stop_at or time.monotonic()

    def _submit(self, job: _Job) -> Iterator[Update]:
        with self._lock:
            ahead = len(self._pending) + (self._running is not None and self._running.request is not None)
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
            if not finished and job.stoppable:  # the caller went away (tab closed): do not keep the worker busy
                with self._lock:
                    self._stop(job)

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
        if job.request is not None and job.cancelled.is_set():
            job.out.put(Progress("Stopped before it started."))
            return
        self._ensure_process(job)
        if job.request is None:
            return
        self._conn.send((job.id, job.request))
        last = time.monotonic()
        while True:
            reply = self._receive(job, last)
            last = time.monotonic()
            match reply:
                case Done():
                    return
                case Heartbeat():
                    continue
                case Unloaded():
                    self.loaded = None
                case Loaded(name=name):
                    self.loaded, self._last_name = reply, name
                    job.out.put(reply)
                case _:
                    job.out.put(reply)

    def _receive(self, job: _Job, last: float) -> Any:
        """The worker's next reply; kills the worker when it ignores Stop or falls silent (the watchdog)."""
        while True:
            try:
                if self._conn.poll(_POLL_S):
                    return self._conn.recv()
            except (EOFError, OSError):
                raise self._crash() from None
            if not self._proc.is_alive():
                raise self._crash()
            now = time.monotonic()
            if job.stop_at is not None and now - job.stop_at > self.stop_grace_s:
                raise self._kill(f"did not stop within {self.stop_grace_s:g} s of Stop and was ended")
            if now - last > self.silence_s:
                raise self._kill(f"sent nothing for {self.silence_s:g} s and was ended")

    def _ensure_process(self, job: _Job) -> None:
        """Start the worker if it is not running (each gets a fresh pipe and a fresh Stop value)."""
        if self._proc is not None and self._proc.is_alive():
            return
        if self._proc is not None:
            self._reap()
        job.out.put(Progress("Starting the model process"))
        parent, child = self._ctx.Pipe()
        cancel = self._ctx.RawValue("q", 0)  # no lock: a killed worker cannot leave one held
        beat_s = max(0.05, min(2.0, self.silence_s / 4))
        proc = self._ctx.Process(
            target=child_main, args=(child, cancel, beat_s, self._plugins), name="localrun-model", daemon=True
        )
        proc.start()
        child.close()  # only the child holds its end, so its death reads as EOF here
        with self._lock:
            self._proc, self._conn, self._cancel = proc, parent, cancel
            if job.stop_at is None and job.cancelled.is_set():
                self._stop(job)

    def _kill(self, why: str) -> _Crashed:
        self._proc.kill()
        return self._crash(why)

    def _crash(self, why: str | None = None) -> _Crashed:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        if why is not None:
            how = why
        elif code is not None and code < 0:
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
        what = self._last_name or "the model"
        self.last_crash = f"{time.strftime('%H:%M:%S')}: the model process {how}"
        return _Crashed(f"The model process {how}; it restarts and reloads {what} with your next message.")

    def _reap(self) -> None:
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc = self._conn = self._cancel = None
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
                conn.send(None)
            except OSError:
                pass
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self._reap()
