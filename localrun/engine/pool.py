"""Several models at once: one model process (localrun.engine.worker.WorkerClient) per loaded model.

A request names its model (its LoadRequest); a model that is not loaded is loaded on request, once: requests
that arrive while it loads wait for that same load. Each model keeps the options it was loaded with, and a
crash or an out-of-memory kill ends one model's process, not the others' (the next request reloads it).

Idle unload: a model that has answered nothing for its keep-alive (the pool's, or the last request's) is
unloaded by ending its process, so every byte goes back to the system. Pinned models never unload.

The memory budget: before a load, the model's memory is planned from its file (weights, the KV cache of all its
slots, a draft model, the process itself: fit.worker_bytes). A model larger than the whole budget is refused
with one sentence before anything is unloaded. One that does not fit beside the loaded ones evicts the least
recently used idle, unpinned ones; while the memory is held by busy models, the load waits for them up to
memory_wait_s, then fails with the reason (the API answers 503). A running reply is never cut to make room.

The pool has WorkerClient's surface (submit, cancel, status, loaded, close), so the UI and the API drive it as
they drove a single worker.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from localrun.engine.messages import Failed, Loaded, LoadRequest, Progress, Update
from localrun.engine.plan import BUDGET_SHARE, Plan, default_budget, gib, keep_alive_seconds, parse_size, plan_load
from localrun.errors import UserError

__all__ = [
    "BUDGET_SHARE",
    "ModelPool",
    "PoolPolicy",
    "MemoryBusy",
    "keep_alive_seconds",
    "parse_size",
    "plan_load",
    "gib",
]

DEFAULT_KEEP_ALIVE_S = 15 * 60.0
MEMORY_WAIT_S = 60.0
_REAP_S = 0.25


@dataclass(frozen=True, slots=True)
class PoolPolicy:
    """keep_alive_s: idle time before a model unloads (inf: never; 0: after each request). pinned: model names
    or specs that never unload. budget_bytes: None is BUDGET_SHARE of the free RAM and VRAM at start."""

    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    pinned: tuple[str, ...] = ()
    budget_bytes: int | None = None
    memory_wait_s: float = MEMORY_WAIT_S


class MemoryBusy(Exception):
    """No memory for a model now: the models holding it are answering requests (HTTP 503)."""


class _Refused(Exception):
    def __init__(self, failed: Failed) -> None:
        super().__init__(failed.message)
        self.failed = failed


@dataclass(eq=False)
class _Entry:
    key: str
    load: LoadRequest
    client: Any  # WorkerClient
    plan: Plan
    keep_alive_s: float
    pinned: bool
    ready: threading.Event = field(default_factory=threading.Event)
    failed: Failed | None = None
    busy: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded: Loaded | None = None

    @property
    def name(self) -> str:
        return self.loaded.name if self.loaded is not None else (self.load.model or "default model")


class ModelPool:
    """Loaded models by what they were loaded from; loads on request, idle unload, a memory budget."""

    def __init__(self, policy: PoolPolicy | None = None, *, client_factory: Any = None) -> None:
        """client_factory: makes a WorkerClient for each model (a test passes its own watchdog times)."""
        from localrun.engine.worker import WorkerClient

        self.policy = policy or PoolPolicy()
        self.budget_bytes = self.policy.budget_bytes or default_budget()
        self._factory = client_factory or (lambda: WorkerClient(start=False))
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._keys: dict[tuple[str | None, str], str] = {}  # (spec, backend) -> key, resolved once
        self._current: _Entry | None = None  # the model used last: a request naming none goes to it
        self.counts: Counter[tuple[str, str]] = Counter()  # ("load"/"unload", reason) -> n, for /metrics
        self._closing = False
        self._reaper = threading.Thread(target=self._reap_loop, name="localrun-pool", daemon=True)
        self._reaper.start()

    # -- WorkerClient's surface ------------------------------------------------------------------

    @property
    def loaded(self) -> Loaded | None:
        """The model used last (what a request without a model gets), if it is still loaded."""
        current = self._current
        return current.client.loaded if current is not None else None

    def loaded_for(self, load: LoadRequest | None) -> Loaded | None:
        """What a request's load is loaded as now (None: the model used last), or None when it is not loaded."""
        if load is None:
            return self.loaded
        key = self._key_or_none(load)
        with self._cond:
            entry = self._entries.get(key or "")
        return entry.client.loaded if entry is not None else None

    def submit(self, request: Any, *, owner: str = "", keep_alive_s: float | None = None) -> Iterator[Update]:
        """Stream a request's updates on its model's process, loading that model first when needed.
        keep_alive_s: this request's keep-alive for its model (None: the pool's)."""
        load = request if isinstance(request, LoadRequest) else getattr(request, "load", None)
        if load is None:
            current = self._current
            if current is None:
                yield Failed(
                    "No model is loaded: pick one and press Load, or name one in the request's model field.", "user"
                )
                return
            load = current.load
            if hasattr(request, "load"):  # carried along, so a crashed process reloads this model
                request = replace(request, load=load)
        try:
            entry = yield from self._acquire(load)
        except _Refused as exc:
            yield exc.failed
            return
        request = _with_budget(request, entry.load.options.memory_budget_bytes)  # as the entry was planned
        try:
            if keep_alive_s is not None:
                entry.keep_alive_s = keep_alive_s
            if isinstance(request, LoadRequest) and entry.loaded is not None and entry.client.loaded == entry.loaded:
                if entry.loaded.request == request:  # loaded already, with these options: nothing to do
                    yield entry.loaded
                    return
            for update in entry.client.submit(request, owner=owner):
                if isinstance(update, Loaded):
                    entry.loaded, entry.load = update, update.request
                    entry.plan = self._plan_loaded(update, entry.plan)
                yield update
        finally:
            self._release(entry)

    def cancel(self, owner: str) -> bool:
        with self._cond:
            clients = [e.client for e in self._entries.values()]
        return any([c.cancel(owner) for c in clients])

    def status(self) -> dict[str, Any]:
        """The model used last's process status (WorkerClient.status), and every loaded model's row."""
        current = self._current
        state = current.client.status() if current is not None else _idle_status()
        return {**state, "models": self.models(), "memory_budget": self.budget_bytes}

    def close(self) -> None:
        with self._cond:
            self._closing = True
            entries, self._entries = list(self._entries.values()), {}
            self._current = None
            self._cond.notify_all()
        for entry in entries:
            entry.client.close()

    # -- what users see ----------------------------------------------------------------------------

    def describe(self) -> str:
        """The policy in one line, for the ready line."""
        keep = self.policy.keep_alive_s
        idle = "never unloads idle models" if keep == float("inf") else f"unloads a model idle for {keep:g} s"
        pinned = f", pins {', '.join(self.policy.pinned)}" if self.policy.pinned else ""
        return f"memory budget {gib(self.budget_bytes)}, {idle}{pinned}"

    def models(self) -> list[dict[str, Any]]:
        """One row per model loaded or loading (`localrun ps`, /v1/models, the System tab), the last used first."""
        return [row for _, row in self.rows()]

    def loads(self) -> list[Loaded]:
        """What each loaded model was loaded as (the last used first)."""
        with self._cond:
            entries = sorted(self._entries.values(), key=lambda e: -e.last_used)
        return [e.loaded for e in entries if e.loaded is not None]

    def rows(self) -> list[tuple[Loaded | None, dict[str, Any]]]:
        """(what it was loaded as, its row) per model loaded or loading, the last used first."""
        from localrun.engine.pool_rows import entry_row

        now = time.monotonic()
        with self._cond:
            entries = sorted(self._entries.values(), key=lambda e: -e.last_used)
        return [(entry.loaded, entry_row(entry, now)) for entry in entries]

    def used_bytes(self) -> int:
        with self._cond:
            return sum(e.plan.bytes for e in self._entries.values())

    def unload(self, name: str, *, reason: str = "asked") -> str:
        """Unload a model by its name, spec or key now; one sentence on what happened."""
        with self._cond:
            entry = next((e for e in self._entries.values() if name in (e.key, e.name, e.load.model)), None)
            if entry is None:
                raise UserError(f"{name} is not loaded.")
            if entry.busy:
                raise UserError(f"{entry.name} is answering a request: unload it when the reply is done.")
            self._remove(entry)
        self._end(entry, reason)
        return f"Unloaded {entry.name}: its {gib(entry.plan.bytes)} are free."

    def slots_for(self, load: LoadRequest | None) -> int:
        """Sequences the model a request names decodes together (1 while it is not loaded)."""
        entry = self._current if load is None else self._entries.get(self._key_or_none(load) or "")
        if entry is None or entry.loaded is None:
            return 1
        return entry.loaded.report.parallel

    # -- loading, the budget, releasing --------------------------------------------------------------

    def _key(self, load: LoadRequest) -> str:
        """What identifies a model: the file it resolves to (the default model by name or by path is one model)."""
        cache_key = (load.model, load.options.backend + "|" + (load.options.url or ""))
        key = self._keys.get(cache_key)
        if key is None:
            from localrun.backends import resolve_for

            resolved = resolve_for(load.model, load.options)
            if resolved.kind == "remote":
                key = f"remote:{resolved.url or ''}#{resolved.name}"
            elif resolved.path is not None:  # one file under two names (a store link to it) is one model
                key = str(resolved.path.resolve())
            else:
                key = str(resolved.hub_id or resolved.name)
            self._keys[cache_key] = key
        return key

    def _key_or_none(self, load: LoadRequest) -> str | None:
        try:
            return self._key(load)
        except (UserError, OSError):
            return None

    def _is_pinned(self, key: str, load: LoadRequest) -> bool:
        return any(
            p in (key, load.model) or self._key_or_none(LoadRequest(p, load.options)) == key for p in self.policy.pinned
        )

    def _acquire(self, load: LoadRequest) -> Iterator[Update]:
        """The entry for load, marked busy (a generator: it yields progress while it waits or loads)."""
        try:
            key = self._key(load)
        except UserError as exc:
            raise _Refused(Failed(str(exc), "user")) from None
        deadline: float | None = None
        told = False
        plan: Plan | None = None
        while True:
            victims: list[_Entry] = []
            with self._cond:
                if self._closing:
                    raise _Refused(Failed("The server is shutting down.", "user"))
                entry = self._entries.get(key)
                if entry is not None:
                    entry.busy += 1
                    entry.last_used = time.monotonic()
                    self._current = entry
                    created = False
                    break
                if plan is not None:
                    victims = self._room_for(plan.bytes)
                    if victims is not None:
                        for victim in victims:
                            self._remove(victim)
                        entry = _Entry(
                            key, load, self._factory(), plan, self.policy.keep_alive_s, self._is_pinned(key, load)
                        )
                        entry.busy = 1
                        self._entries[key] = entry
                        self._current = entry
                        created = True
                        break
                    pinned = sum(e.plan.bytes for e in self._entries.values() if e.pinned)
                    if plan.bytes > self.budget_bytes - pinned:  # waiting cannot help: pinned models stay
                        raise _Refused(Failed(self._pinned_sentence(load, plan, pinned), "busy"))
                    now = time.monotonic()
                    deadline = deadline or now + self.policy.memory_wait_s
                    if now >= deadline:
                        raise _Refused(Failed(self._busy_sentence(load, plan), "busy"))
                    self._cond.wait(timeout=min(1.0, deadline - now))
            if plan is None:  # outside the lock: it reads the file's header
                load = _with_budget(load, self._context_budget(key))
                try:
                    plan = plan_load(load)
                except UserError as exc:
                    raise _Refused(Failed(str(exc), "user")) from None
                if plan.bytes > self.budget_bytes:
                    raise _Refused(Failed(self._too_big_sentence(load, plan), "user"))
            elif not told:
                told = True
                yield Progress(f"Waiting for memory: {self._busy_sentence(load, plan)}")
        for victim in victims or []:
            yield Progress(f"Unloading {victim.name} to make room")
            self._end(victim, "evicted")
        if created:
            yield from self._first_load(entry)
        else:
            yield from self._await_load(entry)
        return entry

    def _first_load(self, entry: _Entry) -> Iterator[Update]:
        try:
            for update in entry.client.submit(entry.load):
                if isinstance(update, Loaded):
                    entry.loaded, entry.load = update, update.request
                    entry.plan = self._plan_loaded(update, entry.plan)
                    self.counts["load", "request"] += 1
                elif isinstance(update, Failed):
                    entry.failed = update
                else:
                    yield update
            if entry.loaded is None and entry.failed is None:
                entry.failed = Failed("The model process ended the load without a result.", "internal")
        finally:
            entry.ready.set()
            if entry.failed is not None or entry.loaded is None:
                with self._cond:
                    entry.busy -= 1
                    self._remove(entry)
                entry.client.close()
        if entry.failed is not None:
            raise _Refused(entry.failed)

    def _await_load(self, entry: _Entry) -> Iterator[Update]:
        if not entry.ready.is_set():
            yield Progress(f"Waiting for {entry.name} to load")
            entry.ready.wait()
        if entry.failed is not None or entry.loaded is None:
            self._release(entry)
            raise _Refused(
                entry.failed or Failed(f"Loading {entry.name} was abandoned: send the request again.", "user")
            )

    def _context_budget(self, key: str) -> int:
        """The memory a new model's context is chosen within: the budget less what pinned models hold (they
        never unload); idle models may be unloaded for it, busy ones waited for, as for any load."""
        with self._cond:
            pinned = sum(e.plan.bytes for e in self._entries.values() if e.pinned and e.key != key)
        return max(self.budget_bytes - pinned, 1)

    def _plan_loaded(self, loaded: Loaded, before: Plan) -> Plan:
        """Once loaded, the plan for what the backend chose (its context and slots), no longer a prediction."""
        options = loaded.request.options.replace(n_ctx=loaded.report.n_ctx, parallel=loaded.report.parallel)
        try:
            return plan_load(LoadRequest(loaded.request.model, options))
        except (UserError, OSError):
            return before

    def _room_for(self, need: int) -> list[_Entry] | None:
        """The idle, unpinned models to unload (least recently used first) so need fits; None if it cannot fit
        now (lock held)."""
        free = self.budget_bytes - sum(e.plan.bytes for e in self._entries.values())
        victims: list[_Entry] = []
        idle = [e for e in self._entries.values() if not e.busy and not e.pinned and e.loaded is not None]
        for entry in sorted(idle, key=lambda e: e.last_used):
            if free >= need:
                break
            victims.append(entry)
            free += entry.plan.bytes
        return victims if free >= need else None

    def _busy_sentence(self, load: LoadRequest, plan: Plan) -> str:
        with self._cond:
            held = ", ".join(
                f"{e.name} ({gib(e.plan.bytes)}{', pinned' if e.pinned else ', busy' if e.busy else ''})"
                for e in self._entries.values()
            )
        return (
            f"{load.model or 'the default model'} needs {gib(plan.bytes)} and the memory budget of "
            f"{gib(self.budget_bytes)} is held by {held}; retry when a reply is done."
        )

    def _pinned_sentence(self, load: LoadRequest, plan: Plan, pinned: int) -> str:
        return (
            f"{load.model or 'The default model'} needs {gib(plan.bytes)}, and pinned models hold {gib(pinned)} of "
            f"the {gib(self.budget_bytes)} memory budget: unpin one, or raise --memory-budget."
        )

    def _too_big_sentence(self, load: LoadRequest, plan: Plan) -> str:
        return (
            f"{load.model or 'The default model'} needs {gib(plan.bytes)} ({plan.how}), more than the whole memory "
            f"budget of {gib(self.budget_bytes)}: raise --memory-budget, or load it with a smaller --n-ctx or --parallel."
        )

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            entry.busy -= 1
            entry.last_used = time.monotonic()
            done = entry.busy == 0 and entry.keep_alive_s == 0 and not entry.pinned and entry.key in self._entries
            if done:
                self._remove(entry)
            self._cond.notify_all()
        if done:
            self._end(entry, "keep_alive 0")

    def _remove(self, entry: _Entry) -> None:
        """Take an entry out of the pool (lock held); its memory counts as free from now on."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if self._current is entry:
            self._current = max(self._entries.values(), key=lambda e: e.last_used, default=None)
        self._cond.notify_all()

    def _end(self, entry: _Entry, reason: str) -> None:
        """End a removed entry's model process (outside the lock: it waits for the process to exit)."""
        entry.client.close()
        self.counts["unload", reason] += 1

    def _reap_loop(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    return
                self._cond.wait(timeout=_REAP_S)
                now = time.monotonic()
                expired = [
                    e
                    for e in self._entries.values()
                    if not e.busy and not e.pinned and e.loaded is not None and now - e.last_used >= e.keep_alive_s
                ]
                for entry in expired:
                    self._remove(entry)
            for entry in expired:
                self._end(entry, "idle")


def _with_budget(request: Any, budget_bytes: int | None) -> Any:
    """A request (or the load it carries) with the memory budget its model's context is chosen within: every
    request the pool sends a model carries its entry's, so the process never sees a different load."""
    if isinstance(request, LoadRequest):
        if request.options.memory_budget_bytes == budget_bytes:
            return request
        return replace(request, options=request.options.replace(memory_budget_bytes=budget_bytes))
    load = getattr(request, "load", None)
    if isinstance(load, LoadRequest):
        return replace(request, load=_with_budget(load, budget_bytes))
    return request


def _idle_status() -> dict[str, Any]:
    return {
        "pid": None,
        "alive": False,
        "model": None,
        "load_report": None,
        "busy": False,
        "running": 0,
        "slots": 1,
        "queued": 0,
        "loading": False,
        "crashes": 0,
        "last_crash": None,
    }
