"""Prometheus text exposition for /metrics, written by hand (counters, gauges, histograms)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from localrun.engine.events import GenerationSummary

TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERRUN_BUCKETS = (0, 1, 2, 4, 8, 16)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus wants them."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {_num(self.sum)}",
            f"{name}_count {self.count}",
        ]
        return out


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class Metrics:
    """Everything /metrics shows; updated from request threads, so every change holds the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.cancelled = 0
        self.internal_errors = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.cancel_overrun = Histogram(OVERRUN_BUCKETS)
        self.peak_ram_bytes = 0
        self.peak_vram_bytes: int | None = None
        self.last_decode_tps: float | None = None

    def count_request(self, route: str, status: str) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def count_internal_error(self) -> None:
        """An exception the server did not expect (answered as a JSON 500)."""
        with self._lock:
            self.internal_errors += 1

    def count_cancel(self, overrun_tokens: int) -> None:
        """A cancelled generation that ended without a summary (its model process was ended)."""
        with self._lock:
            self.cancelled += 1
            self.cancel_overrun.observe(overrun_tokens)

    def observe(
        self, summary: GenerationSummary, *, ttft_s: float | None, latency_s: float, overrun_tokens: int = 0
    ) -> None:
        """Record a finished generation (a cancelled one too); times from the request's arrival."""
        with self._lock:
            self.prompt_tokens += summary.prompt_tokens
            if summary.generated_tokens:
                self.cached_tokens += max(summary.prompt_tokens - summary.prefill_tokens, 0)
            self.completion_tokens += summary.generated_tokens
            self.draft_tokens += summary.draft_tokens
            self.accepted_tokens += summary.accepted_tokens
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.latency.observe(latency_s)
            if summary.finish_reason == "cancelled":
                self.cancelled += 1
                self.cancel_overrun.observe(overrun_tokens)
            if summary.peak_ram_bytes is not None:  # None: a remote engine that does not say
                self.peak_ram_bytes = max(self.peak_ram_bytes, summary.peak_ram_bytes)
            if summary.peak_vram_bytes is not None:
                self.peak_vram_bytes = max(self.peak_vram_bytes or 0, summary.peak_vram_bytes)
            self.last_decode_tps = summary.decode_tps or self.last_decode_tps

    def render(self, gauges: dict[str, tuple[str, float | None]] | None = None, *, pool: Any = None) -> str:
        """The exposition text; gauges adds name -> (help, value) read at scrape time, pool (a ModelPool) its
        loads, unloads by reason, and each loaded model's memory."""
        with self._lock:
            out: list[str] = []
            add = _Writer(out)
            add.metric("localrun_requests_total", "counter", "HTTP requests by route and outcome.")
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'localrun_requests_total{{route="{route}",status="{status}"}} {n}')
            add.simple("localrun_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
            add.simple(
                "localrun_cached_tokens_total", "counter", "Prompt tokens reused from the KV cache.", self.cached_tokens
            )
            add.simple("localrun_completion_tokens_total", "counter", "Tokens generated.", self.completion_tokens)
            add.simple("localrun_cancelled_total", "counter", "Generations stopped by a client.", self.cancelled)
            add.simple(
                "localrun_internal_errors_total",
                "counter",
                "Unexpected server faults (JSON 500s).",
                self.internal_errors,
            )
            add.histogram("localrun_ttft_seconds", "Request arrival to first token (queue wait included).", self.ttft)
            add.histogram("localrun_request_latency_seconds", "Request arrival to last token.", self.latency)
            add.histogram(
                "localrun_cancel_overrun_tokens", "Tokens generated after a cancel was requested.", self.cancel_overrun
            )
            add.simple("localrun_draft_tokens_total", "counter", "Draft tokens proposed.", self.draft_tokens)
            add.simple("localrun_accepted_tokens_total", "counter", "Draft tokens accepted.", self.accepted_tokens)
            rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else None
            add.simple("localrun_draft_acceptance_ratio", "gauge", "Accepted / proposed draft tokens.", rate)
            add.simple(
                "localrun_decode_tokens_per_second", "gauge", "Last request's decode rate.", self.last_decode_tps
            )
            add.simple("localrun_model_peak_ram_bytes", "gauge", "Peak RSS of the model process.", self.peak_ram_bytes)
            add.simple("localrun_model_peak_vram_bytes", "gauge", "Peak GPU memory.", self.peak_vram_bytes)
            for name, (help_text, value) in (gauges or {}).items():
                add.simple(name, "counter" if name.endswith("_total") else "gauge", help_text, value)
        if pool is not None:
            _pool_lines(add, pool)
        return "\n".join(out) + "\n"


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _pool_lines(add: _Writer, pool: Any) -> None:
    """Loads, unloads (evictions are unloads with reason "evicted"), the budget, and each loaded model's memory."""
    counts = dict(pool.counts)
    add.metric("localrun_model_loads_total", "counter", "Models loaded, by reason.")
    loads = {r: n for (kind, r), n in counts.items() if kind == "load"} or {"request": 0}
    add.out += [f'localrun_model_loads_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(loads.items())]
    add.metric(
        "localrun_model_unloads_total", "counter", "Models unloaded: idle, evicted (for memory), keep_alive 0, asked."
    )
    unloads = {r: n for (kind, r), n in counts.items() if kind == "unload"} or {"idle": 0}
    add.out += [f'localrun_model_unloads_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(unloads.items())]
    add.simple("localrun_memory_budget_bytes", "gauge", "The model pool's memory budget.", pool.budget_bytes)
    add.simple(
        "localrun_memory_planned_bytes", "gauge", "Memory the loaded models are planned to hold.", pool.used_bytes()
    )
    rows = [r for r in pool.models() if r.get("memory_bytes") is not None]
    add.simple("localrun_models_loaded", "gauge", "Models loaded now.", len(pool.models()))
    if rows:
        add.metric("localrun_model_ram_bytes", "gauge", "RSS of each loaded model's process.")
        add.out += [f'localrun_model_ram_bytes{{model="{_label(r["name"])}"}} {r["memory_bytes"]}' for r in rows]


class _Writer:
    def __init__(self, out: list[str]) -> None:
        self.out = out

    def metric(self, name: str, kind: str, help_text: str) -> None:
        self.out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def simple(self, name: str, kind: str, help_text: str, value: float | None) -> None:
        if value is None:  # unknown (no GPU, no drafting yet): leave the series out
            return
        self.metric(name, kind, help_text)
        self.out.append(f"{name} {_num(value)}")

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        self.metric(name, "histogram", help_text)
        self.out += hist.lines(name)


def process_gauges(status: Callable[[], dict]) -> dict[str, tuple[str, float | None]]:
    """Scrape-time figures: this server's RSS, the model process's (status: the worker's, with its pid), the queue,
    the slots and the batching engine's steps (a name ending in _total is a counter)."""
    import psutil

    state = status()
    try:
        model_rss = psutil.Process(state["pid"]).memory_info().rss if state.get("pid") else None
    except psutil.Error:  # the model process ended between the status and the read
        model_rss = None
    return {
        "localrun_server_ram_bytes": ("RSS of the server process.", psutil.Process().memory_info().rss),
        "localrun_model_process_ram_bytes": ("RSS of the model process (what a remote localrun reports).", model_rss),
        "localrun_queue_waiting": ("Requests waiting for a slot.", state.get("queued", 0)),
        "localrun_busy": ("1 while a request runs.", 1 if state.get("busy") else 0),
        "localrun_slots": ("Sequences the model decodes together.", state.get("slots", 1)),
        "localrun_slots_busy": ("Slots generating now.", state.get("running", 0)),
        # the batching engine's own figures (several slots), as the model process last reported them
        "localrun_batch_size": ("Sequences in the model's last batched decode step.", state.get("engine_batch_size")),
        "localrun_batch_tokens": (
            "Tokens in that step (one per generating sequence, plus prompt chunks).",
            state.get("engine_batch_tokens"),
        ),
        "localrun_decode_steps_total": (
            "Batched decode steps; decode_sequences_total over it is the mean batch size.",
            state.get("engine_decode_steps"),
        ),
        "localrun_decode_sequences_total": (
            "Sequences summed over every batched decode step.",
            state.get("engine_decode_sequences"),
        ),
        "localrun_prompt_cache_bytes": (
            "Host RAM holding the KV state of prompts pushed out of their slots.",
            state.get("engine_prompt_cache_bytes"),
        ),
        "localrun_prompt_cache_entries": (
            "Prompts in the host-RAM prompt cache.",
            state.get("engine_prompt_cache_entries"),
        ),
        "localrun_prompt_cache_restored_total": (
            "Prompt states put back into a slot from the host-RAM prompt cache.",
            state.get("engine_prompt_cache_restored"),
        ),
    }
