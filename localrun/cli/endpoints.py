"""`localrun endpoints`: the remote engines saved by name, so `NAME:MODEL` names a model one of them serves."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "endpoints",
        help="remote engines saved by name: add, list, rm (then `localrun chat NAME:MODEL`)",
        description="Remote engines (vLLM, TGI, llama-server, Ollama, another localrun) saved by name in "
        "endpoints.json in localrun's data directory. `NAME:MODEL` then names that engine's model wherever a "
        "model is named: chat, serve, bench, compare and the web UI. Only the key file's path is saved.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    add = verbs.add_parser("add", help="save an engine by name (replaces one of the same name)")
    add.add_argument("name", help="e.g. gpu-box")
    add.add_argument("url", help="its OpenAI API address, e.g. http://gpu-box:8000/v1")
    add.add_argument("--api-key-file", default=None, help="a file holding its API key (the key is never saved)")
    ls = verbs.add_parser("list", help="the saved engines; --check asks each which models it serves")
    ls.add_argument("--check", action="store_true", help="load each engine's model list (engine, round trip)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    rm = verbs.add_parser("rm", help="forget a saved engine")
    rm.add_argument("name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from localrun.models import endpoints

    if args.verb == "add":
        endpoint = endpoints.add_endpoint(args.name, args.url, args.api_key_file)
        print(f"Saved {endpoint.name} → {endpoint.url}: use it as `localrun chat {endpoint.name}:MODEL`.")
        return 0
    if args.verb == "rm":
        endpoints.remove_endpoint(args.name)
        print(f"Removed {args.name}.")
        return 0
    saved = endpoints.load_endpoints()
    rows = [
        {"name": e.name, "url": e.url, "api_key_file": e.api_key_file} | (_check(e) if args.check else {})
        for e in saved.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No saved endpoints: add one with `localrun endpoints add NAME URL`.", file=sys.stderr)
        return 0
    for row in rows:
        line = f"{row['name']:<16} {row['url']}" + ("  (key file)" if row["api_key_file"] else "")
        if args.check:
            line += "  " + (
                row["error"] or f"{row['engine']}, {row['round_trip_ms']:.1f} ms: {', '.join(row['models'])}"
            )
        print(line)
    return 0


def _check(endpoint) -> dict:
    """The engine, round trip and models one saved endpoint answers with, or its one-sentence error."""
    from localrun.backends.base import ResolvedModel
    from localrun.backends.remote import RemoteBackend
    from localrun.errors import UserError

    try:
        backend = RemoteBackend(ResolvedModel("", None, "remote", url=endpoint.url, api_key_file=endpoint.api_key_file))
    except UserError as exc:
        return {"error": str(exc), "engine": None, "round_trip_ms": None, "models": []}
    try:
        return {"error": None, "engine": backend.engine, "round_trip_ms": backend.rtt_s * 1e3, "models": backend.served}
    finally:
        backend.close()
