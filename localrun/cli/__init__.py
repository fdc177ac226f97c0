"""The `localrun` command group. Commands live in their own modules and register here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from localrun import __version__
from localrun.errors import UserError

# Engine commands and the module that registers each; other packages (the web UI) plug in through the
# "localrun.commands" entry points. A known command imports only its own module, and skips the entry-point
# scan: `localrun chat -p ...` starts as fast as a bare llama-cpp-python script (bench/cold_start.py).
COMMANDS = {
    "chat": "localrun.cli.chat",
    "bench": "localrun.cli.bench",
    "devices": "localrun.cli.bench",
    "models": "localrun.cli.models",
    "pull": "localrun.cli.models",
    "chats": "localrun.cli.chats",
    "quantize": "localrun.cli.quantize",
    "compare": "localrun.cli.compare",
    "serve": "localrun.cli.serve",
    "endpoints": "localrun.cli.endpoints",
    "ps": "localrun.cli.ps",
}


def _plugins() -> list:
    from importlib.metadata import entry_points

    return list(entry_points(group="localrun.commands"))


def _command_of(argv: Sequence[str]) -> str | None:
    """The command argv names (its first word that is not an option), if it is an engine command."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for argv's command alone when it is an engine command, else (or without argv) for all."""
    parser = argparse.ArgumentParser(
        prog="localrun",
        description="Run LLMs locally and see exactly how fast they run and how much memory they take.",
    )
    parser.add_argument("--version", action="version", version=f"localrun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    command = _command_of(argv) if argv is not None else None
    modules = [COMMANDS[command]] if command else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    for plugin in [] if command else _plugins():
        try:
            plugin.load()(sub)
        except ModuleNotFoundError:  # e.g. the UI package not installed in this environment
            continue
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user mistakes print one sentence and exit 2, never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"localrun: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `localrun chat -p ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
