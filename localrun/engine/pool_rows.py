"""What the model pool shows of each model (`localrun ps`, /v1/models, the System tab, /metrics): one row per
model loaded or loading, with its process's memory as the system counts it."""

from __future__ import annotations

from typing import Any


def entry_row(entry: Any, now: float) -> dict[str, Any]:
    """The row of one pool entry (localrun.engine.pool._Entry) at monotonic time now."""
    if entry.loaded is None:
        return {"key": entry.key, "name": entry.name, "state": "loading", "planned_bytes": entry.plan.bytes}
    state = entry.client.status()
    report = entry.loaded.report
    forever = entry.keep_alive_s == float("inf")
    left = None
    if not entry.pinned and not forever:
        left = 0.0 if entry.busy else max(0.0, entry.keep_alive_s - (now - entry.last_used))
    pid = state.get("pid")
    return {
        "key": entry.key,
        "name": entry.name,
        "spec": entry.load.model,
        "state": "busy" if entry.busy else "idle" if state.get("alive") else "stopped",
        "pid": pid,
        "memory_bytes": process_rss(pid),
        "vram_bytes": _vram(pid) if report.device == "cuda" else None,
        "planned_bytes": entry.plan.bytes,
        "planned_how": entry.plan.how,
        "prompt_cache_limit_bytes": entry.plan.prompt_cache,
        "prompt_cache_bytes": state.get("engine_prompt_cache_bytes"),
        "device": report.device,
        "backend": report.backend,
        "context_length": report.n_ctx,
        "context_reason": report.context_reason,
        "slots": report.parallel,
        "slots_busy": state.get("running", 0),
        "queued": state.get("queued", 0),
        "pinned": entry.pinned,
        "keep_alive_s": None if forever else entry.keep_alive_s,
        "expires_in_s": None if entry.busy else left,
        "crashes": state.get("crashes", 0),
    }


def _vram(pid: int | None) -> int | None:
    from localrun.hardware import process_vram_bytes

    return process_vram_bytes(pid) if pid else None


def process_rss(pid: int | None) -> int | None:
    """A process's resident memory (None: no such process, or not ours to read)."""
    if not pid:
        return None
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None
