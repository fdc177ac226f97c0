"""`localrun chat`: a streaming REPL, or one answer when given -p or a pipe."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from localrun.engine.events import GenerationEvent
from localrun.errors import UserError
from localrun.models.catalog import ResolvedModel
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
  /save [TITLE]         save this chat (it is saved after every reply anyway) and name it
  /chats                the saved chats, most recent first
  /open ID              continue a saved chat (an id, a unique prefix of one, or last)
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
    p.add_argument(
        "--hide-thinking",
        action="store_true",
        help="thinking models: do not print the thinking (dimmed before the answer on a terminal, on stderr on a pipe)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="ID",
        help="continue a saved chat: its id (or a unique prefix), or last (the default); on its model unless one is given",
    )
    p.add_argument("--save", action="store_true", help="with -p: save the exchange as a chat (see `localrun chats`)")
    p.add_argument("--no-save", action="store_true", help="do not save this chat (the REPL saves after every reply)")
    add_flags(p, SamplingParams)
    add_flags(p, LoadOptions)
    p.set_defaults(func=run)


def load(model: ResolvedModel, options: LoadOptions):
    from localrun.backends import load_backend

    return load_backend(model, options)


def _system(args: argparse.Namespace, model: ResolvedModel, resumed: _Resumed | None) -> str | None:
    """A resumed chat keeps its own system prompt unless --system is given."""
    if resumed is not None and args.system is None:
        return resumed.info.system
    return system_prompt(args, model)


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
    from localrun.backends import resolve_for

    resumed = _resumed(args)
    options = from_args(LoadOptions, args)
    model = resolve_for(args.model or (resumed.model_spec if resumed else None), options)
    recommended = model.recommended.sampling() if model.recommended else {}
    params = from_args(SamplingParams, args, **recommended)
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    if one_shot:
        prompt = args.prompt if args.prompt is not None else read_stdin()
        from localrun.engine.generate import check_prompt_text

        check_prompt_text(prompt, hint="pass some text with -p, or on standard input")
        return _one_shot(args, model, prompt, params, options, resumed)
    return Repl(args, model, params, options, resumed).loop()


class _Resumed:
    """A saved chat to continue: its store, id, messages, system prompt and the model of its last reply."""

    def __init__(self, store, chat_id: str) -> None:
        from localrun.replay import saved_spec

        self.store, self.chat_id = store, chat_id
        self.info = store.info(chat_id)
        self.messages = store.messages(chat_id)
        replies = [m for m in self.messages if m["role"] == "assistant" and (m.get("model") or m.get("model_path"))]
        self.model_spec = saved_spec(replies[-1]) if replies else None

    def history(self) -> list[dict[str, str]]:
        return [{"role": m["role"], "content": m["content"]} for m in self.messages if m["role"] != "system"]


def _resumed(args: argparse.Namespace) -> _Resumed | None:
    if args.resume is None:
        return None
    if args.no_save:
        raise UserError("--resume continues a saved chat and saves it: leave out --no-save.")
    from localrun.chats import ChatStore

    store = ChatStore()
    return _Resumed(store, store.resolve(args.resume))


def _recorder(args: argparse.Namespace, resumed: _Resumed | None, *, one_shot: bool):
    """Where this chat is saved: the REPL saves unless --no-save; a one-shot answer only with --save, or when
    it continues a saved chat (--resume)."""
    if args.no_save or (one_shot and not args.save and resumed is None):
        return None
    from localrun.chats import ChatRecorder, ChatStore

    if resumed is not None:
        return ChatRecorder(resumed.store, chat_id=resumed.chat_id)
    return ChatRecorder(ChatStore())


def turn_params(params: SamplingParams, recorder) -> SamplingParams:
    """A saved reply needs its seed to be replayed: an unset seed becomes a fresh explicit one."""
    if recorder is None or params.seed is not None:
        return params
    import random

    return params.replace(seed=random.randrange(2**31))


def record_turn(recorder, session, summary, *, model: ResolvedModel, backend, options: LoadOptions, params) -> None:
    """Save the conversation after a reply (nothing when no reply came back)."""
    if recorder is None or summary is None or not session.messages or session.messages[-1]["role"] != "assistant":
        return
    from localrun.chats import reply_message

    reply = reply_message(
        session.messages[-1]["content"],
        summary,
        model=model.name,
        report=backend.report,
        options=options,
        params=params,
    )
    recorder.record(session.messages, reply, system=session.system)


class ReplyPrinter:
    """Writes a reply as it streams: the answer on stdout; a thinking model's thinking dimmed before it on a
    terminal, on stderr when stdout is a pipe (so a pipe gets the answer alone), or nowhere (--hide-thinking)."""

    DIM, PLAIN = "\x1b[2m", "\x1b[0m"

    def __init__(self, *, hide_thinking: bool = False) -> None:
        self.hide = hide_thinking
        self.tty = sys.stdout.isatty()
        self.thinking = False

    def write(self, event: GenerationEvent) -> None:
        if event.reasoning and not self.hide:
            if self.tty:
                sys.stdout.write(self.DIM + ("" if self.thinking else "Thinking: ") + event.reasoning + self.PLAIN)
                sys.stdout.flush()
            else:
                sys.stderr.write(event.reasoning)
                sys.stderr.flush()
            self.thinking = True
        if event.text or event.is_final:
            self._end_thinking()
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()

    def _end_thinking(self) -> None:
        if self.thinking:
            (sys.stdout if self.tty else sys.stderr).write("\n\n" if self.tty else "\n")
            self.thinking = False


def _one_shot(
    args: argparse.Namespace,
    model: ResolvedModel,
    prompt: str,
    params: SamplingParams,
    options: LoadOptions,
    resumed: _Resumed | None = None,
) -> int:
    from localrun.engine.chat import ChatSession, complete, has_chat_template
    from localrun.format import stats_line

    recorder = _recorder(args, resumed, one_shot=True)
    params = turn_params(params, recorder)
    backend = load(model, options)
    try:
        session = ChatSession(backend, system=_system(args, model, resumed))
        if resumed is not None:
            session.messages = resumed.history()
        summary = None
        with _ctrl_c_cancels() as cancel:
            # a model without a chat template (a base model) continues the text itself, with no roles
            if has_chat_template(backend):
                events = session.send(prompt, params, cancel=cancel)
            else:
                events = complete(backend, prompt, params, cancel=cancel)
            printer = ReplyPrinter(hide_thinking=args.hide_thinking)
            for event in events:
                printer.write(event)
                summary = event.summary or summary
        sys.stdout.write("\n")
        sys.stdout.flush()
        record_turn(recorder, session, summary, model=model, backend=backend, options=options, params=params)
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
        self,
        args: argparse.Namespace,
        model: ResolvedModel,
        params: SamplingParams,
        options: LoadOptions,
        resumed: _Resumed | None = None,
    ) -> None:
        from localrun.engine.chat import ChatSession

        self.args, self.params, self.options, self.model = args, params, options, model
        self.recorder = _recorder(args, resumed, one_shot=False)
        self.backend = self._load(model)
        self.session = ChatSession(self.backend, system=_system(args, model, resumed))
        if resumed is not None:
            self._resume(resumed)

    def _resume(self, resumed: _Resumed) -> None:
        from localrun.chats import ChatRecorder

        self.session.messages = resumed.history()
        self.session.system = resumed.info.system if self.args.system is None else self.args.system
        self.session.last = None
        self.recorder = ChatRecorder(resumed.store, chat_id=resumed.chat_id)
        turns = sum(1 for m in self.session.messages if m["role"] == "user")
        print(f'Resumed chat {resumed.chat_id} "{resumed.info.title}": {turns} turn(s).', file=sys.stderr)
        if self.session.messages and self.session.messages[-1]["role"] == "assistant":
            last = self.session.messages[-1]["content"]
            print(f"Last reply: {last[:200]}{'…' if len(last) > 200 else ''}", file=sys.stderr)
        if resumed.model_spec and resumed.model_spec not in (self.model.name, str(self.model.path)):
            print(
                f"(This chat was made with {resumed.model_spec}: /load it to continue on that model.)", file=sys.stderr
            )

    def _load(self, model: ResolvedModel):
        print(f"Loading {model.name} ({model.path})…", file=sys.stderr, flush=True)
        backend = load(model, self.options)
        report = backend.report
        context = f"; {report.context_reason}" if report.context_reason else ""
        print(f"Ready: {report.describe()}{context}. Type /help for commands.", file=sys.stderr, flush=True)
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
                        params = turn_params(self.params, self.recorder)
                        self._stream(lambda cancel, t=line, p=params: self.session.send(t, p, cancel=cancel), params)
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

    def _stream(self, reply: Callable[[threading.Event], Iterator[GenerationEvent]], params: SamplingParams) -> None:
        from localrun.format import dropped_note, stats_line

        summary = None
        with _ctrl_c_cancels() as cancel:
            printer = ReplyPrinter(hide_thinking=self.args.hide_thinking)
            for event in reply(cancel):
                printer.write(event)
                summary = event.summary or summary
        sys.stdout.write("\n")
        first_save = self.recorder is not None and self.recorder.chat_id is None
        record = {"model": self.model, "backend": self.backend, "options": self.options, "params": params}
        record_turn(self.recorder, self.session, summary, **record)
        if first_save and self.recorder.chat_id is not None:
            print(f"[saved as chat {self.recorder.chat_id}: `localrun chat --resume` continues it]", file=sys.stderr)
        summary = self.session.last
        if summary is not None:
            note = dropped_note(summary, self.backend.report.n_ctx)
            if note:
                print(f"[{note}]", file=sys.stderr)
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
            self._new_chat()
            print("Conversation cleared.", file=sys.stderr)
        elif name == "/system":
            self.session.system = rest or None
            self.session.clear()
            self._new_chat()
            print("System prompt set; conversation cleared." if rest else "System prompt removed.", file=sys.stderr)
        elif name == "/set":
            self._set(rest)
        elif name == "/stats":
            self._stats()
        elif name == "/regen":
            params = turn_params(self.params, self.recorder)
            self._stream(lambda cancel: self.session.regenerate(params, cancel=cancel), params)
        elif name == "/load":
            self._reload(rest)
        elif name == "/save":
            self._save(rest)
        elif name == "/chats":
            self._chats()
        elif name == "/open":
            self._open(rest)
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
        if self.backend.report.context_reason:
            print(f"{self.backend.report.context_reason}")
        if self.session.last is None:
            print("No reply yet.")
            return
        for label, value in summary_table(self.session.last):
            print(f"  {label:<24} {value}")

    def _reload(self, spec: str) -> None:
        from localrun.backends import resolve_for

        if not spec:
            raise UserError("Usage: /load MODEL (a .gguf path, a model directory or a catalog name).")
        model = resolve_for(spec, self.options)
        backend = self._load(model)  # load first: a failed load keeps the current model
        self.backend.close()
        self.backend = backend
        self.session.backend = backend
        self.session.system = system_prompt(self.args, model)
        self.session.clear()
        self.model = model
        self._new_chat()

    def _new_chat(self) -> None:
        """A cleared conversation is a new chat: the saved one stays as it was."""
        if self.recorder is not None:
            from localrun.chats import ChatRecorder

            self.recorder = ChatRecorder(self.recorder.store)

    def _save(self, title: str) -> None:
        from localrun.chats import ChatRecorder, ChatStore

        if self.recorder is None:  # --no-save: this chat is saved from here on
            self.recorder = ChatRecorder(ChatStore())
        if self.recorder.chat_id is None:
            if not self.session.messages:
                raise UserError("There is nothing to save yet: send a message first.")
            self.recorder.title = title or None
            self.recorder.record(self.session.messages, None, system=self.session.system)
        elif title:
            self.recorder.store.rename(self.recorder.chat_id, title)
        info = self.recorder.store.info(self.recorder.chat_id)
        print(f'Saved as chat {info.id} "{info.title}" (`localrun chat --resume {info.id}`).', file=sys.stderr)

    def _chats(self) -> None:
        from localrun.chats import ChatStore

        store = self.recorder.store if self.recorder is not None else ChatStore()
        chats = store.list(limit=10)
        if not chats:
            print("No saved chats yet.", file=sys.stderr)
        for c in chats:
            mark = "*" if self.recorder is not None and c.id == self.recorder.chat_id else " "
            print(f"{mark} {c.id}  {c.messages:>3} msgs  {c.title}")

    def _open(self, ref: str) -> None:
        from localrun.chats import ChatStore

        if not ref:
            raise UserError("Usage: /open ID (an id from /chats, a unique prefix of one, or last).")
        store = self.recorder.store if self.recorder is not None else ChatStore()
        self._resume(_Resumed(store, store.resolve(ref)))
