"""The Quantize tab: pick a source (a GGUF or HF folder from the store, or any local path for a browser on
this machine), tick target types, watch progress; outputs go into the store, and a table shows each
output's size, bits per weight and what every tensor became. Consumes localrun.quantize.run_quantize.
"""

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from localrun.errors import UserError
from localrun.models import catalog
from ui import store

TITLE = "Quantize"
KEY = "quantize"
HEADERS = ["target", "MiB", "bits/weight", "tensor types", "fallbacks", "path"]


def _frame(rows: list[list[Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=HEADERS)


def target_choices() -> list[str]:
    from localrun.quantize import BNB_TYPES, FLOAT_TYPES
    from localrun.quantize.gguf_quant import quant_types

    return [*FLOAT_TYPES, *[t for t in quant_types() if t not in FLOAT_TYPES], *BNB_TYPES]


def _from_loopback(client_host: str | None) -> bool:
    try:
        return client_host is not None and ipaddress.ip_address(client_host).is_loopback
    except ValueError:
        return client_host == "localhost"


def check_source(source: str, *, loopback: bool) -> str:
    """The source as run_quantize takes it; a path outside the store only for a browser on this machine."""
    source = (source or "").strip()
    if not source or source == catalog.DEFAULT_MODEL_NAME:
        return "default"
    known = {value for _, value in store.model_choices()}
    if source not in known and not loopback:
        raise UserError("Only models in the store can be quantized from another machine: pick one from the list.")
    return source


def output_dir(source: str) -> Path:
    """<store>/local/<stem>/, the same folder `localrun compare` caches its variants in."""
    from localrun.evaluate.compare import cache_dir_for
    from localrun.models.catalog import resolve_model
    from localrun.quantize import output_stem

    resolved = resolve_model(None if source == "default" else source)
    if resolved.path is None:
        raise UserError(f"{source} is not on disk: download it in the Models tab first.")
    return cache_dir_for(output_stem(resolved.path))


def result_row(result: Any) -> list[Any]:
    types = ", ".join(f"{name} ×{count}" for name, count in result.tensor_types.items())
    return [
        result.target,
        round(result.size_bytes / 2**20, 1),
        round(result.bits_per_weight, 2),
        types,
        "; ".join(result.fallbacks[:3]) + (" …" if len(result.fallbacks) > 3 else ""),
        str(result.path),
    ]


def quantize(source: str, targets: list[str], client_host: str | None) -> Iterator[tuple[str, Any]]:
    """(progress line, results table) while the outputs are written."""
    import gradio as gr

    from localrun.quantize import run_quantize

    rows: list[list[Any]] = []
    try:
        src = check_source(source, loopback=_from_loopback(client_host))
        if not targets:
            raise UserError("Tick at least one target type.")
        out = output_dir(src)
        yield f"Writing into {out}", gr.skip()
        for ev in run_quantize(src, targets, out_dir=out):
            if ev.stage == "done" and ev.result is not None:
                rows.append(result_row(ev.result))
                yield f"✅ {ev.message}", _frame(rows)
            else:
                prefix = "⚠️ " if ev.stage == "warning" else ""
                yield f"{prefix}[{ev.target} {ev.stage} {ev.fraction:.0%}] {ev.message}", gr.skip()
    except UserError as exc:
        yield f"⚠️ {exc}", gr.skip()
        return
    yield f"Done: {len(rows)} outputs in the store.", _frame(rows)


def build(ctx: Any) -> None:
    """Lay out the tab and wire its events."""
    import gradio as gr

    with gr.Row():
        source = gr.Dropdown(
            choices=store.model_choices(),
            value=catalog.DEFAULT_MODEL_NAME,
            allow_custom_value=True,
            label="Source",
            info="A GGUF or Hugging Face folder from the store; any local path from a browser on this machine.",
            elem_id="quantize-source",
            scale=3,
        )
        run = gr.Button("Quantize", variant="primary", elem_id="quantize-btn", scale=1)
    targets = gr.CheckboxGroup(target_choices(), value=["Q4_K_M"], label="Target types", elem_id="quantize-targets")
    status = gr.Markdown("", elem_id="quantize-status")
    table = gr.Dataframe(_frame([]), interactive=False, wrap=True, elem_id="quantize-table")

    def on_run(source: str, targets: list[str], request: gr.Request) -> Iterator[tuple[str, Any]]:
        yield from quantize(source, targets, getattr(request.client, "host", None))

    run.click(on_run, [source, targets], [status, table], api_name="quantize")
