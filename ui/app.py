"""The Gradio app: one tab per module in TABS; adding a tab means adding a module and a line here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localrun.engine.pool import ModelPool

# Each module exposes TITLE, KEY (used in elem_ids: tab-KEY, tab-KEY-button) and build(ctx).
TABS = ("ui.tabs.chat", "ui.tabs.quantize", "ui.tabs.compare", "ui.tabs.models", "ui.tabs.system")


@dataclass
class AppContext:
    """What tabs share: the model worker, the model to preselect, the Blocks being built (for load
    events), and components other tabs may use."""

    worker: ModelPool  # every loaded model, each in a process of its own
    default_model: str | None = None
    demo: Any = None
    components: dict[str, Any] = field(default_factory=dict)
    loopback: bool = False  # served on loopback only: Load and Info may open any path, not just listed models


def build_app(ctx: AppContext) -> Any:
    """The gr.Blocks app with every tab in TABS."""
    import gradio as gr

    with gr.Blocks(title="localrun", analytics_enabled=False) as demo:
        ctx.demo = demo
        gr.Markdown("## localrun · run LLMs locally and see how fast they run and how much memory they take")
        modules = [importlib.import_module(name) for name in TABS]
        for module in modules:  # a sidebar belongs to the page, not to a tab: mounted once, it never covers the tabs
            if hasattr(module, "sidebar"):
                module.sidebar(ctx)
        with gr.Tabs(elem_id="tabs") as tabs:
            ctx.components["tabs"] = tabs  # a tab may switch to another (Compare -> Chat)
            for module in modules:
                with gr.Tab(module.TITLE, id=module.KEY, elem_id=f"tab-{module.KEY}") as tab:
                    ctx.components[f"tab_{module.KEY}"] = tab
                    module.build(ctx)
    return demo


def launch(
    ctx: AppContext,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    auth: list[tuple[str, str]] | None = None,
    open_browser: bool = False,
    mount: Callable[[Any], None] | None = None,
) -> None:
    """Build the app and serve it until interrupted; the worker process stops with it.

    mount(app) adds routes to the running FastAPI app (`localrun ui --api`)."""
    from starlette.middleware import Middleware

    from ui.metrics import CSS
    from ui.pagefix import HeadScript

    demo = build_app(ctx)
    # Several tabs may wait on the one worker at once; the worker queues them itself.
    demo.queue(default_concurrency_limit=8)
    calm_queue(demo)
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=share,
            auth=auth,
            inbrowser=open_browser,
            show_error=True,
            css=CSS,
            footer_links=["api", "settings"],
            run_history=False,  # never record prompts in the browser
            ssr_mode=False,
            prevent_thread_lock=True,
            app_kwargs={"middleware": [Middleware(HeadScript)]},
        )
        if mount is not None:
            mount(demo.server_app)
        demo.block_thread()
    finally:
        ctx.worker.close()


# Gradio's queue checks for new jobs every 1 ms and for progress every 10 ms when it has none (off Windows): ~5 %
# of a core on an idle page (bench/ui.py's idle rate), taken from the cores the model runs on. 20 ms and 100 ms
# are still well under what a person notices.
_QUEUE_IDLE_S, _PROGRESS_IDLE_S = 0.02, 0.1


def calm_queue(demo: Any) -> None:
    """Slow the idle polling of Gradio's queue (private attributes: left alone if a Gradio lacks them)."""
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, _QUEUE_IDLE_S)
    if queue is not None and hasattr(queue, "progress_update_sleep_when_free"):
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, _PROGRESS_IDLE_S)
