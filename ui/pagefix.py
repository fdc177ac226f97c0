"""A script at the top of the page's <head> that stops Gradio's idle animation-frame loop from costing CPU.

Gradio 6's status tracker runs a requestAnimationFrame timer loop while its status is "pending", and a tracker
removed while pending (the page loader's, from the start) never stops it: the page draws 60 frames a second for
as long as it is open, ~0.07 CPU-seconds per second in headless Chromium on the cores the model runs on
(measured with bench/ui.py's idle rates). The script lets that loop tick 4 times a second; every other
requestAnimationFrame caller is untouched. Gradio captures requestAnimationFrame when its modules load, before
the `head` option's scripts run, so the script goes into the HTML itself, ahead of Gradio's module.
"""

from __future__ import annotations

from typing import Any

SCRIPT = b"""<script>
(() => {
  const raf = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (cb) =>
    (new Error().stack || "").includes("statustracker") ? setTimeout(() => raf(cb), 250) : raf(cb);
})();
</script>"""


class HeadScript:
    """ASGI middleware: put SCRIPT first in the <head> of the app's HTML pages (GET, text/html, not compressed)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        body: list[bytes] = []

        async def patched(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                html = headers.get(b"content-type", b"").startswith(b"text/html")
                if html and b"content-encoding" not in headers:
                    start = message  # held back until the body is complete
                    return
            elif message["type"] == "http.response.body" and start is not None:
                body.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                page = b"".join(body).replace(b"<head>", b"<head>" + SCRIPT, 1)
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
                await send({"type": "http.response.body", "body": page})
                return
            await send(message)

        await self.app(scope, receive, patched)
