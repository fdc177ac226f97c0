"""The `localrun` command group. Commands live in their own modules and register here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from localrun import __version__
from localrun.errors import UserError

# Engine commands; other packages (the web UI) plug in through the "localrun.commands" entry points.
_COMMAND_MODULES = (
    "localrun.cli_chat",
    "localrun.cli_bench",
    "localrun.cli_models",
    "localrun.cli_quantize",
    "localrun.cli_compare",
    "localrun.cli_serve",
)


def _plugins() -> list:
    from importlib.metadata import entry_points

    return list(entry_points(group="localrun.commands"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localrun",
        description="Run LLMs locally and see exactly how fast they run and how much memory they take.",
    )
    parser.add_argument("--version", action="version", version=f"localrun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    for plugin in _plugins():
        try:
            plugin.load()(sub)
        except ModuleNotFoundError:  # e.g. the UI package not installed in this environment
            continue
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user mistakes print one sentence and exit 2, never a traceback."""
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
