"""The model runs in a worker process, never in the process that serves users (the web UI, `localrun serve`).

A native crash or an out-of-memory kill in llama.cpp or torch then takes down only the worker: the caller sees
one sentence, and the next request starts a fresh worker (a chat reloads its model). One dispatcher thread owns
the pipe. It starts requests in arrival order: a load runs alone, and generations for the loaded model run
together up to its slots (`LoadReport.parallel`: continuous batching in the worker), the rest wait their turn.
Replies carry their request's id, so several callers' streams never mix.

Stop reaches the worker through a shared array made afresh for each worker process and read without a lock.
A watchdog kills a worker that ignores Stop for `stop_grace_s`, or that sends nothing for `silence_s` while busy
(the worker sends heartbeats during long steps such as loading and prefill, so only a stuck one is killed).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from localrun.engine.messages import (
    Done,
    EngineStatus,
    Failed,
    Heartbeat,
    Loaded,
    LoadRequest,
    Progress,
    Unloaded,
    Update,
)
from localrun.engine.worker_child import CANCEL_SLOTS, child_main
from localrun.errors import UserError

_POLL_S = 0.1
STOP_GRACE_S = 5.0
SILENCE_S = 120.0
STARTUP_S = 120.0


@dataclass(eq=False)
class _Job:
    id: int
    request: Any  # None: only start the worker process
    owner: str
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_at: float | None = None  # when Stop reached the running request (for the watchdog)
    slowest_s: float = 0.0  # the longest wait between two of its replies so far (heartbeats aside)
    replied: float = 0.0  # when its last reply came

    @property
    def stoppable(self) -> bool:
        return bool(getattr(self.request, "stoppable", False))


class _Crashed(Exception):
    pass


_DONE = object()


class WorkerClient:
    """Runs one model in a spawned worker process and schedules typed requests to it."""

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
        self._lock = threading.Lock()  # guards the bookkeeping below, never held across a send or a receive
        self._pending: list[_Job] = []
        self._running: dict[int, _Job] = {}
        self._closing = False
        self._proc: Any = None
        self._conn: Any = None
        self._cancel: Any = None  # the current process's shared Stop array
        self._ids = itertools.count(1)
        self.loaded: Loaded | None = None
        self.engine_figures: dict[str, int] = {}  # the batching engine's last EngineStatus (several slots)
        self._last_name: str | None = None
        self._loading = False
        self.crashes = 0
        self.last_crash: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._dispatch, name="localrun-worker", daemon=True)
        self._thread.start()
        if start:
            self._enqueue(_Job(0, None, ""))

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
            for job in [*self._pending, *self._running.values()]:
                if job.owner == owner and job.stoppable and not job.cancelled.is_set():
                    self._stop(job)
                    found = True
        return found

    def status(self) -> dict[str, Any]:
        """pid, alive, the loaded model, slots, what runs and waits, and crash count (System tab, /metrics, tests)."""
        with self._lock:
            proc = self._proc
            loaded = self.loaded
            running = sum(1 for j in self._running.values() if j.request is not None)
            return {
                "pid": proc.pid if proc is not None else None,
                "alive": bool(proc is not None and proc.is_alive()),
                "model": loaded.name if loaded else None,
                "load_report": loaded.report.describe() if loaded else None,
                "busy": running > 0,
                "running": running,
                "slots": self._capacity(),
                "queued": len(self._pending),
                "loading": self._loading,
                "crashes": self.crashes,
                "last_crash": self.last_crash,
                **{f"engine_{k}": v for k, v in self.engine_figures.items()},
            }

    def close(self) -> None:
        """Stop the dispatcher and the worker process."""
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join(timeout=10)

    # -- the dispatcher thread ---------------------------------------------------------------

    def _capacity(self) -> int:
        return self.loaded.report.parallel if self.loaded is not None else 1

    def _exclusive(self, job: _Job) -> bool:
        """Whether a job must run alone: a load, one that loads first, or anything while no model is loaded."""
        request = job.request
        if request is None or isinstance(request, LoadRequest) or self.loaded is None:
            return True
        load = getattr(request, "load", None)
        return load is not None and load != self.loaded.request

    def _stop(self, job: _Job) -> None:
        """Mark a job stopped; when it is running, tell the worker and start the watchdog's clock (lock held)."""
        job.cancelled.set()
        if job.id in self._running and self._cancel is not None:
            self._cancel[job.id % CANCEL_SLOTS] = job.id
            job.stop_at = job.stop_at or time.monotonic()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _enqueue(self, job: _Job) -> int:
        """Queue a job; returns how many requests it waits behind."""
        with self._lock:
            # Everything running or queued starts before this job; it waits only when that leaves it no slot (a job
            # queued a moment ago that the dispatcher has not sent yet still leaves room beside it).
            before = [j for j in self._running.values() if j.request is not None] + self._pending
            fits = len(before) < self._capacity() and not any(self._exclusive(j) for j in (*self._pending, job))
            ahead = 0 if fits else len(before)
            self._pending.append(job)
        self._wake()
        return ahead

    def _submit(self, job: _Job) -> Iterator[Update]:
        ahead = self._enqueue(job)
        if ahead:
            job.out.put(Progress(f"Waiting for {ahead} earlier request(s) to finish"))
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
        last = time.monotonic()  # the last message from the worker
        while True:
            with self._lock:
                closing = self._closing and not self._running
            if closing:
                break
            try:
                self._start_ready()
                if self._running:
                    last = self._pump(last)
                else:
                    self._idle()
                    last = time.monotonic()
            except _Crashed as exc:
                self._fail_running(Failed(str(exc), "crash"))
            except Exception as exc:  # a bug here must not stop the dispatcher
                self._fail_running(Failed(f"{type(exc).__name__}: {exc}", "internal"))
        with self._lock:
            pending, self._pending = self._pending, []
        for job in pending:
            job.out.put(Progress("The model process is shutting down."))
            job.out.put(_DONE)
        self._stop_process()

    def _idle(self) -> None:
        wait([self._wake_r], timeout=1.0)
        self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _start_ready(self) -> None:
        """Send the jobs at the head of the queue that may run now (in order: none jumps the queue)."""
        while True:
            with self._lock:
                if not self._pending or self._closing:
                    return
                job = self._pending[0]
                active = [j for j in self._running.values() if j.request is not None]
                if active and (self._exclusive(job) or len(active) >= self._capacity()):
                    return
                self._pending.pop(0)
                if job.request is not None and job.cancelled.is_set():
                    skipped = True
                else:
                    skipped = False
                    self._running[job.id] = job
            if skipped:
                job.out.put(Progress("Stopped before it started."))
                job.out.put(_DONE)
                continue
            try:
                self._ensure_process(job)
            except _Crashed as exc:
                with self._lock:
                    self._running.pop(job.id, None)
                job.out.put(Failed(str(exc), "crash"))
                job.out.put(_DONE)
                continue
            if job.request is None:
                with self._lock:
                    self._running.pop(job.id, None)
                job.out.put(_DONE)
                continue
            job.replied = time.monotonic()
            self._conn.send((job.id, job.request))

    def _pump(self, last: float) -> float:
        """Route the worker's replies to their jobs for a moment; the watchdog runs between them."""
        ready = wait([self._conn, self._wake_r], timeout=_POLL_S)
        if self._wake_r in ready:
            self._drain_wake()
        try:
            while self._conn.poll():
                request_id, reply = self._conn.recv()
                last = time.monotonic()
                self._route(request_id, reply, last)
        except (EOFError, OSError):
            raise self._crash() from None
        if not self._proc.is_alive():
            raise self._crash()
        self._watchdog(last)
        return last

    def _route(self, request_id: int, reply: Any, now: float) -> None:
        if isinstance(reply, Heartbeat):
            return
        if isinstance(reply, EngineStatus):
            self.engine_figures = reply.figures
            return
        with self._lock:
            job = self._running.get(request_id)
        if job is None:
            return
        job.slowest_s, job.replied = max(job.slowest_s, now - job.replied), now
        match reply:
            case Done():
                with self._lock:
                    self._running.pop(request_id, None)
                job.out.put(_DONE)
            case Unloaded():
                self.loaded, self.engine_figures = None, {}
            case Loaded(name=name):
                self.loaded, self._last_name = reply, name
                job.out.put(reply)
            case _:
                job.out.put(reply)

    def _watchdog(self, last: float) -> None:
        now = time.monotonic()
        with self._lock:
            jobs = list(self._running.values())
        for job in jobs:
            # A slow machine or model is not a stuck one: the grace grows with the request's own pace.
            grace = max(self.stop_grace_s, 3 * job.slowest_s)
            if job.stop_at is not None and now - job.stop_at > grace:
                raise self._kill(f"did not stop within {grace:.0f} s of Stop and was ended")
        if jobs and now - last > self.silence_s:
            raise self._kill(f"sent nothing for {self.silence_s:g} s and was ended")

    def _fail_running(self, failed: Failed) -> None:
        with self._lock:
            jobs, self._running = list(self._running.values()), {}
        for job in jobs:
            job.out.put(failed)
            job.out.put(_DONE)

    def _ensure_process(self, job: _Job) -> None:
        """Start the worker if it is not running (each gets a fresh pipe and a fresh Stop array)."""
        if self._proc is not None and self._proc.is_alive():
            return
        if self._proc is not None:
            self._reap()
        job.out.put(Progress("Starting the model process"))
        parent, child = self._ctx.Pipe()
        cancel = self._ctx.RawArray("q", CANCEL_SLOTS)  # no lock: a killed worker cannot leave one held
        beat_s = max(0.05, min(2.0, self.silence_s / 4))
        proc = self._ctx.Process(
            target=child_main, args=(child, cancel, beat_s, self._plugins), name="localrun-model", daemon=True
        )
        proc.start()
        child.close()  # only the child holds its end, so its death reads as EOF here
        with self._lock:
            self._proc, self._conn, self._cancel = proc, parent, cancel
        self._await_ready()
        with self._lock:
            if job.stop_at is None and job.cancelled.is_set():
                self._stop(job)

    def _await_ready(self) -> None:
        """Wait for the new worker's first heartbeat (its imports can take seconds on a busy machine)."""
        deadline = time.monotonic() + max(STARTUP_S, self.silence_s)
        while not self._conn.poll(_POLL_S):
            if not self._proc.is_alive():
                raise self._crash()
            if time.monotonic() > deadline:
                raise self._kill(f"did not start within {max(STARTUP_S, self.silence_s):g} s and was ended")
        try:
            self._conn.recv()
        except (EOFError, OSError):
            raise self._crash() from None

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
            self.loaded, self.engine_figures = None, {}
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
