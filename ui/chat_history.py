"""Saved chats in the web UI: a sidebar of the user's chats (new, open, rename, delete with undo, search), each
finished reply saved to localrun's chat store, and the last chat reopened on a page reload or a restart.

Each browser session (Gradio's session hash) is bound to the chat it shows. Beyond loopback with a login, the
owner of a chat is the logged-in user, and nobody else lists or opens it.
"""

import html
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any

from localrun.chats import ChatStore, reply_message, title_from
from localrun.engine.events import GenerationEvent, GenerationSummary
from localrun.engine.messages import Failed, GenerateRequest, LoadRequest
from localrun.errors import UserError
from localrun.replay import saved_spec

_LIST_LIMIT = 100


@dataclass
class _Bound:
    chat_id: str | None
    user: str


class ChatKeeper:
    """The store, and which chat each browser session shows (and as which user)."""

    def __init__(self, store: ChatStore | None = None) -> None:
        self.store = store or ChatStore()
        self._sessions: dict[str, _Bound] = {}
        self.deleted: dict[str, str] = {}  # session -> the chat it deleted last (for Undo)
        self._lock = threading.Lock()

    def bind(self, session: str, user: str, chat_id: str | None) -> None:
        with self._lock:
            self._sessions[session] = _Bound(chat_id, user)

    def current(self, session: str) -> _Bound:
        with self._lock:
            return self._sessions.get(session) or _Bound(None, "")

    def save(self, session: str, history: list, system: str | None) -> str | None:
        """Save the session's conversation after a reply (a new chat on its first one); returns its id."""
        bound = self.current(session)
        if not history:
            return bound.chat_id
        now = time.time()
        for m in history:  # stamped once, so a message keeps its time through later saves
            m.setdefault("created_at", now)
        chat_id = bound.chat_id
        if chat_id is None:
            first = next((m["content"] for m in history if m["role"] == "user"), "New chat")
            chat_id = self.store.create(title=title_from(first), owner=bound.user, system=system or None)
        self.store.save_messages(chat_id, history, system=system or None)
        self.bind(session, bound.user, chat_id)
        return chat_id


def user_of(request: Any) -> str:
    """The logged-in user (empty without a login)."""
    return getattr(request, "username", None) or ""


def session_of(request: Any) -> str:
    return getattr(request, "session_hash", None) or ""


def choices(keeper: ChatKeeper, user: str, query: str = "") -> list[tuple[str, str]]:
    """The sidebar's list: (label, chat id), most recent first."""
    out = []
    for c in keeper.store.list(owner=user, query=query or "", limit=_LIST_LIMIT):
        when = time.strftime("%b %d %H:%M", time.localtime(c.updated_at))
        out.append((f"{c.title} · {when}", c.id))
    return out


def reply_record(ctx: Any, request: Any, text: str, summary: GenerationSummary | None, model: str) -> dict:
    """What the store keeps of a UI reply beyond its text: how it was made and its figures."""
    loaded = ctx.worker.loaded_for(request.load)  # the model that answered, not another tab's
    if loaded is None or summary is None:
        return {}
    options = request.load.options if request.load is not None else loaded.request.options
    return reply_message(text, summary, model=model, report=loaded.report, options=options, params=request.params)


def summary_of(figures: dict | None, text: str) -> GenerationSummary | None:
    """A saved reply's figures back as a GenerationSummary (for its stats line and the turns table)."""
    if not figures:
        return None
    names = {f.name for f in fields(GenerationSummary)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in figures.items() if k in names}
    try:
        return GenerationSummary(**{**values, "text": text})
    except TypeError:  # saved by a localrun whose figures differ: shown without them
        return None


def restored(messages: list[dict]) -> tuple[list[dict], list[list]]:
    """A saved chat as the chat tab holds it: the history (each reply with its stats line) and the turns table."""
    from ui.metrics import reply_footer, thinking_label, turn_row

    history, turns = [], []
    for m in messages:
        if m["role"] not in ("user", "assistant"):
            continue
        entry = dict(m)
        summary = summary_of(m.get("figures"), m["content"]) if m["role"] == "assistant" else None
        if summary is not None:
            entry["stats"] = reply_footer(summary)
            if summary.reasoning_tokens:
                entry["thinking_label"] = thinking_label(summary)
            turns.append(turn_row(len(turns) + 1, m.get("model") or "?", summary))
        history.append(entry)
    return history, turns


# ---- layout and events ------------------------------------------------------------------------------


# On a narrow window Gradio draws an open sidebar over the whole page: start it closed there.
NARROW_CLOSES_SIDEBAR = """() => { if (window.innerWidth <= 768)
  document.querySelector('#chats-sidebar.open .toggle-button')?.click(); }"""


def layout(c: SimpleNamespace) -> None:
    """The sidebar: New, search, the list of chats, rename, delete and undo."""
    import gradio as gr

    with gr.Sidebar(label="Chats", open=True, elem_id="chats-sidebar", position="left"):
        c.new_chat = gr.Button("New chat", elem_id="new-chat-btn", size="sm")
        c.chat_search = gr.Textbox(placeholder="Search chats", show_label=False, elem_id="chat-search", lines=1)
        c.chat_list = gr.Radio(choices=[], value=None, show_label=False, elem_id="chat-list")
        c.chat_title = gr.Textbox(label="Title", elem_id="chat-title", lines=1)
        with gr.Row():
            c.rename_chat = gr.Button("Rename", elem_id="rename-chat-btn", size="sm")
            c.delete_chat = gr.Button("Delete", elem_id="delete-chat-btn", size="sm", variant="stop")
        c.undo_delete = gr.Button("Undo delete", elem_id="undo-delete-btn", size="sm", visible=False)
        c.replay_chat = gr.Button("Replay", elem_id="replay-chat-btn", size="sm")
        c.chats_status = gr.Markdown("", elem_id="chats-status")


def wire(ctx: Any, c: SimpleNamespace, chat_outputs: list, replies: list, clear_chat: Any) -> None:
    """Events of the sidebar. chat_outputs: the chat tab's outputs (what clear_chat(ctx, session) returns);
    replies: the events that stream a reply (the list refreshes after each)."""
    import gradio as gr

    keeper: ChatKeeper = ctx.chat_keeper
    opened = [c.chat_list, c.chat_title, c.chats_status, c.undo_delete, c.picker, *chat_outputs]

    def listing(user: str, query: str, value: str | None) -> Any:
        return gr.Radio(choices=choices(keeper, user, query), value=value)

    def show(request: gr.Request, chat_id: str | None, query: str = "", note: str = "") -> tuple:
        user, session = user_of(request), session_of(request)
        if chat_id is None:
            keeper.bind(session, user, None)
            return (
                listing(user, query, None),
                "",
                note,
                gr.Button(visible=False),
                gr.skip(),
                *clear_chat(ctx, session),
            )
        info = keeper.store.info(chat_id, owner=user)
        history, turns = restored(keeper.store.messages(chat_id))
        keeper.bind(session, user, chat_id)
        picker, offer = _offer_model(ctx, keeper.store.messages(chat_id))
        status = note or offer
        return (
            listing(user, query, chat_id),
            info.title,
            status,
            gr.Button(visible=False),
            picker,
            *_chat(history, turns),
        )

    def on_load(request: gr.Request) -> tuple:
        chats = keeper.store.list(owner=user_of(request), limit=1)
        return show(request, chats[0].id if chats else None)

    def on_select(chat_id: str | None, query: str, request: gr.Request) -> tuple:
        ctx.worker.cancel(session_of(request))  # a reply still streaming belongs to the chat being left
        try:
            return show(request, chat_id, query)
        except UserError as exc:
            return show(request, None, query, note=f"⚠️ {exc}")

    def on_new(query: str, request: gr.Request) -> tuple:
        ctx.worker.cancel(session_of(request))
        return show(request, None, query)

    def on_rename(title: str, query: str, request: gr.Request) -> tuple:
        bound = keeper.current(session_of(request))
        if bound.chat_id is None:
            return gr.skip(), "Nothing to rename yet: this chat is saved with its first reply."
        try:
            keeper.store.rename(bound.chat_id, title, owner=user_of(request))
        except UserError as exc:
            return gr.skip(), f"⚠️ {exc}"
        return listing(user_of(request), query, bound.chat_id), "Renamed."

    def on_delete(query: str, request: gr.Request) -> tuple:
        bound = keeper.current(session_of(request))
        if bound.chat_id is None:
            return show(request, None, query, note="Nothing to delete: this chat is not saved yet.")
        ctx.worker.cancel(session_of(request))
        keeper.store.delete(bound.chat_id, owner=user_of(request))
        out = list(show(request, None, query, note=f"Deleted “{html.escape(_title(keeper, bound.chat_id))}”."))
        out[3] = gr.Button(visible=True)
        keeper.deleted[session_of(request)] = bound.chat_id
        return tuple(out)

    def on_undo(query: str, request: gr.Request) -> tuple:
        chat_id = keeper.deleted.pop(session_of(request), None)
        if chat_id is None:
            return show(request, None, query, note="Nothing to undo.")
        try:
            keeper.store.restore(chat_id, owner=user_of(request))
        except UserError as exc:
            return show(request, None, query, note=f"⚠️ {exc}")
        return show(request, chat_id, query, note="Restored.")

    hidden = {"api_visibility": "private", "show_progress": "hidden"}
    ctx.demo.load(on_load, outputs=opened, **hidden)
    ctx.demo.load(None, js=NARROW_CLOSES_SIDEBAR)
    c.chat_list.input(on_select, inputs=[c.chat_list, c.chat_search], outputs=opened, **hidden)
    c.new_chat.click(on_new, inputs=[c.chat_search], outputs=opened, cancels=replies, **hidden)
    tabs = ctx.components.get("tabs")
    if tabs is not None:  # the sidebar shows on every tab: opening or starting a chat goes to the Chat tab
        for picked in (c.chat_list.input, c.new_chat.click):
            picked(lambda: gr.Tabs(selected="chat"), outputs=tabs, **hidden)
    c.delete_chat.click(on_delete, inputs=[c.chat_search], outputs=opened, cancels=replies, **hidden)
    c.undo_delete.click(on_undo, inputs=[c.chat_search], outputs=opened, **hidden)
    c.rename_chat.click(
        on_rename, inputs=[c.chat_title, c.chat_search], outputs=[c.chat_list, c.chats_status], **hidden
    )
    c.chat_title.submit(
        on_rename, inputs=[c.chat_title, c.chat_search], outputs=[c.chat_list, c.chats_status], **hidden
    )

    def on_replay(request: gr.Request) -> Iterator[str]:
        yield from replay_report(ctx, request)

    c.replay_chat.click(on_replay, outputs=[c.chats_status], **hidden)

    def refresh(query: str, request: gr.Request) -> tuple:
        user, bound = user_of(request), keeper.current(session_of(request))
        title = _title(keeper, bound.chat_id) if bound.chat_id else gr.skip()
        return listing(user, query, bound.chat_id), title

    c.chat_search.change(refresh, inputs=[c.chat_search], outputs=[c.chat_list, c.chat_title], **hidden)
    for event in replies:
        event.then(refresh, inputs=[c.chat_search], outputs=[c.chat_list, c.chat_title], **hidden)


def replay_report(ctx: Any, request: Any) -> Iterator[str]:
    """Replay the session's chat on the model process, one line per reply as it is replayed."""
    from localrun.replay import replay_chat, summary_line
    from ui.store import allowed_load

    keeper: ChatKeeper = ctx.chat_keeper
    bound = keeper.current(session_of(request))
    if bound.chat_id is None:
        yield "Nothing to replay: this chat is not saved yet."
        return

    def answer(spec: str, options: Any, system: str | None, history: list, params: Any, *, cold: bool) -> tuple:
        allowed_load(spec, options, loopback=ctx.loopback)
        summary = None
        request_ = GenerateRequest.chat(history, params, system=system, load=LoadRequest(spec or None, options))
        for update in ctx.worker.submit(request_, owner=session_of(request)):
            if isinstance(update, Failed):
                raise UserError(update.message)
            if isinstance(update, GenerationEvent) and update.summary is not None:
                summary = update.summary
        loaded = ctx.worker.loaded_for(request_.load)
        return summary, loaded.report.model_path if loaded is not None else None

    lines = ["Replaying with the saved settings and seeds…"]
    yield "\n\n".join(lines)
    try:
        same = total = 0
        for turn in replay_chat(keeper.store, bound.chat_id, answer=answer, owner=bound.user):
            lines.append(summary_line(turn))
            same, total = same + turn.identical, total + 1
            yield "\n\n".join(lines)
        lines[0] = f"Replayed: {same} of {total} replies identical to the saved ones."
    except UserError as exc:
        lines[0] = f"⚠️ {exc}"
    yield "\n\n".join(lines)


def _title(keeper: ChatKeeper, chat_id: str) -> str:
    rows = [c for c in keeper.store.list(limit=10_000) if c.id == chat_id]
    return rows[0].title if rows else ""


def _chat(history: list, turns: list) -> tuple:
    """The chat tab's outputs for a reopened chat: the messages with their stats, the turns table, a fresh panel."""
    from ui.chat_turn import display, update
    from ui.metrics import LiveSeries, charts_html, metrics_html, turns_frame

    return update(
        chatbot=display(history),
        history=history,
        turns=turns,
        metrics=metrics_html(None),
        charts=charts_html(LiveSeries()),
        turns_table=turns_frame(turns),
        status="",
        live="",
    )


def _offer_model(ctx: Any, messages: list[dict]) -> tuple[Any, str]:
    """When the chat was made with another model than the loaded one: the picker set to it, and a line that
    says so (Load then loads it)."""
    import gradio as gr

    replies = [m for m in messages if m["role"] == "assistant" and (m.get("model") or m.get("model_path"))]
    if not replies:
        return gr.skip(), ""
    made_with = replies[-1].get("model") or ""
    spec = saved_spec(replies[-1])
    current = ctx.worker.loaded
    if current is not None and current.name == made_with:
        return gr.skip(), ""
    if any(loaded.name == made_with for loaded in ctx.worker.loads()):  # loaded beside another: no reload
        return gr.update(value=spec), ""
    quant = (replies[-1].get("run") or {}).get("quant")
    what = f"{made_with} ({quant})" if quant else made_with
    return gr.update(value=spec), f"This chat was made with **{html.escape(what)}**: press **Load** to load it."
