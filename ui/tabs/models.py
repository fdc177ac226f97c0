"""The Models tab: the catalog with fit verdicts for this machine, model info, Hugging Face search,
downloads with progress, and the models on disk with delete."""

from collections.abc import Iterator
from typing import Any, get_args

from localrun.errors import UserError, without_paths
from localrun.models import catalog
from localrun.models.store import allowed_spec
from localrun.settings import DEFAULT_CTX_CAP, KvType
from ui import store
from ui.controls import parse_int

TITLE = "Models"
KEY = "models"


def _frame(rows: list, headers: list[str]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=headers)


def _ctx_value(n_ctx: str | None) -> int | None:
    return parse_int("The context size", n_ctx)


def catalog_table(n_ctx: str | None = None, kv_type: str = "f16") -> Any:
    """The catalog with fit verdicts; a bad context size shows as an error message in the browser."""
    import gradio as gr

    try:
        return _frame(store.catalog_rows(n_ctx=_ctx_value(n_ctx), kv_type=kv_type), store.CATALOG_HEADERS)
    except UserError as exc:
        raise gr.Error(str(exc)) from None


def info_table(spec: str, n_ctx: str | None = None, kv_type: str = "f16", *, loopback: bool = False) -> tuple[Any, str]:
    """(field/value rows, status) for one model; a user mistake becomes the status line."""
    try:
        allowed_spec(spec, loopback=loopback)
        rows = store.model_info(spec, n_ctx=_ctx_value(n_ctx), kv_type=kv_type)
        return _frame(rows, ["field", "value"]), f"Info for **{spec}**"
    except UserError as exc:
        return _frame([], ["field", "value"]), f"⚠️ {exc}"


def hub_search(query: str) -> tuple[Any, Any, str]:
    """Search the Hub: results, the download choices they offer, and a status line."""
    import gradio as gr

    try:
        rows, specs = store.search_rows(query)
    except UserError as exc:
        return _frame([], store.SEARCH_HEADERS), gr.skip(), f"⚠️ {exc}"
    status = f"{len(rows)} repos match {query!r}" if rows else f"Nothing matches {query!r}."
    choices = specs + [m.name for m in catalog.catalog()]
    return _frame(rows, store.SEARCH_HEADERS), gr.Dropdown(choices=choices, value=specs[0] if specs else None), status


def download(spec: str) -> Iterator[tuple[str, Any]]:
    """Progress lines while a model downloads, then the refreshed list of local models."""
    import gradio as gr

    try:
        task = store.start_download(spec or "")
    except UserError as exc:
        yield f"⚠️ {exc}", gr.skip()
        return
    for line in store.follow(task):
        yield line, gr.skip()
    yield line, _frame(store.local_table(), store.LOCAL_HEADERS)


def delete(spec: str, confirm: bool) -> tuple[str, Any, Any]:
    """Delete a downloaded model once confirmed: status, refreshed list, confirm box reset."""
    import gradio as gr

    if not spec:
        return "Pick a downloaded model to delete.", gr.skip(), gr.skip()
    if not confirm:
        return f"Tick **I am sure** to delete {spec}.", gr.skip(), gr.skip()
    try:
        targets = store.delete_model(spec)
    except UserError as exc:
        return f"⚠️ {without_paths(str(exc))}", gr.skip(), gr.skip()
    local = _frame(store.local_table(), store.LOCAL_HEADERS)
    return (
        f"Deleted {spec} ({len(targets)} item{'s' * (len(targets) != 1)} in the store)",
        local,
        gr.Checkbox(value=False),
    )


def _local_names() -> list[str]:
    return [r.name for r in store.local_rows() if r.name != catalog.DEFAULT_MODEL_NAME]


def build(ctx: Any) -> None:
    """Lay out the tab and wire its events."""
    import gradio as gr

    gr.Markdown("### Catalog\nFit verdicts for this machine's free memory, at the context and KV-cache type below.")
    with gr.Row():
        n_ctx = gr.Textbox(
            "",
            label="Context for the estimate",
            info=f"Blank: the model's, capped at {DEFAULT_CTX_CAP}, as Load does.",
            placeholder="auto",
            elem_id="fit-ctx",
        )
        kv_type = gr.Dropdown(list(get_args(KvType)), value="f16", label="KV-cache type", elem_id="fit-kv")
        refresh = gr.Button("Refresh", elem_id="catalog-refresh", scale=0)
    table = gr.Dataframe(catalog_table(), label="Catalog", interactive=False, wrap=True, elem_id="catalog-table")
    refresh.click(catalog_table, inputs=[n_ctx, kv_type], outputs=[table], api_name="catalog")
    _build_info(table, n_ctx, kv_type, loopback=ctx.loopback)
    local, target = _build_local(*_build_hub())

    def fresh(n: str | None, kv: str) -> tuple[Any, Any, Any]:
        return (
            catalog_table(n, kv),
            _frame(store.local_table(), store.LOCAL_HEADERS),
            gr.Dropdown(choices=_local_names()),
        )

    # Free memory and the files on disk change: recompute on every page load and every visit to the tab.
    for trigger in (ctx.demo.load, ctx.components["tab_models"].select):
        trigger(fresh, inputs=[n_ctx, kv_type], outputs=[table, local, target], api_visibility="private")


def _build_info(table: Any, n_ctx: Any, kv_type: Any, *, loopback: bool) -> None:
    import gradio as gr

    def show(spec: str, n_ctx: str | None = None, kv_type: str = "f16") -> tuple[Any, str]:
        return info_table(spec, n_ctx, kv_type, loopback=loopback)

    gr.Markdown("### Model info\nPick a model (or click a catalog row) for its metadata and memory estimate.")
    with gr.Row():
        names = [m.name for m in catalog.catalog()]
        spec = gr.Dropdown(
            names,
            value=catalog.DEFAULT_MODEL_NAME,
            allow_custom_value=True,
            label="Model",
            elem_id="info-model",
            scale=4,
        )
        button = gr.Button("Show info", elem_id="info-btn", scale=1)
    status = gr.Markdown("", elem_id="info-status")
    info = gr.Dataframe(_frame([], ["field", "value"]), interactive=False, wrap=True, elem_id="model-info")
    button.click(show, inputs=[spec, n_ctx, kv_type], outputs=[info, status], api_name="model_info")

    def on_select(evt: gr.SelectData, n: str | None, kv: str) -> tuple[Any, Any, str]:
        name = evt.row_value[0] if evt.row_value else ""
        frame, line = show(name, n, kv)
        return name, frame, line

    table.select(on_select, inputs=[n_ctx, kv_type], outputs=[spec, info, status], api_visibility="private")


def _build_hub() -> tuple[Any, Any, Any]:
    """Search and download; returns the download button, its spec and its progress line for _build_local."""
    import gradio as gr

    gr.Markdown("### Hugging Face\nSearch GGUF and text-generation repos, then download one file or a catalog model.")
    with gr.Row():
        query = gr.Textbox(label="Search", placeholder="e.g. qwen2.5 0.5b gguf", elem_id="hub-query", scale=4)
        search = gr.Button("Search", elem_id="hub-search-btn", scale=1)
    search_status = gr.Markdown("", elem_id="hub-status")
    results = gr.Dataframe(_frame([], store.SEARCH_HEADERS), interactive=False, wrap=True, elem_id="hub-results")
    with gr.Row():
        spec = gr.Dropdown(
            [m.name for m in catalog.catalog()],
            value=None,
            allow_custom_value=True,
            label="Download",
            info="A catalog name[:QUANT], REPO, or REPO:FILE.gguf",
            elem_id="download-spec",
            scale=4,
        )
        button = gr.Button("Download", variant="primary", elem_id="download-btn", scale=1)
    progress = gr.Markdown("", elem_id="download-status")
    search.click(hub_search, inputs=[query], outputs=[results, spec, search_status], api_name="hub_search")
    query.submit(hub_search, inputs=[query], outputs=[results, spec, search_status], api_visibility="undocumented")
    return button, spec, progress


def _build_local(dl_button: Any, dl_spec: Any, dl_progress: Any) -> tuple[Any, Any]:
    """The models on disk with delete; the download button refreshes the list. Returns (list, delete picker)."""
    import gradio as gr

    gr.Markdown("### On this machine")
    local = gr.Dataframe(
        _frame(store.local_table(), store.LOCAL_HEADERS), interactive=False, wrap=True, elem_id="local-table"
    )
    with gr.Row():
        target = gr.Dropdown(
            _local_names(),
            value=None,
            allow_custom_value=True,
            label="Delete a downloaded model",
            elem_id="delete-model",
            scale=4,
        )
        confirm = gr.Checkbox(label="I am sure", value=False, elem_id="delete-confirm", scale=1)
        button = gr.Button("Delete", variant="stop", elem_id="delete-btn", scale=1)
        refresh = gr.Button("Refresh", elem_id="local-refresh", scale=0)
    status = gr.Markdown("", elem_id="delete-status")
    button.click(delete, inputs=[target, confirm], outputs=[status, local, confirm], api_name="delete_model")
    refresh.click(
        lambda: (_frame(store.local_table(), store.LOCAL_HEADERS), gr.Dropdown(choices=_local_names())),
        outputs=[local, target],
        api_name="local_models",
    )
    dl_button.click(download, inputs=[dl_spec], outputs=[dl_progress, local], api_name="download", concurrency_limit=2)
    return local, target
