"""`localrun serve`: the OpenAI-compatible API, on every model a request names (one process each, see engine/pool.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from localrun.errors import UserError
from localrun.limits import Limits
from localrun.settings import LoadOptions, add_flags, from_args

DEFAULT_PORT = 8000


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """--api-key, --api-key-file, --max-queue and the request limits (shared with `localrun ui --api`)."""
    p.add_argument("--api-key", default=None, help="require this key (visible in `ps`: prefer --api-key-file)")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the key from the first line of FILE")
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait for the model before 429 (16)")
    group = p.add_argument_group("request limits", "what one request may ask; a request over one gets a 4xx naming it")
    add_flags(group, Limits, show_default=True)
    pool = p.add_argument_group("models", "several models loaded at once, each in a process of its own")
    pool.add_argument(
        "--keep-alive",
        default="15m",
        metavar="DURATION",
        help="unload a model idle this long (30s, 5m, 1h; 0: after each request; -1: never); default 15m",
    )
    pool.add_argument(
        "--pin", action="append", default=[], metavar="MODEL", help="never unload MODEL (a name or path; repeatable)"
    )
    pool.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="memory every loaded model counts against (8G, 512M; default: 80%% of free RAM and VRAM)",
    )


def pool_from(args: argparse.Namespace) -> Any:
    """The ModelPool the --keep-alive, --pin and --memory-budget flags ask for (user mistakes: UserError)."""
    from localrun.engine.pool import ModelPool, PoolPolicy, keep_alive_seconds, parse_size

    budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget else None
    try:
        keep_alive = keep_alive_seconds(args.keep_alive)
    except UserError as exc:
        raise UserError(f"--keep-alive: {exc}") from None
    return ModelPool(PoolPolicy(keep_alive_s=keep_alive, pinned=tuple(args.pin), budget_bytes=budget))


def limits_from(args: argparse.Namespace) -> Limits:
    """The request limits the flags set (the defaults for the rest)."""
    return from_args(Limits, args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /metrics)",
        description="Serve the OpenAI API on 127.0.0.1. Another host needs an API key (flag, file or $LOCALRUN_API_KEY).",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="the model loaded at start: a .gguf file, a model directory, or a catalog name (default: SmolLM2)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    add_server_flags(p)
    add_flags(p, LoadOptions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from localrun.netpolicy import port_free
    from localrun.server.access import api_key, check_exposure

    key = api_key(key=args.api_key, key_file=args.api_key_file)
    check_exposure(args.host, key)
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number: use 1-65535.")
    if args.max_queue < 1:
        raise UserError("--max-queue must be at least 1.")
    options = from_args(LoadOptions, args)
    if options.parallel is None:  # several clients at once: slots as the memory allows
        options = options.replace(parallel=0)
    limits = limits_from(args)
    pool = pool_from(args)  # its flags are checked before anything starts
    if not port_free(args.host, args.port):  # one sentence, not uvicorn's log line and exit
        raise UserError(f"Port {args.port} on {args.host} is in use: pick another with --port.")
    import uvicorn

    from localrun.server.app import create_app
    from localrun.server.engine import WorkerEngine

    engine = WorkerEngine(pool, options=options, max_queue=args.max_queue)
    try:
        loaded = engine.load(args.model)
    except BaseException:
        engine.close()
        raise
    print(f"localrun: {loaded.name} loaded ({loaded.report.describe()})", file=sys.stderr)
    print(f"localrun: {engine.worker.describe()}", file=sys.stderr)
    if loaded.report.context_reason:
        print(f"localrun: {loaded.report.context_reason}", file=sys.stderr)
    if loaded.report.parallel_why:
        print(f"localrun: {loaded.report.parallel} slot(s): {loaded.report.parallel_why}", file=sys.stderr)
    config = uvicorn.Config(
        create_app(engine, api_key=key, limits=limits),
        host=args.host,
        port=args.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    try:
        print(f"localrun: OpenAI API on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        server.run()
    finally:
        engine.close()
    return 0
