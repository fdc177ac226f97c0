"""Human-readable figures, shared by the terminal and the UI."""

from __future__ import annotations

from typing import Any

from localrun.engine.events import GenerationEvent, GenerationSummary

# A prompt rate is shown only when at least this many prompt tokens were evaluated. Below that, TTFT is
# mostly fixed per-request cost (sampler set-up, one decode step), so tokens/TTFT understates the rate many
# times over: one new token after an 80-token cache hit read as "prompt 11 tok/s".
MIN_RATE_TOKENS = 16
# Why a reply ended, where the user should know: the stats line says it after the figures.
STOP_NOTES = {
    "repetition": "repetition, the reply kept repeating itself (--no-loop-guard lets it run on)",
    "length": "the token limit (--max-tokens)",
}


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.0f} {unit}"
    return f"{n} B"


LOADED_MODEL_HEADERS = ("NAME", "MEMORY", "PLANNED", "SLOTS", "DEVICE", "CONTEXT", "UNLOADS IN")


def unloads_in(row: dict[str, Any]) -> str:
    """When a loaded model unloads: pinned, busy, forever, or the idle time left."""
    if row.get("pinned"):
        return "pinned"
    if row.get("state") == "busy":
        return "busy"
    if row.get("state") == "loading":
        return "loading"
    left = row.get("expires_in_s")
    if left is None:
        return "forever"
    return f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"


def loaded_model_cells(row: dict[str, Any], name: str) -> tuple[str, ...]:
    """One loaded model (a model pool row, or /v1/models' loaded row) as `localrun ps` and the System tab show it."""
    return (
        name,
        fmt_bytes(row.get("memory_bytes"))
        + (f" + {fmt_bytes(row['vram_bytes'])} VRAM" if row.get("vram_bytes") else ""),
        fmt_bytes(row.get("planned_bytes"))
        + (
            f" (prompt cache {fmt_bytes(row.get('prompt_cache_bytes') or 0)}/{fmt_bytes(row['prompt_cache_limit_bytes'])})"
            if row.get("prompt_cache_limit_bytes")
            else ""
        ),
        f"{row.get('slots_busy', 0)}/{row.get('slots', 1)} busy",
        str(row.get("device", "?")),
        str(row.get("context_length", "?")),
        unloads_in(row),
    )


def fmt_rate(tps: float | None) -> str:
    return "n/a" if tps is None else f"{tps:.0f} tok/s" if tps >= 10 else f"{tps:.1f} tok/s"


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def prefill_count(s: GenerationSummary | GenerationEvent) -> int:
    """Prompt tokens the backend evaluated (the rest came from the KV cache)."""
    return s.prompt_tokens if s.prefill_tokens is None else s.prefill_tokens


def prompt_rate(s: GenerationSummary | GenerationEvent) -> float | None:
    """The prompt rate, or None when too few tokens were evaluated for it to mean something."""
    return s.prompt_tps if prefill_count(s) >= MIN_RATE_TOKENS else None


def prompt_figure(s: GenerationSummary | GenerationEvent) -> str:
    """e.g. '80 prompt tokens at 310 tok/s', or '1 new prompt token (80 cached)' after a KV-cache hit."""
    new = prefill_count(s)
    cached = s.prompt_tokens - new
    noun = "token" if new == 1 else "tokens"
    text = f"{new} new prompt {noun} ({cached} cached)" if cached else f"{new} prompt {noun}"
    rate = prompt_rate(s)
    return text if rate is None else f"{text} at {fmt_rate(rate)}"


def stats_line(s: GenerationSummary | GenerationEvent) -> str:
    """e.g. 'TTFT 42 ms · 80 prompt tokens at 310 tok/s · gen 96 tok/s · 57 tok · RAM 310 MB · llamacpp/cpu'."""
    parts = [
        f"TTFT {fmt_ms(s.ttft_s)}",
        prompt_figure(s),
        f"gen {fmt_rate(s.decode_tps)}",
        f"{s.generated_tokens} tok",
        f"RAM {fmt_bytes(s.peak_ram_bytes)}",
    ]
    if s.peak_vram_bytes is not None:
        parts.append(f"VRAM {fmt_bytes(s.peak_vram_bytes)}")
    if getattr(s, "reasoning_tokens", 0):
        parts.append(thought_figure(s))
    if getattr(s, "draft_tokens", 0):
        parts.append(f"draft accepted {s.accepted_tokens}/{s.draft_tokens} ({s.accepted_tokens / s.draft_tokens:.0%})")
    if isinstance(s, GenerationSummary) and s.backend:
        parts.append(f"{s.backend}/{s.device}")
    if s.finish_reason in STOP_NOTES:
        parts.append(f"stopped: {STOP_NOTES[s.finish_reason]}")
    return " · ".join(parts)


def thought_figure(s: GenerationSummary | GenerationEvent) -> str:
    """e.g. 'thought 212 tok / 3.4 s' (and 'cut by the budget' when the thinking budget ended the block)."""
    seconds = f" / {s.reasoning_s:.1f} s" if s.reasoning_s is not None else ""
    cut = " (cut by the budget)" if getattr(s, "reasoning_cut", False) else ""
    return f"thought {s.reasoning_tokens} tok{seconds}{cut}"


def dropped_note(s: GenerationSummary, n_ctx: int | None = None) -> str | None:
    """The sentence for a reply whose oldest messages were left out of the prompt (None: nothing was)."""
    n = getattr(s, "dropped_messages", 0)
    if not n:
        return None
    room = f" of {n_ctx} tokens" if n_ctx else ""
    return f"The {n} oldest message{'s' if n > 1 else ''} (the system prompt kept) did not fit the context{room}: the model did not see {'them' if n > 1 else 'it'}."


def _finish(reason: str) -> str:
    note = STOP_NOTES.get(reason)
    if note is None:
        return reason
    return note if note.startswith(reason) else f"{reason}: {note}"


def _prompt_processing(s: GenerationSummary) -> str:
    rate = prompt_rate(s)
    return fmt_rate(rate) if rate is not None else f"no rate: under {MIN_RATE_TOKENS} tokens evaluated"


def summary_table(s: GenerationSummary) -> list[tuple[str, str]]:
    """Every figure of a finished request, as (label, value) rows for /stats and the UI."""
    rows = [
        ("finish reason", _finish(s.finish_reason)),
        ("backend / device", f"{s.backend} / {s.device}"),
        ("prompt tokens", f"{s.prompt_tokens} ({s.prefill_tokens} evaluated, {s.cached_tokens} from cache)"),
        ("generated tokens", str(s.generated_tokens)),
        *([("thinking", thought_figure(s))] if s.reasoning_tokens else []),
        *([("left out of the prompt", f"the {s.dropped_messages} oldest messages")] if s.dropped_messages else []),
        ("time to first token", fmt_ms(s.ttft_s)),
        ("prompt processing", _prompt_processing(s)),
        ("generation", fmt_rate(s.decode_tps)),
        ("total time", f"{s.total_s:.2f} s"),
        ("peak RAM (process RSS)", fmt_bytes(s.peak_ram_bytes)),
        ("peak VRAM", fmt_bytes(s.peak_vram_bytes)),
    ]
    if s.draft_tokens:
        rate = s.acceptance_rate or 0.0
        rows.append(("draft acceptance", f"{s.accepted_tokens}/{s.draft_tokens} ({rate:.0%})"))
        rows.append(("speculative rounds", f"{s.draft_rounds}, {s.mean_accepted_length or 0:.2f} accepted per round"))
        rows.append(("accepted per round", " ".join(f"{n}:{c}" for n, c in enumerate(s.accept_counts) if c)))
        rows.append(("draft length over time", _lengths(s.draft_lengths)))
        rows.append(("drafting / verifying", f"{s.draft_s:.2f} s / {s.verify_s:.2f} s"))
    if s.error:
        rows.append(("error", s.error))
    return rows


def _lengths(lengths: tuple[int, ...], most: int = 24) -> str:
    """Draft lengths per round; a long run shows its start and its end."""
    if len(lengths) <= most:
        return " ".join(map(str, lengths))
    half = most // 2
    return " ".join(map(str, lengths[:half])) + " … " + " ".join(map(str, lengths[-half:]))
