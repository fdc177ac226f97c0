"""The System tab: devices, memory, what llama.cpp was built with, versions, and the model process."""

import platform
import sys
from importlib import metadata
from typing import Any

from localrun import __version__
from localrun.format import fmt_bytes

TITLE = "System"
KEY = "system"
HEADERS = ["section", "item", "value"]
_PACKAGES = ("gradio", "llama-cpp-python", "torch", "transformers", "bitsandbytes", "huggingface-hub", "pydantic")


def _version(package: str) -> str:
    try:
        return metadata.version(package)  # never imports the package: torch alone takes seconds
    except metadata.PackageNotFoundError:
        return "not installed"


def device_rows() -> list[list[str]]:
    """The CPU and each GPU: name, memory, cores or driver."""
    from localrun.hardware import probe

    rows = []
    for d in probe():
        label = f"{d.kind.upper()} {d.index}"
        rows.append(["devices", label, d.name])
        rows.append(["devices", f"{label} memory", f"{fmt_bytes(d.total_bytes)} total, {fmt_bytes(d.free_bytes)} free"])
        if d.physical_cores:
            rows.append(["devices", f"{label} cores", f"{d.physical_cores} physical, {d.logical_cores} logical"])
        if d.driver:
            rows.append(["devices", f"{label} driver", f"{d.driver} (compute capability {d.compute_capability})"])
    return rows


def memory_rows() -> list[list[str]]:
    """RAM and swap right now."""
    import psutil

    mem, swap = psutil.virtual_memory(), psutil.swap_memory()
    return [
        ["memory", "RAM total", fmt_bytes(mem.total)],
        ["memory", "RAM available", f"{fmt_bytes(mem.available)} ({100 - mem.percent:.0f}% free)"],
        ["memory", "swap", f"{fmt_bytes(swap.total)} total, {fmt_bytes(swap.used)} used"],
    ]


def llama_rows() -> list[list[str]]:
    """What the installed llama.cpp was built with."""
    from localrun.hardware import llama_cpp_build

    try:
        build = llama_cpp_build()
    except ImportError:
        return [["llama.cpp", "build", "llama-cpp-python is not installed"]]
    kinds = [k for k in ("cuda", "metal") if build.get(k)] or ["CPU only"]
    return [
        ["llama.cpp", "built with", ", ".join(k.upper() if k != "CPU only" else k for k in kinds)],
        ["llama.cpp", "GPU offload", "yes" if build.get("gpu_offload") else "no"],
        ["llama.cpp", "system info", str(build.get("system_info", "")).strip()],
    ]


def version_rows() -> list[list[str]]:
    """Versions of localrun, Python, the platform and the main libraries."""
    rows = [
        ["versions", "localrun", __version__],
        ["versions", "python", sys.version.split()[0]],
        ["versions", "platform", platform.platform()],
    ]
    return rows + [["versions", p, _version(p)] for p in _PACKAGES]


def worker_rows(ctx: Any) -> list[list[str]]:
    """The model process: pid, state, model, queue and crashes."""
    s = ctx.worker.status()
    rows = [
        ["model process", "pid", str(s["pid"] or "not running")],
        ["model process", "state", ("busy" if s["busy"] else "idle") if s["alive"] else "stopped"],
        ["model process", "model", s["load_report"] and f"{s['model']} · {s['load_report']}" or "none loaded"],
        ["model process", "slots busy", f"{s.get('running', 0)} of {s.get('slots', 1)}"],
        ["model process", "queued requests", str(s["queued"])],
        ["model process", "crashes", str(s["crashes"])],
    ]
    if s.get("engine_decode_steps"):  # several slots: the batching engine's figures
        mean = s["engine_decode_sequences"] / s["engine_decode_steps"]
        rows.append(
            ["model process", "batch", f"{s['engine_batch_size']} sequences in the last step, {mean:.2f} on average"]
        )
    if s["last_crash"]:
        rows.append(["model process", "last crash", s["last_crash"]])
    return rows


def loaded_models(ctx: Any) -> Any:
    """The loaded models, as `localrun ps` shows them: memory, planned, slots, device, keep-alive left."""
    import pandas as pd

    from localrun.format import LOADED_MODEL_HEADERS, loaded_model_cells

    rows = [loaded_model_cells(r, r["name"]) for r in ctx.worker.models()]
    return pd.DataFrame(rows, columns=[h.capitalize() for h in LOADED_MODEL_HEADERS])


def loaded_names(ctx: Any) -> list[str]:
    return [r["name"] for r in ctx.worker.models() if r.get("state") != "loading"]


def unload(ctx: Any, name: str | None) -> str:
    """The Unload button: one sentence on what happened."""
    from localrun.errors import UserError

    if not name:
        return "Pick a loaded model to unload."
    try:
        return ctx.worker.unload(name)
    except UserError as exc:
        return str(exc)


def system_table(ctx: Any) -> Any:
    """Every row of the System tab as one table."""
    import pandas as pd

    rows = device_rows() + memory_rows() + llama_rows() + version_rows() + worker_rows(ctx)
    return pd.DataFrame(rows, columns=HEADERS)


def build(ctx: Any) -> None:
    """Lay out the tab and wire its events."""
    import gradio as gr

    refresh = gr.Button("Refresh", elem_id="system-refresh")
    gr.Markdown(f"**Loaded models** · {ctx.worker.describe()}")
    models = gr.Dataframe(loaded_models(ctx), interactive=False, elem_id="loaded-models")
    with gr.Row():
        pick = gr.Dropdown(loaded_names(ctx), label="Loaded model", elem_id="unload-pick", allow_custom_value=False)
        unload_button = gr.Button("Unload", elem_id="unload-model")
    said = gr.Markdown(elem_id="unload-said")

    def models_view() -> tuple:
        names = loaded_names(ctx)
        return loaded_models(ctx), gr.Dropdown(choices=names, value=names[0] if names else None)

    unload_button.click(lambda name: unload(ctx, name), inputs=[pick], outputs=[said], api_name="unload_model").then(
        models_view, outputs=[models, pick], api_visibility="private"
    )
    refresh.click(models_view, outputs=[models, pick], api_visibility="private")
    table = gr.Dataframe(system_table(ctx), interactive=False, wrap=True, max_height=900, elem_id="system-table")
    status = gr.JSON(ctx.worker.status(), label="Model process (raw)", elem_id="worker-status")
    refresh.click(lambda: system_table(ctx), outputs=[table], api_name="system_info")
    refresh.click(ctx.worker.status, outputs=[status], api_name="worker_status")
    # Fresh figures for every page load and every visit to the tab.
    for trigger in (ctx.demo.load, ctx.components["tab_system"].select):
        trigger(lambda: (system_table(ctx), ctx.worker.status()), outputs=[table, status], api_visibility="private")
        trigger(models_view, outputs=[models, pick], api_visibility="private")
