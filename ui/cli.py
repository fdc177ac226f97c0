"""`localrun ui`: serve the web UI. Registered through the "localrun.commands" entry point; importing
this module must stay cheap (no gradio) so `localrun --help` is instant."""

from __future__ import annotations

import argparse
import sys

from localrun.cli.serve import add_server_flags, limits_from, pool_from
from localrun.errors import UserError
from localrun.netpolicy import credential_text, is_loopback, port_free, require_auth

DEFAULT_PORT = 7860
AUTH_ENV = "LOCALRUN_AUTH"
_PORT_TRIES = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `localrun ui` to the command group (no gradio import here)."""
    p = subparsers.add_parser(
        "ui",
        help="serve the web UI (chat with live metrics, models, system)",
        description="Serve the localrun web UI. It listens on 127.0.0.1 only; another --host, or --share, needs a "
        "login (--auth-file FILE or $LOCALRUN_AUTH, as USER:PASSWORD).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT}, or the next free one)")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    p.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        default=None,
        help="require this login (visible in `ps`: prefer --auth-file or $LOCALRUN_AUTH)",
    )
    p.add_argument(
        "--auth-file",
        metavar="FILE",
        default=None,
        help="require a login: one USER:PASSWORD per line (each user sees only their own saved chats)",
    )
    p.add_argument("--model", default=None, help="model to preselect in the Chat tab (default: the default model)")
    p.add_argument("--open", action="store_true", help="open the UI in a browser")
    p.add_argument("--api", action="store_true", help="also serve the OpenAI API (/v1/...) on the same port and model")
    add_server_flags(p)
    p.set_defaults(func=run)


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """'user:password' -> ('user', 'password')."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("The login (--auth, --auth-file or $LOCALRUN_AUTH) takes USER:PASSWORD, e.g. alice:s3cret.")
    return user, password


def login(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The logins from --auth-file (one per line), --auth or $LOCALRUN_AUTH, or None."""
    text = credential_text(
        inline=args.auth, file=args.auth_file, env_var=AUTH_ENV, inline_flag="--auth", file_flag="--auth-file"
    )
    if text is None:
        return None
    if args.auth_file is None:
        return [parse_auth(text)]
    from pathlib import Path

    lines = [line.strip() for line in Path(args.auth_file).expanduser().read_text(encoding="utf-8").splitlines()]
    logins = [parse_auth(line) for line in lines if line]
    users = [user for user, _ in logins]
    if len(set(users)) != len(users):
        raise UserError(f"--auth-file {args.auth_file} names a user twice: give each user one line.")
    return logins


def pick_port(host: str, port: int | None) -> int:
    """The asked-for port if it is free (else a UserError), or the first free one from 7860 up."""
    if port is not None:
        if not 1 <= port <= 65535:
            raise UserError(f"--port {port} is not a port number: use 1-65535.")
        if not port_free(host, port):
            raise UserError(f"Port {port} on {host} is in use: pick another with --port, or leave it out.")
        return port
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + _PORT_TRIES):
        if port_free(host, candidate):
            return candidate
    raise UserError(f"No free port between {DEFAULT_PORT} and {DEFAULT_PORT + _PORT_TRIES - 1}: pass one with --port.")


def run(args: argparse.Namespace) -> int:
    """Serve the UI until Ctrl-C; user mistakes in the flags raise UserError before anything starts."""
    auth = login(args)
    # with --api both logins are needed (Gradio's does not cover the API routes): say so at once
    require_auth(
        args.host,
        share=args.share,
        credentials=auth,
        flag="--auth-file, and --api-key-file for the API," if args.api else "--auth-file",
    )
    port = pick_port(args.host, args.port)
    api_key = _api_key(args)
    from ui.app import AppContext, launch

    print(f"localrun UI on http://{args.host}:{port}", file=sys.stderr)
    loopback = is_loopback(args.host) and not args.share
    ctx = AppContext(worker=pool_from(args), default_model=args.model, loopback=loopback)
    mount = None
    if args.api:
        print(f"localrun: OpenAI API on http://{args.host}:{port}/v1", file=sys.stderr)

        def mount(app):  # the API's routes in front of Gradio's, on the UI's own worker
            from localrun.server.app import create_app
            from localrun.server.engine import WorkerEngine

            limits = limits_from(args)
            from localrun.settings import LoadOptions

            engine = WorkerEngine(ctx.worker, options=LoadOptions(parallel=0), max_queue=args.max_queue)  # as the UI's
            create_app(engine, api_key=api_key, app=app, limits=limits)

    launch(ctx, host=args.host, port=port, share=args.share, auth=auth, open_browser=args.open, mount=mount)
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    """With --api: the key, and the refusal to expose the API without one (Gradio's --auth does not cover it)."""
    if not args.api:
        if args.api_key or args.api_key_file:
            raise UserError("--api-key and --api-key-file need --api.")
        return None
    from localrun.server.access import api_key, check_exposure

    key = api_key(key=args.api_key, key_file=args.api_key_file)
    check_exposure(args.host, key, share=args.share)
    return key
