"""Live telemetry for the chat: the metrics panel, the live charts, and the per-reply table."""

from __future__ import annotations

import html
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from localrun.engine.events import GenerationEvent, GenerationSummary
from localrun.format import fmt_bytes, fmt_ms, fmt_rate, prefill_count, prompt_rate, stats_line

TURN_HEADERS = [
    "#",
    "model",
    "TTFT (ms)",
    "prompt tok/s",
    "gen tok/s",
    "tokens",
    "thinking tok",
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


def metrics_html(event: GenerationEvent | None, *, state: str = "idle", remote: bool = False) -> str:
    """The live panel: TTFT, prompt and generation tok/s, tokens, RAM and VRAM now and at peak.

    Each value carries data-value with the raw number (seconds, tok/s, bytes) for tests and scripts. remote: the
    model runs on an engine elsewhere, whose memory is what it reports (often nothing).
    """
    if event is None:
        cards = [_card(k, label, "–", None) for k, label in _LABELS]
        return _wrap(cards, state)
    cards = [
        _card("ttft", "TTFT", fmt_ms(event.ttft_s), event.ttft_s),
        _prompt_card(event),
        _card("decode-tps", "Generation", fmt_rate(event.decode_tps), event.decode_tps),
        _card("tokens", "Tokens", str(event.generated_tokens), event.generated_tokens, f"{event.elapsed_s:.1f} s"),
        _memory_card("ram", "RAM", event.ram_bytes, event.peak_ram_bytes, remote=remote),
        _memory_card("vram", "VRAM", event.vram_bytes, event.peak_vram_bytes, remote=remote),
    ]
    if event.draft_tokens:  # speculative decoding: the running acceptance
        rate = event.accepted_tokens / event.draft_tokens
        note = f"{event.accepted_tokens} of {event.draft_tokens} drafted"
        cards.append(_card("acceptance", "Draft accepted", f"{rate:.0%}", round(rate, 4), note))
    return _wrap(cards, state)


def _memory_card(key: str, label: str, now: int | None, peak: int | None, *, remote: bool) -> str:
    if now is not None:
        return _card(key, label, fmt_bytes(now), now, f"peak {fmt_bytes(peak)}")
    if remote:  # an engine that does not say (vLLM, TGI, llama-server), or no GPU there
        return _card(key, label, "n/a (remote)", None, "not reported by the engine")
    return _card(key, label, "n/a", None, "no GPU" if key == "vram" else "")


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
    """Points for the live charts, one per UI update: tok/s (now and average) and memory over the reply.

    rate and memory map a series name to its (seconds since the request, value) points."""

    rate: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    memory: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _recent: deque = field(default_factory=deque)

    def add(self, event: GenerationEvent) -> None:
        """Add a point for the figures of one UI update."""
        t = round(event.elapsed_s, 3)
        self._recent.append((event.elapsed_s, event.generated_tokens))
        while len(self._recent) > 2 and event.elapsed_s - self._recent[0][0] > _RATE_WINDOW_S:
            self._recent.popleft()
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        if t1 > t0 and n1 > n0:
            self.rate.setdefault("now", []).append((t, (n1 - n0) / (t1 - t0)))
        if event.decode_tps is not None:
            self.rate.setdefault("average", []).append((t, event.decode_tps))
        if event.ram_bytes is not None:  # None: a remote engine that does not say
            self.memory.setdefault("RAM", []).append((t, event.ram_bytes / _MB))
        if event.vram_bytes is not None:
            self.memory.setdefault("VRAM", []).append((t, event.vram_bytes / _MB))


# The charts are inline SVG inside one HTML element: a redraw is a small DOM update. Gradio's LinePlot
# re-rendered a Vega chart per update, which cost the page (and so the cores the model runs on) more than
# everything else on it (bench/ui.py: 0.78 of the CLI's rate with it, 0.87 without).
_W, _H, _LEFT, _TOP, _BOTTOM = 320, 130, 40, 8, 18


def charts_html(series: LiveSeries) -> str:
    """The panel's two live charts: generation tok/s (now and average) and the model process's memory."""
    return (
        '<div class="lr-charts">'
        f"{_chart('rate', 'Generation tokens/s', 'tok/s', series.rate, RATE_COLORS)}"
        f"{_chart('memory', 'Model process memory', 'MB', series.memory, MEMORY_COLORS)}"
        "</div>"
    )


def _chart(key: str, title: str, unit: str, lines: dict[str, list[tuple[float, float]]], colors: dict) -> str:
    values = [v for pts in lines.values() for _, v in pts]
    top = nice_top(max(values, default=0.0))  # from 0, so a 0.01 MB wiggle does not look like a leak
    t_end = max([t for pts in lines.values() for t, _ in pts] + [1.0])
    width, height = _W - _LEFT - 4, _H - _TOP - _BOTTOM

    def xy(t: float, v: float) -> str:
        return f"{_LEFT + t / t_end * width:.1f},{_TOP + height - min(v, top) / top * height:.1f}"

    shapes = [
        f'<line x1="{_LEFT}" y1="{_TOP + height}" x2="{_W - 4}" y2="{_TOP + height}" class="lr-axis"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + height}" class="lr-axis"/>',
        f'<text x="{_LEFT - 4}" y="{_TOP + 8}" text-anchor="end">{top:g}</text>',
        f'<text x="{_LEFT - 4}" y="{_TOP + height}" text-anchor="end">0</text>',
        f'<text x="{_W - 4}" y="{_H - 4}" text-anchor="end">{t_end:.1f} s</text>',
    ]
    legend = []
    for name, color in colors.items():
        pts = lines.get(name)
        if not pts:
            continue
        path = " ".join(xy(t, v) for t, v in pts)
        shapes.append(
            f'<polyline points="{path}" stroke="{color}" data-series="{name}" data-points="{len(pts)}" '
            f'data-last="{pts[-1][1]:.4g}"/>'
        )
        legend.append(f'<span><i style="background:{color}"></i>{name} {pts[-1][1]:.4g}</span>')
    return (
        f'<figure class="lr-chart" id="chart-{key}" data-top="{top:g}"><figcaption>{title} ({unit})'
        f"{''.join(legend)}</figcaption>"
        f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{title}">{"".join(shapes)}</svg></figure>'
    )


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
        s.reasoning_tokens,
        _num(None if s.peak_ram_bytes is None else s.peak_ram_bytes / _MB, 0),
        _num(None if s.peak_vram_bytes is None else s.peak_vram_bytes / _MB, 0),
        _accepted(s),
        s.finish_reason,
    ]


def _accepted(s: GenerationSummary) -> str | None:
    """e.g. '87 % · 212 of 244' for a reply with a draft; None without one."""
    if not s.draft_tokens:
        return None
    return f"{s.accepted_tokens / s.draft_tokens:.0%} · {s.accepted_tokens} of {s.draft_tokens}"


def thinking_label(s: GenerationSummary | GenerationEvent) -> str:
    """The title of a reply's thinking block, e.g. 'Thinking · 212 tok / 3.4 s'."""
    from localrun.format import thought_figure

    return "Thinking · " + thought_figure(s).removeprefix("thought ")


def reply_footer(s: GenerationSummary) -> str:
    """The small stats line shown under an assistant message."""
    note = (
        "" if s.finish_reason in ("stop", "length", "repetition") else f" · {s.finish_reason}"
    )  # those two: in the line
    return stats_line(s) + note


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
.lr-charts {display:flex; flex-wrap:wrap; gap:8px}
.lr-chart {flex:1 1 300px; margin:0; border:1px solid var(--border-color-primary); border-radius:8px; padding:6px 8px}
.lr-chart figcaption {font-size:0.8em; display:flex; flex-wrap:wrap; gap:4px 12px; align-items:center}
.lr-chart figcaption span {opacity:0.8; font-variant-numeric:tabular-nums}
.lr-chart i {display:inline-block; width:10px; height:3px; margin-right:4px; vertical-align:middle}
.lr-chart svg {width:100%; height:auto; display:block}
.lr-chart svg text {font-size:9px; fill:currentColor; opacity:0.7}
.lr-chart polyline {fill:none; stroke-width:1.5}
.lr-axis {stroke:currentColor; opacity:0.3}
"""
