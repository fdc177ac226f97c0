"""`localrun chat`: a streaming REPL, or one answer when given -p or a pipe."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from localrun.catalog import ResolvedModel
from localrun.errors import UserError
from localrun.events import GenerationEvent
from localrun.records import fields
from localrun.settings import LoadOptions, SamplingParams, add_flags, from_args

HELP = """Commands:
  /help                 this help
  /bye                  exit (Ctrl-D works too)
  /clear                forget the conversation
  /system TEXT          set the system prompt (and clear the conversation)
  /set NAME VALUE       change a sampling setting: {settable}
  /stats                the last reply's full figures
  /regen                answer the last message again
  /load MODEL           load another model (.gguf path, directory or catalog name)
  \"\"\"                   begin or end a multi-line message
Ctrl-C stops a reply and keeps the session."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model. With -p, or input on a pipe, print one answer and exit.",
    )
    p.add_argument(
        "model", nargs="?", help="a .gguf file, a model directory, or a catalog name (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("-p", "--prompt", help="answer this prompt and exit (the reply alone on stdout, stats on stderr)")
    p.add_argument("-s", "--system", help="system prompt")
    p.add_argument("--no-stats", action="store_true", help="do not print the stats line")
    add_flags(p, SamplingParams)
    add_flags(p, LoadOptions)
    p.set_defaults(func=run)


def load(model: ResolvedModel, options: LoadOptions):
    from localrun.backends import load_backend

    return load_backend(model, options)


def system_prompt(args: argparse.Namespace, model: ResolvedModel) -> str | None:
    """--system if given (even empty), else the catalog's recommendation for this model."""
    if args.system is not None:
        return args.system
    return model.recommended.system if model.recommended else None


def read_stdin() -> str:
    """Standard input as UTF-8 text (a BOM is dropped); other bytes are a UserError, never a guess."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"Standard input is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}): "
            "convert it first, e.g. with `iconv -t UTF-8`."
        ) from None


def run(args: argparse.Namespace) -> int:
    from localrun.catalog import resolve_model

    model = resolve_model(args.model)
    recommended = model.recommended.sampling() if model.recommended else {}
    params = from_args(SamplingParams, args, **recommended)
    options = from_args(LoadOptions, args)
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    if one_shot:
        prompt = args.prompt if args.prompt is not None else read_stdin()
        if not prompt.strip():
            raise UserError("The prompt is empty: pass some text with -p, or on standard input.")
        return _one_shot(args, model, prompt, params, options)
    return Repl(args, model, params, options).loop()


def _one_shot(
    args: argparse.Namespace, model: ResolvedModel, prompt: str, params: SamplingParams, options: LoadOptions
) -> int:
    from localrun.chat import ChatSession, complete, has_chat_template
    from localrun.format import stats_line

    backend = load(model, options)
    try:
        session = ChatSession(backend, system=system_prompt(args, model))
        summary = None
        with _ctrl_c_cancels() as cancel:
            # a model without a chat template (a base model) continues the text itself, with no roles
            if has_chat_template(backend):
                events = session.send(prompt, params, cancel=cancel)
            else:
                events = complete(backend, prompt, params, cancel=cancel)
            for event in events:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                summary = event.summary or summary
        sys.stdout.write("\n")
        sys.stdout.flush()
        if summary and summary.error:
            print(f"localrun: generation failed: {summary.error}", file=sys.stderr)
            return 1
        if summary and not args.no_stats:
            print(stats_line(summary), file=sys.stderr)
        return 0
    finally:
        backend.close()


class _ctrl_c_cancels:
    """While a reply streams, Ctrl-C sets a cancel flag (checked between tokens) instead of
    raising inside llama.cpp or torch; a second Ctrl-C interrupts for real."""

    def __enter__(self) -> threading.Event:
        self.cancel = threading.Event()
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self.cancel

    def _handle(self, signum, frame) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt
        self.cancel.set()
        print("\n[stopping: a long prompt finishes processing first; Ctrl-C again to interrupt it]", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Repl:
    """The interactive loop: read a message or a /command, stream the reply, print stats."""

    def __init__(
        self, args: argparse.Namespace, model: ResolvedModel, params: SamplingParams, options: LoadOptions
    ) -> None:
        from localrun.chat import ChatSession

        self.args, self.params, self.options = args, params, options
        self.backend = self._load(model)
        self.session = ChatSession(self.backend, system=system_prompt(args, model))

    def _load(self, model: ResolvedModel):
        print(f"Loading {model.name} ({model.path})…", file=sys.stderr, flush=True)
        backend = load(model, self.options)
        print(f"Ready: {backend.report.describe()}. Type /help for commands.", file=sys.stderr, flush=True)
        return backend

    def loop(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            while True:
                try:
                    line = self._read()
                except KeyboardInterrupt:
                    print("\n(Ctrl-D or /bye to exit)", file=sys.stderr)
                    continue
                except EOFError:
                    print(file=sys.stderr)
                    return 0
                if line is None:
                    continue
                try:
                    if line.startswith("/"):
                        if self._command(line) == "bye":
                            return 0
                    else:
                        self._stream(lambda cancel, text=line: self.session.send(text, self.params, cancel=cancel))
                except UserError as exc:
                    print(f"localrun: {exc}", file=sys.stderr)
                except KeyboardInterrupt:  # Ctrl-C before the reply's own handler was in place
                    print("\n[stopped]", file=sys.stderr)
                except Exception as exc:  # keep the session: /load keeps the old model when a new one fails
                    print(f"localrun: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            self.backend.close()

    def _read(self) -> str | None:
        line = input(">>> ")
        if line.strip().startswith('"""'):
            parts = [line.strip()[3:]]
            while not parts[-1].rstrip().endswith('"""'):
                parts.append(input("... "))
            parts[-1] = parts[-1].rstrip()[:-3]
            return "\n".join(parts).strip("\n") or None
        return line.strip() or None

    def _stream(self, reply: Callable[[threading.Event], Iterator[GenerationEvent]]) -> None:
        from localrun.format import stats_line

        with _ctrl_c_cancels() as cancel:
            for event in reply(cancel):
                sys.stdout.write(event.text)
                sys.stdout.flush()
        summary = self.session.last
        sys.stdout.write("\n")
        if summary is not None:
            if summary.finish_reason == "cancelled":
                print("[stopped]", file=sys.stderr)
            if summary.error:
                print(f"localrun: generation failed: {summary.error}", file=sys.stderr)
            if not self.args.no_stats:
                print(stats_line(summary), file=sys.stderr, flush=True)

    def _command(self, line: str) -> str | None:
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return "bye"
        if name in ("/help", "/?"):
            print(HELP.format(settable=", ".join(fields(type(self.params)))))
        elif name == "/clear":
            self.session.clear()
            print("Conversation cleared.", file=sys.stderr)
        elif name == "/system":
            self.session.system = rest or None
            self.session.clear()
            print("System prompt set; conversation cleared." if rest else "System prompt removed.", file=sys.stderr)
        elif name == "/set":
            self._set(rest)
        elif name == "/stats":
            self._stats()
        elif name == "/regen":
            self._stream(lambda cancel: self.session.regenerate(self.params, cancel=cancel))
        elif name == "/load":
            self._reload(rest)
        else:
            raise UserError(f"Unknown command {name}: type /help for the list.")
        return None

    def _set(self, rest: str) -> None:
        from localrun.settings import set_value

        key, _, value = rest.partition(" ")
        self.params = set_value(self.params, key, value)
        print(f"{key} = {getattr(self.params, key)}", file=sys.stderr)

    def _stats(self) -> None:
        from localrun.format import summary_table

        print(f"model: {self.backend.report.describe()}")
        if self.session.last is None:
            print("No reply yet.")
            return
        for label, value in summary_table(self.session.last):
            print(f"  {label:<24} {value}")

    def _reload(self, spec: str) -> None:
        from localrun.catalog import resolve_model

        if not spec:
            raise UserError("Usage: /load MODEL (a .gguf path, a model directory or a catalog name).")
        model = resolve_model(spec)
        backend = self._load(model)  # load first: a failed load keeps the current model
        self.backend.close()
        self.backend = backend
        self.session.backend = backend
        self.session.system = system_prompt(self.args, model)
        self.session.clear()
