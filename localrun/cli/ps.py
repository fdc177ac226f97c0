"""`localrun ps`: the models a running `localrun serve` (or `localrun ui --api`) holds, as `ollama ps` shows them.

It asks the server's GET /v1/models over loopback and prints the loaded rows: memory (the model process's RSS)
beside what the budget planned for it, slots busy, device, context, and how long until an idle unload.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from localrun.errors import UserError

DEFAULT_URLS = ("http://127.0.0.1:8000", "http://127.0.0.1:7860")  # serve's and the UI's default ports


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ps",
        help="list the models a running `localrun serve` or `ui --api` has loaded",
        description="The loaded models of a running server: memory, slots, device, keep-alive left.",
    )
    p.add_argument("--url", default=None, help="the server (default: 127.0.0.1:8000, then :7860)")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="the server's key (or $LOCALRUN_API_KEY)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def fetch(url: str | None, key: str | None) -> tuple[str, dict[str, Any]]:
    """The server's /v1/models listing: (its base URL, the JSON)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    tried = [url.rstrip("/").removesuffix("/v1")] if url else list(DEFAULT_URLS)
    for base in tried:
        try:
            reply = httpx.get(f"{base}/v1/models", headers=headers, timeout=5)
        except httpx.HTTPError:
            continue
        if reply.status_code == 401:
            raise UserError(f"{base} wants an API key: pass --api-key-file, or set $LOCALRUN_API_KEY.")
        if reply.status_code != 200:
            raise UserError(f"{base}/v1/models answered HTTP {reply.status_code}: is it a localrun server?")
        try:
            return base, reply.json()
        except ValueError:
            raise UserError(f"{base}/v1/models did not answer JSON: is it a localrun server?") from None
    where = " or ".join(tried)
    raise UserError(f"Nothing answers on {where}: start `localrun serve` (or `localrun ui --api`), or pass --url.")


def table(listing: dict[str, Any]) -> list[str]:
    from localrun.format import LOADED_MODEL_HEADERS, fmt_bytes, loaded_model_cells

    rows = [r for r in listing.get("data", []) if r.get("loaded")]
    body = [loaded_model_cells(r, r["id"]) for r in rows]
    widths = [max(len(x[i]) for x in (LOADED_MODEL_HEADERS, *body)) for i in range(len(LOADED_MODEL_HEADERS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (LOADED_MODEL_HEADERS, *body)
    ]
    memory = listing.get("memory") or {}
    if memory:
        lines.append(
            f"{len(rows)} model(s) planned at {fmt_bytes(memory.get('planned_bytes'))} "
            f"of a {fmt_bytes(memory.get('budget_bytes'))} memory budget"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from localrun.server.access import api_key

    base, listing = fetch(args.url, api_key(key=None, key_file=args.api_key_file))
    if args.json:
        print(json.dumps([r for r in listing.get("data", []) if r.get("loaded")], indent=2))
        return 0
    if not any(r.get("loaded") for r in listing.get("data", [])):
        print(f"No model is loaded on {base}: the next request loads one.", file=sys.stderr)
        return 0
    print("\n".join(table(listing)))
    return 0
