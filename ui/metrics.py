"""Live telemetry for the chat: the metrics panel, the chart data, and the per-reply table."""

from __future__ import annotations

import html
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from localrun.events import GenerationEvent, GenerationSummary
from localrun.format import fmt_bytes, fmt_ms, fmt_rate, prefill_count, prompt_rate, stats_line

TURN_HEADERS = [
    "#",
    "model",
    "TTFT (ms)",
    "prompt tok/s",
    "gen tok/s",
    "tokens",
    "peak RAM (MB)",
    "peak VRAM (MB)",
    "draft accepted",
    "finish",
]
_RATE_WINDOW_S = 0.5
# Fixed series colours: the chart's legend is set from these, not from whichever series came first.
RATE_COLORS = {"now": "#f97316", "average": "#2563eb"}
MEMORY_COLORS = {"RAM": "#16a34a", "VRAM": "#9333ea"}
_MB = 1e6


def _card(key: str, label: str, value: str, raw: float | int | None, note: str = "") -> str:
    data = "" if raw is None else f' data-value="{raw}"'
    sub = f'<div class="lr-note">{html.escape(note)}</div>' if note else ""
    return (
        f'<div class="lr-card"><div class="lr-label">{label}</div>'
        f'<div class="lr-value" id="m-{key}"{data}>{html.escape(value)}</div>{sub}</div>'
    )


def metrics_html(event: GenerationEvent | None, *, state: str = "idle") -> str:
    """The live panel: TTFT, prompt and generation tok/s, tokens, RAM and VRAM now and at peak.

    Each value carries data-value with the raw number (seconds, tok/s, bytes) for tests and scripts.
    """
    if event is None:
        cards = [_card(k, label, "–", None) for k, label in _LABELS]
        return _wrap(cards, state)
    vram_note = f"peak {fmt_bytes(event.peak_vram_bytes)}" if event.vram_bytes is not None else "no GPU"
    cards = [
        _card("ttft", "TTFT", fmt_ms(event.ttft_s), event.ttft_s),
        _prompt_card(event),
        _card("decode-tps", "Generation", fmt_rate(event.decode_tps), event.decode_tps),
        _card("tokens", "Tokens", str(event.generated_tokens), event.generated_tokens, f"{event.elapsed_s:.1f} s"),
        _card("ram", "RAM", fmt_bytes(event.ram_bytes), event.ram_bytes, f"peak {fmt_bytes(event.peak_ram_bytes)}"),
        _card("vram", "VRAM", fmt_bytes(event.vram_bytes), event.vram_bytes, vram_note),
    ]
    if event.draft_tokens:  # speculative decoding: the running acceptance
        rate = event.accepted_tokens / event.draft_tokens
        note = f"{event.accepted_tokens} of {event.draft_tokens} drafted"
        cards.append(_card("acceptance", "Draft accepted", f"{rate:.0%}", round(rate, 4), note))
    return _wrap(cards, state)


def _prompt_card(event: GenerationEvent) -> str:
    """The prompt rate over its token count, or, when too few were evaluated for a rate, what was."""
    new = prefill_count(event)
    cached = event.prompt_tokens - new
    rate = prompt_rate(event)
    if rate is not None:
        note = f"{new} new · {cached} cached" if cached else f"{new} tokens"
        return _card("prompt-tps", "Prompt", fmt_rate(rate), rate, note)
    value = f"{new} new token{'' if new == 1 else 's'}" if cached else f"{new} token{'' if new == 1 else 's'}"
    return _card("prompt-tps", "Prompt", value, None, f"{cached} cached" if cached else "too few for a rate")


_LABELS = (
    ("ttft", "TTFT"),
    ("prompt-tps", "Prompt"),
    ("decode-tps", "Generation"),
    ("tokens", "Tokens"),
    ("ram", "RAM"),
    ("vram", "VRAM"),
)


def _wrap(cards: list[str], state: str) -> str:
    return (
        f'<div class="lr-metrics" data-state="{html.escape(state)}">{"".join(cards)}'
        f'<div class="lr-state" id="m-state">{html.escape(state)}</div></div>'
    )


@dataclass
class LiveSeries:
    """Points for the live chart, one per UI update: tok/s (now and average) and memory over the reply."""

    points: list[dict[str, Any]] = field(default_factory=list)
    _recent: deque = field(default_factory=deque)

    def add(self, event: GenerationEvent) -> None:
        """Add a point for the figures of one UI update."""
        t = round(event.elapsed_s, 3)
        self._recent.append((event.elapsed_s, event.generated_tokens))
        while len(self._recent) > 2 and event.elapsed_s - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        now = (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None
        if now is not None:
            self.points.append({"time (s)": t, "tok/s": now, "series": "now"})
        if event.decode_tps is not None:
            self.points.append({"time (s)": t, "tok/s": event.decode_tps, "series": "average"})
        self.points.append({"time (s)": t, "MB": event.ram_bytes / _MB, "series": "RAM"})
        if event.vram_bytes is not None:
            self.points.append({"time (s)": t, "MB": event.vram_bytes / _MB, "series": "VRAM"})

    def rate_frame(self) -> Any:
        """tok/s over time, series "now" (last 0.5 s) and "average" (since the first token)."""
        import pandas as pd

        rows = [p for p in self.points if "tok/s" in p]
        return pd.DataFrame(rows or [{"time (s)": 0.0, "tok/s": 0.0, "series": s} for s in RATE_COLORS])

    def memory_frame(self) -> Any:
        """RAM (and VRAM with a GPU) of the model process over time, in MB."""
        import pandas as pd

        rows = [p for p in self.points if "MB" in p]
        return pd.DataFrame(rows or [{"time (s)": 0.0, "MB": 0.0, "series": "RAM"}])  # VRAM only with a GPU


def nice_top(value: float) -> float:
    """A round axis maximum a little above value (1, 2 or 5 times a power of ten)."""
    import math

    if not value or value <= 0 or math.isnan(value):
        return 1.0
    target = value * 1.15
    scale = 10 ** math.floor(math.log10(target))
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= target)


def _num(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def turn_row(index: int, model: str, s: GenerationSummary) -> list[Any]:
    """One row of the per-reply table, numbers kept numeric so the table sorts."""
    return [
        index,
        model,
        _num(None if s.ttft_s is None else s.ttft_s * 1000, 0),
        _num(prompt_rate(s)),
        _num(s.decode_tps),
        s.generated_tokens,
        _num(s.peak_ram_bytes / _MB, 0),
        _num(None if s.peak_vram_bytes is None else s.peak_vram_bytes / _MB, 0),
        _accepted(s),
        s.finish_reason,
    ]


def _accepted(s: GenerationSummary) -> str | None:
    """e.g. '87 % · 212 of 244' for a reply with a draft; None without one."""
    if not s.draft_tokens:
        return None
    return f"{s.accepted_tokens / s.draft_tokens:.0%} · {s.accepted_tokens} of {s.draft_tokens}"


def reply_footer(s: GenerationSummary) -> str:
    """The small stats line shown under an assistant message."""
    note = "" if s.finish_reason in ("stop", "length") else f" · {s.finish_reason}"
    return stats_line(s) + note


def plots(series: LiveSeries) -> tuple[Any, Any]:
    """Both charts, their y axes from 0 so a 0.01 MB wiggle does not look like a leak."""
    import gradio as gr

    rate, memory = series.rate_frame(), series.memory_frame()
    return (
        gr.LinePlot(value=rate, y_lim=[0, nice_top(rate["tok/s"].max())]),
        gr.LinePlot(value=memory, y_lim=[0, nice_top(memory["MB"].max())]),
    )


def turns_frame(turns: list) -> Any:
    """The per-reply table's rows as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(turns, columns=TURN_HEADERS)


CSS = """
.lr-metrics {display:flex; flex-wrap:wrap; gap:8px; align-items:stretch}
.lr-card {flex:1 1 100px; border:1px solid var(--border-color-primary); border-radius:8px; padding:6px 10px}
.lr-label {font-size:0.75em; opacity:0.7; text-transform:uppercase; letter-spacing:0.04em}
.lr-value {font-size:1.25em; font-weight:600; white-space:nowrap; font-variant-numeric:tabular-nums}
.lr-note {font-size:0.75em; opacity:0.7}
.lr-state {flex-basis:100%; font-size:0.8em; opacity:0.7}
.lr-stats {font-size:0.8em; opacity:0.75}
.lr-live {display:flex; flex-direction:column-reverse; max-height:240px; overflow-y:auto; contain:content;
  padding:8px 12px; border:1px solid var(--border-color-primary); border-radius:8px}
.lr-live:has(> .lr-text:empty) {display:none}
.lr-text {white-space:pre-wrap}
.lr-text::after {content:"▍"; opacity:0.6}
"""
