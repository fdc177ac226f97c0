"""The Compare tab: quantization levels of one model side by side.

Arena: one prompt, the variants' answers stream into their own columns one after another (on a CPU they
would only slow each other down), each with its live TTFT and tokens/s. Quality run: the table fills in
row by row (size, bits per weight, speed, memory, perplexity, KL-divergence, top-1 agreement), then the
charts. Clicking a row loads that variant in the Chat tab and switches to it. Everything comes from
localrun.evaluate.compare.run_compare, the generator the CLI prints from.

Remote engines (one per line: a saved endpoint's NAME[:MODEL] or http://HOST:PORT/v1[#MODEL]) answer after the
local variants, measured the same way; with no level ticked the arena runs the model as it is.
"""

import html
from collections.abc import Iterator
from typing import Any

from localrun.errors import UserError
from localrun.evaluate.compare import DEFAULT_PROMPT, CompareEvent, CompareRequest, CompareRow, run_compare
from localrun.models import catalog
from ui import store

TITLE = "Compare"
KEY = "compare"
LEVELS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
HEADERS = ["variant", "MiB", "bpw", "load s", "RAM MB", "TTFT ms", "gen tok/s", "PPL", "ΔPPL %", "KLD", "KLD p99"]
HEADERS += ["top-1 %", "answer", "path"]


def _cell(value: float | None, digits: int) -> Any:
    return None if value is None else round(value, digits)


def table_row(r: CompareRow) -> list[Any]:
    """One row of the results table; an error row shows its sentence in the answer column."""
    return [
        r.label,
        _cell(r.size_bytes / 2**20 if r.size_bytes else None, 1),  # none for a remote engine
        _cell(r.bits_per_weight, 2),
        _cell(r.load_s, 2),
        _cell(r.peak_ram_bytes / 1e6 if r.peak_ram_bytes else None, 0),
        _cell(r.ttft_s * 1000 if r.ttft_s is not None else None, 0),
        _cell(r.decode_tps, 1),
        _cell(r.ppl, 3),
        _cell(r.delta_ppl_pct, 2),
        _cell(r.kld_mean, 4),
        _cell(r.kld_p99, 3),
        _cell(r.top1_agreement_pct, 1),
        f"⚠️ {r.error}" if r.error else r.answer,
        r.path,
    ]


def _frame(rows: list[list[Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=HEADERS)


def arena_html(columns: dict[str, dict[str, Any]]) -> str:
    """The answers side by side: one column per variant with its live TTFT and tokens/s."""
    cells = []
    for label, col in columns.items():
        ttft = "…" if col["ttft_s"] is None else f"{col['ttft_s'] * 1000:.0f} ms"
        tps = "…" if col["decode_tps"] is None else f"{col['decode_tps']:.1f} tok/s"
        state = col["state"]
        cells.append(
            f"<div class='arena-col' data-variant='{html.escape(label)}' data-state='{state}' "
            "style='flex:1;min-width:180px;border:1px solid #8884;border-radius:8px;padding:8px'>"
            f"<b>{html.escape(label)}</b> <small>{state}</small>"
            f"<div class='arena-stats'><small>TTFT {ttft} · {tps}</small></div>"
            + (
                f"<div class='arena-device'><small>{html.escape(col['device'])}</small></div>"
                if col.get("device")
                else ""
            )
            + f"<div class='arena-text' style='white-space:pre-wrap'>{html.escape(col['text'])}</div></div>"
        )
    return "<div id='arena-cols' style='display:flex;gap:8px;flex-wrap:wrap'>" + "".join(cells) + "</div>"


def parse_remotes(text: str) -> tuple[str, ...]:
    """The remote engines box: one spec per line (commas work too), blanks dropped."""
    return tuple(s for s in (part.strip() for part in (text or "").replace(",", "\n").splitlines()) if s)


def _request(
    model: str, levels: list[str], nf4: bool, int8: bool, prompt: str, text: str, quality: bool, remotes: str = ""
):
    as_is = not quality and not levels and not nf4 and not int8  # an arena with no level: the model as it is
    return CompareRequest(
        model=None if not model or model == catalog.DEFAULT_MODEL_NAME else model,
        quants=() if as_is else tuple(["F16", *levels]),
        nf4=nf4,
        int8=int8,
        prompt=prompt or DEFAULT_PROMPT,
        text_path=text.strip() or None,
        max_tokens=64 if not quality else 48,
        quality=quality,
        remotes=parse_remotes(remotes),
    )


def arena(
    model: str, levels: list[str], nf4: bool, int8: bool, prompt: str, remotes: str = ""
) -> Iterator[tuple[str, str]]:
    """(columns HTML, status) as each variant answers in turn."""
    columns: dict[str, dict[str, Any]] = {}
    try:
        req = _request(model, levels, nf4, int8, prompt, "", quality=False, remotes=remotes)
        for ev in run_compare(req):
            col = columns.setdefault(ev.label, {"text": "", "ttft_s": None, "decode_tps": None, "state": "waiting"})
            if ev.stage == "token":
                col.update(text=col["text"] + ev.text, ttft_s=ev.ttft_s, decode_tps=ev.decode_tps, state="running")
            elif ev.stage == "row" and ev.row is not None:
                col["state"] = "error" if ev.row.error else "done"
                col["device"] = ev.row.device
                if ev.row.error:
                    col["text"] = ev.row.error
            elif ev.label in ("HF",):
                columns.pop(ev.label, None)
            yield arena_html(columns), _status(ev)
    except UserError as exc:
        yield arena_html(columns), f"⚠️ {exc}"
        return
    yield arena_html(columns), "Arena finished."


def _status(ev: CompareEvent) -> str:
    return f"{ev.label}: {ev.message}" if ev.message and ev.stage != "token" else f"{ev.label}: generating…"


def quality_run(
    model: str, levels: list[str], nf4: bool, int8: bool, prompt: str, text: str, remotes: str = ""
) -> Iterator[tuple[Any, str, Any, Any]]:
    """(table, status, quality chart, speed chart): a row per finished variant, charts as rows arrive."""
    import gradio as gr

    from localrun.evaluate.report import quality_chart, speed_chart

    rows: list[CompareRow] = []
    try:
        for ev in run_compare(_request(model, levels, nf4, int8, prompt, text, quality=True, remotes=remotes)):
            if ev.stage == "token":
                continue
            if ev.stage == "row" and ev.row is not None:
                rows.append(ev.row)
                charts = (_png(quality_chart(rows)), _png(speed_chart(rows)))
                yield _frame([table_row(r) for r in rows]), _status(ev), *charts
            else:
                yield gr.skip(), _status(ev), gr.skip(), gr.skip()
    except UserError as exc:
        yield gr.skip(), f"⚠️ {exc}", gr.skip(), gr.skip()
        return
    yield gr.skip(), f"Quality run finished: {len(rows)} variants.", gr.skip(), gr.skip()


def _png(data: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def build(ctx: Any) -> None:
    """Lay out the tab and wire its events."""
    import gradio as gr

    with gr.Row():
        model = gr.Dropdown(
            choices=store.model_choices(),
            value=ctx.default_model or catalog.DEFAULT_MODEL_NAME,
            allow_custom_value=True,
            label="Model",
            info="A GGUF (its F16 is rebuilt from dequantised weights) or a Hugging Face model directory.",
            elem_id="compare-model",
            scale=4,
        )
        levels = gr.CheckboxGroup(
            list(LEVELS), value=["Q8_0", "Q4_0"], label="Levels (F16 is the reference)", elem_id="compare-levels"
        )
    with gr.Row():
        nf4 = gr.Checkbox(label="NF4 (bitsandbytes)", value=False, elem_id="compare-nf4")
        int8 = gr.Checkbox(label="INT8 (bitsandbytes)", value=False, elem_id="compare-int8")
        text = gr.Textbox(label="Evaluation text file (empty: the bundled public-domain text)", elem_id="compare-text")
    prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", elem_id="compare-prompt")
    remotes = gr.Textbox(
        label="Remote engines",
        placeholder="gpu-box:qwen3-32b\nhttp://10.0.0.7:8000/v1#llama-3.3-70b",
        info="One per line: a saved endpoint's NAME[:MODEL] or an engine's URL[#MODEL]. Each answers after the "
        "local variants, timed the same way (no quality figures).",
        lines=2,
        elem_id="compare-remotes",
    )
    with gr.Row():
        run_arena = gr.Button("Arena: answer side by side", variant="primary", elem_id="compare-arena-btn")
        run_quality = gr.Button("Quality run", elem_id="compare-quality-btn")
    status = gr.Markdown("", elem_id="compare-status")
    columns = gr.HTML("", elem_id="compare-arena")
    table = gr.Dataframe(_frame([]), interactive=False, wrap=True, elem_id="compare-table")
    with gr.Row():
        qchart = gr.Image(label="Quality vs size", type="pil", elem_id="compare-quality-chart")
        schart = gr.Image(label="Speed vs size", type="pil", elem_id="compare-speed-chart")
    picked = gr.Markdown("", elem_id="compare-picked")

    run_arena.click(arena, [model, levels, nf4, int8, prompt, remotes], [columns, status], api_name="compare_arena")
    run_quality.click(
        quality_run,
        [model, levels, nf4, int8, prompt, text, remotes],
        [table, status, qchart, schart],
        api_name="compare_run",
    )
    _wire_pick(ctx, table, picked)


def _wire_pick(ctx: Any, table: Any, picked: Any) -> None:
    """Clicking a row of the table loads that variant in the Chat tab, and switches to it."""
    import gradio as gr

    shared = ctx.components
    if not all(k in shared for k in ("model_picker", "load_controls", "load_status", "load_button", "tabs")):
        return
    controls = shared["load_controls"]
    outputs = [shared["model_picker"], controls["backend"], controls["quant"], shared["load_status"]]
    outputs += [shared["load_button"], picked, shared["tabs"]]

    def on_select(frame: Any, evt: gr.SelectData, request: gr.Request, **values: Any) -> Iterator[tuple]:
        row = frame.iloc[evt.index[0]]
        owner = getattr(request, "session_hash", None) or ""
        yield from load_variant(ctx, str(row["variant"]), str(row["path"]), str(row["answer"]), values, owner=owner)

    table.select(on_select, [table], outputs, inputs_kwargs=controls, api_visibility="private", concurrency_limit=None)


def variant_load(label: str, path: str) -> tuple[str, dict[str, str]]:
    """(model spec, load options to set) that load one row's variant: a saved NF4/INT8 directory loads on
    transformers with its quantization; a GGUF with the backend picked by the file."""
    quant = label.lower() if label in ("NF4", "INT8") else "none"
    return path, {"backend": "auto", "quant": quant}


def load_variant(ctx: Any, label: str, path: str, answer: str, values: dict[str, Any], *, owner: str) -> Iterator:
    """(picker, backend, quant, load status, load button, note, tabs): pick the variant, switch to the Chat tab
    and load it there, the load's progress streaming into the Chat tab's status."""
    import gradio as gr

    from ui.tabs import chat

    skip = gr.skip()
    if not path or answer.startswith("⚠️"):
        yield skip, skip, skip, skip, skip, f"⚠️ {label} has no result to load.", skip
        return
    spec, options = variant_load(label, path)
    note = f"Loading **{html.escape(label)}** in the Chat tab ({html.escape(path)})."
    picker, tabs = gr.Dropdown(value=spec), gr.Tabs(selected=chat.KEY)
    yield picker, options["backend"], options["quant"], f"⏳ Loading {html.escape(label)}…", skip, note, tabs
    for status, button in chat.load_model(ctx, spec, values | options, owner=owner):
        yield skip, skip, skip, status, button, skip, skip
