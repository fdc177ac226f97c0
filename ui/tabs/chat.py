"""The Chat tab: pick and load a model, chat with streaming, and watch TTFT, tokens/s and memory live.

No `from __future__ import annotations` here: Gradio finds the gr.Request parameter of the handlers
by evaluating their annotations, and gradio is imported inside build() only.
"""

import html
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from localrun.engine.chat import without_last_reply
from localrun.engine.messages import Failed, GenerateRequest, Loaded, LoadRequest, Progress
from localrun.engine.structured import with_json_schema
from localrun.errors import UserError
from localrun.models import catalog
from localrun.settings import LoadOptions, SamplingParams, recommendable
from ui import chat_history, store
from ui.chat_turn import OUTPUTS, Turn, clear_chat, loaded_name, status_only, stream
from ui.controls import (
    form_load_options,
    is_remote,
    make_control,
    recommended_values,
    rows,
    sampling_params,
    visible_fields,
)
from ui.metrics import LiveSeries, charts_html, metrics_html, turns_frame

TITLE = "Chat"
KEY = "chat"
# Each update costs the browser and the server CPU on the cores the model runs on, so updates are paced: two a
# second keep the text moving without slowing generation (the charts are inline SVG: see ui.metrics).
# Related settings share a row (their Meta group): common load options, then llama.cpp's, then transformers'.
LOAD_ROWS = rows(LoadOptions)
SAMPLING_ROWS = rows(SamplingParams)
RECOMMENDABLE = recommendable(SamplingParams)
_PICKER_INFO = "A model on disk, a catalog name, or the path of a .gguf file or model directory."
_REMOTE_PICKER_INFO = "The name of a model the remote engine serves; blank: the first one it lists."


def build(ctx: Any) -> None:
    """Lay out the tab and wire its events."""
    if getattr(ctx, "chat_keeper", None) is None:
        ctx.chat_keeper = chat_history.ChatKeeper()
    c = _layout(ctx)
    shared = {"model_picker": c.picker, "load_controls": c.load_controls, "load_status": c.load_status}
    ctx.components.update(shared, load_button=c.load)  # the Compare tab loads a picked variant with them
    _wire(ctx, c)


def sidebar(ctx: Any) -> None:
    """The saved chats, in the page's sidebar (built before the tabs; the Chat tab wires it)."""
    c = SimpleNamespace()
    chat_history.layout(c)
    ctx.components["chat_sidebar"] = c


def _layout(ctx: Any) -> SimpleNamespace:
    import gradio as gr

    if "chat_sidebar" not in ctx.components:
        sidebar(ctx)
    c = ctx.components["chat_sidebar"]
    with gr.Row():
        c.picker = gr.Dropdown(
            choices=store.model_choices(),
            value=ctx.default_model or catalog.DEFAULT_MODEL_NAME,
            allow_custom_value=True,
            label="Model",
            info=_PICKER_INFO,
            elem_id="model-picker",
            scale=5,
        )
        c.refresh = gr.Button("↻", elem_id="model-refresh", scale=0, min_width=50, size="sm")
        c.load = gr.Button("Load", variant="primary", elem_id="load-btn", scale=1)
    # Filled by the page's load event, so "Connecting…" going away also says the page is live.
    c.load_status = gr.Markdown("Connecting…", elem_id="load-status")
    with gr.Accordion("Load options", open=False, elem_id="load-options"):
        c.load_controls = _rows(LoadOptions, LOAD_ROWS)
    with gr.Accordion("Sampling and system prompt", open=False, elem_id="sampling-options"):
        system, values = recommended_values(store.recommended(c.picker.value))
        c.recommended_note = gr.Markdown(_recommended_note(c.picker.value), elem_id="recommended-note")
        c.sampling = _rows(SamplingParams, SAMPLING_ROWS, values)
        c.system = gr.Textbox(system, label="System prompt", lines=2, elem_id="system-prompt")
        c.json_schema = gr.Textbox(
            "",
            label="JSON schema",
            lines=2,
            elem_id="json-schema",
            info="Replies follow this schema, enforced while sampling (llama.cpp backend). Blank: free text.",
        )
    with gr.Row():
        with gr.Column(scale=3):
            _layout_chat(c)
        with gr.Column(scale=2):
            _layout_metrics(c)
    c.history = gr.State([])
    c.turns = gr.State([])
    c.remote_mode = gr.State(False)  # whether the backend picked is the remote one (the picker then names its model)
    return c


def _rows(model: type, rows: tuple[tuple[str, ...], ...], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Controls for a settings model, laid out in rows of related fields, starting at values where given."""
    import gradio as gr

    values = values or {}
    controls = {}
    for names in rows:
        with gr.Row():
            controls.update({name: make_control(model, name, value=values.get(name)) for name in names})
    return controls


def _recommended_note(spec: str | None, backend: str = "auto") -> str:
    if backend == "remote":
        return "A remote engine applies its model's own settings to those left at their defaults here."
    rec = store.recommended(spec)
    if rec is None:
        return "No recommended settings for this model: the defaults apply."
    shown = ", ".join(f"{k} {v}" for k, v in rec.sampling().items())
    system = " and a system prompt" if rec.system else ""
    return f"The catalog's recommended settings for this model are filled in: {shown}{system}."


def apply_recommended(spec: str | None, backend: str = "auto") -> tuple[Any, ...]:
    """(note, system prompt, *sampling values) for the picked model, for the picker's change event. A remote
    model starts from the defaults, which are left to the engine (a local manifest's DRY or top-k would be
    refused by an engine that lacks them)."""
    system, values = recommended_values(None if backend == "remote" else store.recommended(spec))
    return (_recommended_note(spec, backend), system, *(values[name] for name in RECOMMENDABLE))


def _layout_chat(c: SimpleNamespace) -> None:
    import gradio as gr

    c.chatbot = gr.Chatbot(
        elem_id="chatbot",
        label="Chat",
        height=480,
        buttons=["copy"],
        feedback_options=None,
        placeholder="Load a model (or just type: the picked model loads on the first message).",
    )
    # The reply streams here as plain text, and moves into the chat (rendered as markdown) when it ends.
    c.live = gr.HTML(
        "", html_template='<div class="lr-live"><div class="lr-text">${value}</div></div>', elem_id="live-reply"
    )
    # lines=1 with room to grow: Enter sends, Shift+Enter adds a line (Gradio's rule for one-line boxes).
    c.message = gr.Textbox(
        label="Message",
        placeholder="Type a message: Enter sends, Shift+Enter adds a line",
        lines=1,
        max_lines=8,
        elem_id="chat-input",
        autofocus=True,
    )
    with gr.Row():
        c.send = gr.Button("Send", variant="primary", elem_id="send-btn")
        c.stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        c.regen = gr.Button("Regenerate", elem_id="regen-btn")
        c.clear = gr.Button("Clear", elem_id="clear-btn")
    c.status = gr.Markdown("", elem_id="chat-status")


def _layout_metrics(c: SimpleNamespace) -> None:
    import gradio as gr

    c.metrics = gr.HTML(metrics_html(None), elem_id="live-metrics", label="Live metrics")
    c.charts = gr.HTML(charts_html(LiveSeries()), elem_id="live-charts", label="Live charts")
    c.turns_table = gr.Dataframe(
        turns_frame([]), label="Every reply's figures (compare turns)", interactive=False, elem_id="turns-table"
    )


def _owner(request: Any) -> str:
    return getattr(request, "session_hash", None) or ""


def _wire(ctx: Any, c: SimpleNamespace) -> None:
    import gradio as gr

    settings = {**c.load_controls, **c.sampling, "json_schema": c.json_schema}
    outputs = [getattr(c, name) for name in OUTPUTS]

    def on_send(message: str, history: list, turns: list, picker: str, system: str, request: gr.Request, **values):
        yield from send_reply(ctx, message, history, turns, picker, system, values, owner=_owner(request))

    def on_regenerate(history: list, turns: list, picker: str, system: str, request: gr.Request, **values):
        yield from regenerate_reply(ctx, history, turns, picker, system, values, owner=_owner(request))

    def on_stop(request: gr.Request) -> str:
        return "Stopping…" if ctx.worker.cancel(_owner(request)) else "Nothing is running."

    common = {"outputs": outputs, "inputs_kwargs": settings, "show_progress": "hidden"}
    chat_inputs = [c.message, c.history, c.turns, c.picker, c.system]
    replies = [
        c.send.click(on_send, inputs=chat_inputs, api_name="chat", **common),
        c.message.submit(on_send, inputs=chat_inputs, api_visibility="undocumented", **common),
        c.regen.click(on_regenerate, inputs=chat_inputs[1:], api_name="regenerate", **common),
    ]
    c.stop.click(on_stop, outputs=[c.status], api_name="stop", concurrency_limit=None, show_progress="hidden")

    def on_clear(request: gr.Request) -> tuple:
        ctx.chat_keeper.bind(_owner(request), chat_history.user_of(request), None)  # the saved chat stays
        return clear_chat(ctx, _owner(request))

    # cancels: a reply still streaming would otherwise write the old conversation back after Clear
    c.clear.click(on_clear, outputs=outputs, api_name="clear", cancels=replies)
    _wire_model(ctx, c)
    chat_history.wire(ctx, c, outputs, replies, clear_chat)


def _wire_model(ctx: Any, c: SimpleNamespace) -> None:
    """Load, the picker's choices, and what follows a model choice (recommended settings, visible options)."""
    import gradio as gr

    def on_load(picker: str, request: gr.Request, **values):
        yield from load_model(ctx, picker, values, owner=_owner(request))

    c.load.click(
        on_load,
        inputs=[c.picker],
        inputs_kwargs=c.load_controls,
        outputs=[c.load_status, c.load],
        api_name="load_model",
        concurrency_limit=None,
    )
    c.refresh.click(lambda: gr.Dropdown(choices=store.model_choices()), outputs=[c.picker], api_name="model_choices")
    drafts = c.load_controls["draft"]  # the draft picker (Load options) follows the models on disk too
    c.refresh.click(lambda: gr.Dropdown(choices=store.draft_choices()), outputs=[drafts], api_visibility="private")
    ctx.components["tab_chat"].select(
        lambda remote: gr.skip() if remote else gr.Dropdown(choices=store.model_choices()),
        inputs=[c.remote_mode],
        outputs=[c.picker],
        api_visibility="private",
    )  # a model downloaded in the Models tab shows up on the way back
    # A new page sees the models on disk now and the model the shared worker has loaded.
    ctx.demo.load(
        lambda: (gr.Dropdown(choices=store.model_choices()), _loaded_text(ctx.worker.loaded)),
        outputs=[c.picker, c.load_status],
        api_visibility="private",
    )
    recommendable = [c.sampling[name] for name in RECOMMENDABLE]
    backend = c.load_controls["backend"]
    c.picker.change(
        apply_recommended,
        inputs=[c.picker, backend],
        outputs=[c.recommended_note, c.system, *recommendable],
        api_visibility="private",
    )
    backend.change(
        lambda backend, picker, was_remote: picker_for_backend(ctx, backend, picker, was_remote),
        inputs=[backend, c.picker, c.remote_mode],
        outputs=[c.remote_mode, c.picker, c.recommended_note, c.system, *recommendable],
        api_visibility="private",
    )
    names = list(c.load_controls)
    for trigger in (c.picker.change, c.load_controls["backend"].change, ctx.demo.load):
        trigger(
            lambda picker, backend: _visibility(picker, backend, names),
            inputs=[c.picker, c.load_controls["backend"]],
            outputs=list(c.load_controls.values()),
            api_visibility="private",
        )


def picker_for_backend(ctx: Any, backend: str, picker: str | None, was_remote: bool) -> tuple[Any, ...]:
    """(remote mode, picker, note, system prompt, *sampling values) when the backend changes to or from the remote
    one: the picker then names a model on the engine (blank: its first), or one here again."""
    import gradio as gr

    remote = backend == "remote"
    if remote == bool(was_remote):
        return (gr.skip(),) * (4 + len(RECOMMENDABLE))
    if remote:
        spec, choices, label, info = "", [], "Model on the remote engine", _REMOTE_PICKER_INFO
    else:  # a remote model's name is not a model here: back to the default unless it resolves
        spec = picker if picker and store.model_kind(picker) else (ctx.default_model or catalog.DEFAULT_MODEL_NAME)
        choices, label, info = store.model_choices(), "Model", _PICKER_INFO
    shown = gr.Dropdown(choices=choices, value=spec, label=label, info=info)
    return (remote, shown, *apply_recommended(spec, backend))


def _visibility(picker: str, backend: str, names: list[str]) -> list[Any]:
    """Show only the load options that apply to the backend the load will use."""
    import gradio as gr

    shown = visible_fields(backend, store.model_kind(picker or None))
    return [gr.update(visible=shown[name]) for name in names]


# ---- handlers (plain generators, so they read without Gradio) -----------------------------------


def _loaded_text(loaded: Loaded | None) -> str:
    if loaded is None:
        return "No model loaded yet: press **Load**, or just send a message."
    line = f"**Loaded {html.escape(loaded_name(loaded))}** · {html.escape(loaded.report.describe())}"
    return f"{line} · {html.escape(loaded.report.context_reason)}" if loaded.report.context_reason else line


def load_request(ctx: Any, spec: str | None, values: dict[str, Any]) -> LoadRequest:
    """The load the form asks for; a UserError with one sentence when it is wrong or not allowed from a browser."""
    kind = None if values.get("backend") == "remote" else store.model_kind(spec or None)
    options = form_load_options(values, kind)
    store.allowed_load(spec, options, loopback=ctx.loopback)
    return LoadRequest(spec or None, options)


def _what(request: LoadRequest) -> str:
    if request.model:
        return request.model
    return "the remote engine's first model" if is_remote(request.options) else "the default model"


def load_model(ctx: Any, spec: str, values: dict[str, Any], *, owner: str) -> Iterator[tuple[str, Any]]:
    """Yield (status, load button) while the worker loads; the button is disabled meanwhile."""
    import gradio as gr

    busy, ready = gr.Button(interactive=False), gr.Button(interactive=True)
    try:
        request = load_request(ctx, spec, values)
        for update in ctx.worker.submit(request, owner=owner):
            match update:
                case Progress(text=text):
                    yield f"⏳ {text}…", busy
                case Loaded():
                    yield _loaded_text(update), ready
                case Failed(message=message):
                    gr.Warning(message)
                    yield f"⚠️ Could not load {html.escape(_what(request))}: {message}", ready
    except UserError as exc:
        yield f"⚠️ {exc}", ready


def send_reply(
    ctx: Any, message: str, history: list, turns: list, spec: str, system: str, values: dict, *, owner: str
) -> Iterator[tuple]:
    """Add the user's message and stream the reply (loading the picked model first if none is loaded)."""
    if not (message or "").strip():
        yield status_only("Type a message first.")
        return
    asked = [*history, {"role": "user", "content": message}]
    yield from _reply(ctx, asked, history, message, turns, spec, system, values, owner)


def regenerate_reply(
    ctx: Any, history: list, turns: list, spec: str, system: str, values: dict, *, owner: str
) -> Iterator[tuple]:
    """Answer the last user message again; the earlier reply's figures stay in the table."""
    try:
        asked = without_last_reply(history)
    except UserError as exc:
        yield status_only(str(exc))
        return
    yield from _reply(ctx, asked, history, None, turns, spec, system, values, owner)


def _reply(
    ctx: Any,
    asked: list,
    before: list,
    message: str | None,
    turns: list,
    spec: str,
    system: str,
    values: dict,
    owner: str,
) -> Iterator[tuple]:
    """Build the request from the form (a wrong value is one sentence in the status line), then stream."""
    try:
        load = load_request(ctx, spec, values)
        params = with_json_schema(sampling_params(values), values.get("json_schema"))
        request = GenerateRequest.chat(asked, params, system=system, load=load)
    except UserError as exc:
        yield status_only(f"⚠️ {exc}")
        return
    yield from stream(ctx, Turn(request, asked, before, message), turns, owner)
