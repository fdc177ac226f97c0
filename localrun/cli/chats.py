"""`localrun chats`: list, show, export, import, remove and replay saved chats."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from localrun.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chats",
        help="saved chats: list, show, export, import, rm, replay",
        description="Saved chats (from `localrun chat` and the web UI), kept in chats.sqlite in localrun's data "
        "directory. An ID may be shortened to any unique prefix, or given as 'last'.",
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    ls = verbs.add_parser("list", help="the saved chats, most recent first")
    ls.add_argument("query", nargs="?", default="", help="only chats whose title or text contains this")
    show = verbs.add_parser("show", help="print a chat with each reply's model, settings and figures")
    show.add_argument("id")
    ex = verbs.add_parser("export", help="write chats as JSON (lossless; `chats import` reads it) or Markdown")
    ex.add_argument("ids", nargs="*", help="chat ids (default: every chat)")
    ex.add_argument("-o", "--output", help="file to write (default: standard output)")
    ex.add_argument("--markdown", action="store_true", help="Markdown for reading instead of JSON")
    im = verbs.add_parser("import", help="add the chats of a JSON export (all of them, or none on any error)")
    im.add_argument("file")
    rm = verbs.add_parser("rm", help="delete chats for good")
    rm.add_argument("ids", nargs="+")
    rp = verbs.add_parser(
        "replay", help="re-run a chat's turns with the same model, settings and seed, and compare the replies"
    )
    rp.add_argument("id")
    rp.add_argument("--model", help="replay on another model (e.g. another quant of the same one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from localrun.chats import ChatStore

    store = ChatStore()
    return {"list": _list, "show": _show, "export": _export, "import": _import, "rm": _rm, "replay": _replay}[
        args.verb
    ](store, args)


def _list(store, args: argparse.Namespace) -> int:
    chats = store.list(query=args.query)
    if not chats:
        print("No saved chats." if not args.query else f"No saved chat mentions {args.query!r}.", file=sys.stderr)
        return 0
    print(f"{'ID':<13} {'UPDATED':<17} {'MSGS':>4}  {'MODEL':<28} TITLE")
    for c in chats:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated_at))
        print(f"{c.id:<13} {when:<17} {c.messages:>4}  {(c.model or '-')[:28]:<28} {c.title}")
    return 0


def _show(store, args: argparse.Namespace) -> int:
    from localrun.chat_io import export_data, markdown

    chat_id = store.resolve(args.id)
    print(markdown(export_data(store, [chat_id])))
    return 0


def _export(store, args: argparse.Namespace) -> int:
    from localrun.chat_io import export_data, export_json, markdown, write_text

    ids = [store.resolve(ref) for ref in args.ids] if args.ids else [c.id for c in reversed(store.list(limit=10**9))]
    data = export_data(store, ids)
    text = markdown(data) if args.markdown else export_json(data)
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise UserError(f"{out} is a directory: name a file to write, e.g. {out / 'chats.json'}.")
        if not out.parent.is_dir():
            raise UserError(f"The folder {out.parent} does not exist: create it first, or write elsewhere.")
        write_text(out, text)
        print(f"Wrote {len(ids)} chat(s) to {out}.", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _import(store, args: argparse.Namespace) -> int:
    from localrun.chat_io import read_export

    chats = read_export(Path(args.file))
    ids = store.insert_chats(chats)
    renamed = sum(1 for chat, new in zip(chats, ids, strict=True) if chat["id"] != new)
    note = f" ({renamed} got a new id: theirs was taken)" if renamed else ""
    print(f"Imported {len(ids)} chat(s){note}: {' '.join(ids)}", file=sys.stderr)
    return 0


def _rm(store, args: argparse.Namespace) -> int:
    ids = [store.resolve(ref) for ref in args.ids]  # every id is checked before anything is deleted
    for chat_id in ids:
        store.purge(chat_id)
    print(f"Deleted {len(ids)} chat(s).", file=sys.stderr)
    return 0


def _replay(store, args: argparse.Namespace) -> int:
    from localrun.replay import describe, replay_chat

    chat_id = store.resolve(args.id)
    same = changed = 0
    for turn in replay_chat(store, chat_id, model=args.model, progress=lambda s: print(s, file=sys.stderr)):
        for line in describe(turn):
            print(line, flush=True)
        same += turn.identical
        changed += not turn.identical
    print(f"{same} of {same + changed} replies identical to the saved ones.", file=sys.stderr)
    return 0 if changed == 0 else 1
