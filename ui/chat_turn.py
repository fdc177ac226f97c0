"""A chat turn in the web UI: send the request to the model process, relay its updates to the page at a
paced rate, then finish the turn (the reply with its stats, its row in the turns table, the saved chat).
The Chat tab's handlers build the Turn; chat_history reopens a saved chat through the same outputs.
"""

import html
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from localrun.engine.chat import after_turn
from localrun.engine.events import GenerationEvent
from localrun.engine.messages import Failed, GenerateRequest, Loaded, Progress
from localrun.errors import UserError
from localrun.format import dropped_note, stats_line
from ui import chat_history
from ui.controls import is_remote
from ui.metrics import LiveSeries, charts_html, metrics_html, reply_footer, thinking_label, turn_row, turns_frame

_TEXT_INTERVAL_S = 0.5  # the streaming reply and the live panel
_PLOT_INTERVAL_S = 1.0  # the charts


def loaded_name(loaded: Loaded) -> str:
    """The loaded model's name; for a remote engine's first model (asked for blank), the one it answered with."""
    return loaded.name or loaded.report.details.get("model") or "?"


@dataclass(frozen=True)
class Turn:
    """One turn as the chat tab sends it: the request, the history it answers as the page shows it, the
    history from before (what stays when nothing comes back) and the typed message (None for Regenerate)."""

    request: GenerateRequest
    history: list
    before: list
    message: str | None = None


def clear_chat(ctx: Any, owner: str) -> tuple:
    """Forget this session's chat (stopping its reply if one runs) and reset the panel and charts."""
    ctx.worker.cancel(owner)
    return update(
        chatbot=[],
        history=[],
        turns=[],
        metrics=metrics_html(None),
        charts=charts_html(LiveSeries()),
        turns_table=turns_frame([]),
        status="",
        live="",
    )


def status_only(status: str) -> tuple:
    return update(status=status)


def thinking_block(reasoning: str, label: str, *, open_: bool = False) -> str:
    """A thinking model's block as a collapsible part of its reply (open while it streams)."""
    return (
        f'<details class="lr-thinking"{" open" if open_ else ""}><summary>{html.escape(label)}</summary>'
        f'<div class="lr-thought">{html.escape(reasoning.strip())}</div></details>\n\n'
    )


def display(history: list) -> list[dict[str, str]]:
    """Chatbot messages: each reply with its thinking (collapsed) above it and its stats line underneath."""
    shown = []
    for m in history:
        content = m["content"]
        if m.get("reasoning"):
            content = thinking_block(m["reasoning"], m.get("thinking_label") or "Thinking") + content
        if m.get("stats"):
            content = f'{content}\n\n<span class="lr-stats">{html.escape(m["stats"])}</span>'
        shown.append({"role": m["role"], "content": content})
    return shown


def stream(ctx: Any, turn: Turn, turns: list, owner: str) -> Iterator[tuple]:
    """Relay the worker's updates to the page, then finish the turn.

    Every update the browser receives costs CPU on the cores the model runs on (the page re-renders, and the
    server handles the message), so updates are paced: the reply text and the panel _TEXT_INTERVAL_S apart,
    the charts _PLOT_INTERVAL_S apart, the chat history and the table once at the end, and nothing unchanged.
    """

    series, parts, thought, event, failed, model = LiveSeries(), [], [], None, None, None
    last_text, last_plot = 0.0, time.monotonic()  # the first chart once it has a second of points
    generating, remote = False, turn.request.load is not None and is_remote(turn.request.load.options)
    yield update(
        chatbot=display(turn.history),
        metrics=metrics_html(None, state="waiting"),
        status="Waiting…",
        message="",
        live="",
    )
    for got in ctx.worker.submit(turn.request, owner=owner):
        if isinstance(got, Failed):
            failed = got
            continue
        if isinstance(got, Progress | Loaded):
            model = loaded_name(got) if isinstance(got, Loaded) else model
            text = f"Loaded {loaded_name(got)}" if isinstance(got, Loaded) else got.text
            yield update(status=f"⏳ {text}…")
            continue
        event = got
        parts.append(event.text)
        thought.append(event.reasoning)
        now = time.monotonic()
        if event.is_final or now - last_text < _TEXT_INTERVAL_S:
            continue
        last_text = now
        series.add(event)
        out = {"metrics": metrics_html(event, state="generating", remote=remote)}
        if now - last_plot >= _PLOT_INTERVAL_S:
            last_plot = now
            out["charts"] = charts_html(series)
        # Plain text into a light element (Gradio sends it as an append); the chat renders the reply once, at
        # the end. The status line changes only once.
        live = html.escape("".join(parts))
        if event.reasoning_tokens:  # the thinking streams open above the answer, with its count and time
            live = thinking_block("".join(thought), thinking_label(event), open_=not live) + live
        out["live"] = live
        if not generating:
            generating, out["status"] = True, "Generating…"
        yield update(**out)
    if event is not None:
        series.add(event)
    if model is None:
        answered = ctx.worker.loaded_for(turn.request.load)
        model = loaded_name(answered) if answered is not None else "?"
    yield _finish(turn, turns, parts, event, failed, series, model, ctx=ctx, owner=owner, remote=remote)


def _save(ctx: Any, owner: str, turn: Turn, history: list) -> None:
    """Keep the conversation in the chat store after each reply (a failed save is a warning, not a lost reply)."""
    try:
        ctx.chat_keeper.save(owner, history, turn.request.system)
    except UserError as exc:
        import gradio as gr

        gr.Warning(f"The chat was not saved: {exc}")


# The chat outputs, in order (the API returns them without the two States).
OUTPUTS = "chatbot history turns metrics charts turns_table status message live".split()


def update(**values: Any) -> tuple:
    """One update of the chat outputs (in OUTPUTS order): the given ones, gr.skip() for the rest."""
    import gradio as gr

    return tuple(values[name] if name in values else gr.skip() for name in OUTPUTS)


def _finish(
    turn: Turn,
    turns: list,
    parts: list[str],
    event: GenerationEvent | None,
    failed: Failed | None,
    series: LiveSeries,
    model: str,
    *,
    ctx: Any = None,
    owner: str = "",
    remote: bool = False,
) -> tuple:
    """The final update: the reply with its stats line, its row in the table, and the outcome; with ctx, the
    conversation is saved to the chat store."""
    import gradio as gr

    summary = event.summary if event is not None else None
    text = summary.text if summary is not None else "".join(parts)
    turns = list(turns)
    if summary is not None:
        turns.append(turn_row(len(turns) + 1, model, summary))
    reply = None
    if text:
        footer = reply_footer(summary) if summary is not None else "interrupted: the model process stopped"
        made = chat_history.reply_record(ctx, turn.request, text, summary, model) if ctx is not None else {}
        reply = {**made, "role": "assistant", "content": text, "stats": footer}
        if summary is not None and summary.reasoning:
            reply.update(reasoning=summary.reasoning, thinking_label=thinking_label(summary))
    history = after_turn(turn.before, turn.history, reply)  # nothing came back: the turn did not happen
    if reply is not None and ctx is not None:
        _save(ctx, owner, turn, history)
    # ...and a typed message goes back to the box, to send again
    unanswered = turn.message if reply is None and turn.message is not None else gr.skip()
    if failed is not None:
        gr.Warning(failed.message)
        status = f"⚠️ {failed.message}"
    elif summary is not None and summary.error:
        status = f"⚠️ Generation failed: {summary.error}"
    elif summary is not None:
        status = f"Done ({summary.finish_reason}): {stats_line(summary)}"
        note = dropped_note(summary)
        if note:
            gr.Info(note)
            status += f" · {note}"
    else:
        status = "⚠️ The reply ended without a result."
    state = summary.finish_reason if summary is not None else "error"
    metrics = (
        metrics_html(event, state=state, remote=remote) if event is not None else metrics_html(None, state="error")
    )
    return update(
        chatbot=display(history),
        history=history,
        turns=turns,
        metrics=metrics,
        charts=charts_html(series),
        turns_table=turns_frame(turns),
        status=status,
        message=unanswered,
        live="",
    )
