"""The chat store: every saved conversation in one SQLite file beside the model store.

A chat keeps its messages in order; each reply also keeps how it was made (model id, file and sha256, quant,
backend, device, load options, sampling settings, seed) and its figures (TTFT, tokens/s, tokens, memory,
drafting, finish reason). Every write is one transaction, so a crash mid-reply keeps every finished turn.
The schema carries a version (SQLite's user_version) and migrates forward on open.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localrun.errors import UserError

SCHEMA_VERSION = 1
TITLE_CHARS = 60
# Deleted chats stay restorable (Undo) this long, then the next open removes them for good.
UNDO_WINDOW_S = 600.0

_V1 = """
CREATE TABLE chats(
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL,
    system TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deleted_at REAL
);
CREATE INDEX chats_by_owner ON chats(owner, updated_at);
CREATE TABLE messages(
    chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    reasoning TEXT,
    created_at REAL NOT NULL,
    model TEXT,
    model_path TEXT,
    sha256 TEXT,
    run TEXT,
    figures TEXT,
    PRIMARY KEY(chat_id, seq)
);
CREATE TABLE file_hashes(
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""
# MIGRATIONS[v] takes a store from version v to v + 1; a new version appends its step here.
MIGRATIONS: tuple[str, ...] = (_V1,)
MESSAGE_KEYS = ("role", "content", "reasoning", "created_at", "model", "model_path", "sha256", "run", "figures")
_JSON_KEYS = ("run", "figures")


@dataclass(frozen=True, slots=True)
class ChatInfo:
    """A chat as lists show it."""

    id: str
    title: str
    created_at: float
    updated_at: float
    messages: int
    model: str | None
    owner: str = ""
    system: str | None = None


def default_path() -> Path:
    """$LOCALRUN_CHATS, else chats.sqlite in localrun's data directory ($LOCALRUN_HOME or the platform's),
    beside the model store."""
    import os

    from localrun.models.catalog import localrun_home

    return Path(os.environ.get("LOCALRUN_CHATS") or localrun_home() / "chats.sqlite")


def title_from(text: str) -> str:
    """A chat's first title: its first message, on one line, cut at TITLE_CHARS."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


class ChatStore:
    """The chats of one SQLite file. Each method is one transaction; the connection is per call, so the UI's
    threads and the REPL can share a store safely."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as db:
            self._migrate(db)
            db.execute(
                "DELETE FROM chats WHERE deleted_at IS NOT NULL AND deleted_at < ?", (time.time() - UNDO_WINDOW_S,)
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=10.0)
        except sqlite3.Error as exc:
            raise UserError(f"Cannot open the chat store {self.path}: {exc}.") from None
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")
        try:
            with db:  # commit on success, roll back on any error
                yield db
        except sqlite3.DatabaseError as exc:
            raise UserError(
                f"The chat store {self.path} is not readable ({exc}): move it aside to start afresh."
            ) from None
        finally:
            db.close()

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(
                f"The chat store {self.path} was written by a newer localrun (schema {version}, this one reads "
                f"{SCHEMA_VERSION}): upgrade localrun."
            )
        for step in MIGRATIONS[version:]:
            db.executescript(f"BEGIN; {step}")  # executescript commits first; BEGIN keeps the step whole
            version += 1
            db.execute(f"PRAGMA user_version = {version}")

    # -- chats --------------------------------------------------------------------------------

    def create(self, *, title: str = "New chat", owner: str = "", system: str | None = None) -> str:
        """A new empty chat; returns its id."""
        chat_id = uuid.uuid4().hex[:12]
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO chats(id, owner, title, system, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, owner, title, system, now, now),
            )
        return chat_id

    def save_messages(self, chat_id: str, messages: Sequence[dict[str, Any]], *, system: str | None = None) -> None:
        """Make messages the chat's whole conversation, in one transaction (a regenerated reply replaces the
        old one; a crash keeps either the old conversation or the new one, never half)."""
        now = time.time()
        rows = [_message_row(chat_id, seq, m, now) for seq, m in enumerate(messages)]
        with self._tx() as db:
            if db.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone() is None:
                raise UserError(f"There is no chat {chat_id!r}: `localrun chats list` shows the saved ones.")
            db.execute("DELETE FROM messages WHERE chat_id = ?", (chat_id,))
            db.executemany(f"INSERT INTO messages VALUES ({', '.join('?' * (2 + len(MESSAGE_KEYS)))})", rows)
            db.execute("UPDATE chats SET updated_at = ?, system = ? WHERE id = ?", (now, system, chat_id))

    def rename(self, chat_id: str, title: str, *, owner: str | None = None) -> None:
        title = " ".join(title.split())
        if not title:
            raise UserError("A chat's title cannot be empty.")
        self._update(chat_id, owner, "title = ?", (title,))

    def delete(self, chat_id: str, *, owner: str | None = None) -> None:
        """Mark a chat deleted; restore() brings it back for UNDO_WINDOW_S, purge() removes it at once."""
        self._update(chat_id, owner, "deleted_at = ?", (time.time(),))

    def restore(self, chat_id: str, *, owner: str | None = None) -> None:
        self._update(chat_id, owner, "deleted_at = NULL", (), deleted=True)

    def purge(self, chat_id: str, *, owner: str | None = None) -> None:
        """Delete a chat and its messages for good."""
        with self._tx() as db:
            self._require(db, chat_id, owner, deleted=None)
            db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    def _update(
        self, chat_id: str, owner: str | None, assignment: str, values: tuple, *, deleted: bool = False
    ) -> None:
        with self._tx() as db:
            self._require(db, chat_id, owner, deleted=deleted)
            db.execute(f"UPDATE chats SET {assignment} WHERE id = ?", (*values, chat_id))

    def _require(self, db: sqlite3.Connection, chat_id: str, owner: str | None, *, deleted: bool | None) -> None:
        row = db.execute("SELECT owner, deleted_at FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if (
            row is None
            or (owner is not None and row["owner"] != owner)
            or (deleted is not None and (row["deleted_at"] is not None) != deleted)
        ):
            raise UserError(f"There is no chat {chat_id!r}: `localrun chats list` shows the saved ones.")

    # -- reading ------------------------------------------------------------------------------

    def list(self, *, owner: str | None = None, query: str = "", limit: int = 200) -> list[ChatInfo]:
        """Chats, most recent first; query matches titles and message text (case-insensitive)."""
        where, args = ["c.deleted_at IS NULL"], []
        if owner is not None:
            where.append("c.owner = ?")
            args.append(owner)
        if query.strip():
            like = "%" + query.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append(
                "(c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages q WHERE q.chat_id = c.id "
                "AND q.content LIKE ? ESCAPE '\\'))"
            )
            args += [like, like]
        sql = (
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.id) AS n, "
            "(SELECT m.model FROM messages m WHERE m.chat_id = c.id AND m.model IS NOT NULL ORDER BY m.seq DESC "
            f"LIMIT 1) AS model FROM chats c WHERE {' AND '.join(where)} ORDER BY c.updated_at DESC LIMIT ?"
        )
        with self._tx() as db:
            return [_info(row) for row in db.execute(sql, (*args, limit))]

    def resolve(self, ref: str, *, owner: str | None = None) -> str:
        """A chat id from an id, a unique id prefix, or "last" (the most recently updated chat)."""
        chats = self.list(owner=owner, limit=10_000)
        if ref == "last":
            if not chats:
                raise UserError("There are no saved chats yet: chat first, then resume.")
            return chats[0].id
        matches = [c.id for c in chats if c.id.startswith(ref)] if ref else []
        if len(matches) != 1:
            what = "matches several chats" if matches else "is not a saved chat"
            raise UserError(f"{ref!r} {what}: `localrun chats list` shows their ids.")
        return matches[0]

    def info(self, chat_id: str, *, owner: str | None = None) -> ChatInfo:
        found = [c for c in self.list(owner=owner, limit=10_000) if c.id == chat_id]
        if not found:
            raise UserError(f"There is no chat {chat_id!r}: `localrun chats list` shows the saved ones.")
        return found[0]

    def messages(self, chat_id: str) -> list[dict[str, Any]]:
        """The chat's messages in order, as dicts with MESSAGE_KEYS (run and figures decoded)."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY seq", (chat_id,)).fetchall()
        return [_message_dict(row) for row in rows]

    def rows(self) -> dict[str, list[tuple]]:
        """Every stored row of chats and messages, as tuples (for checks that a round trip lost nothing)."""
        with self._tx() as db:
            return {
                "chats": [tuple(r) for r in db.execute("SELECT * FROM chats ORDER BY id")],
                "messages": [tuple(r) for r in db.execute("SELECT * FROM messages ORDER BY chat_id, seq")],
            }

    # -- import -------------------------------------------------------------------------------

    def insert_chats(self, chats: Sequence[dict[str, Any]]) -> list[str]:
        """Add whole chats (as chat_io.read_export gives them) in one transaction: all of them or none.
        A chat whose id is taken gets a new one. Returns the ids they were stored under."""
        ids = []
        with self._tx() as db:
            for chat in chats:
                chat_id = chat["id"]
                if db.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone() is not None:
                    chat_id = uuid.uuid4().hex[:12]
                db.execute(
                    "INSERT INTO chats(id, owner, title, system, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (chat_id, chat["owner"], chat["title"], chat["system"], chat["created_at"], chat["updated_at"]),
                )
                rows = [_message_row(chat_id, seq, m, m["created_at"]) for seq, m in enumerate(chat["messages"])]
                db.executemany(f"INSERT INTO messages VALUES ({', '.join('?' * (2 + len(MESSAGE_KEYS)))})", rows)
                ids.append(chat_id)
        return ids

    # -- file hashes --------------------------------------------------------------------------

    def sha256_of(self, path: str | Path) -> str | None:
        """A model file's sha256, computed once per (path, size, mtime) and cached here; None for a directory
        or a missing file."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            return None
        if not p.is_file():
            return None
        key = str(p.resolve())
        with self._tx() as db:
            row = db.execute("SELECT size, mtime_ns, sha256 FROM file_hashes WHERE path = ?", (key,)).fetchone()
        if row is not None and (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            return row["sha256"]
        digest = hashlib.sha256()
        with p.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (key, st.st_size, st.st_mtime_ns, value)
            )
            db.execute("UPDATE messages SET sha256 = ? WHERE model_path = ? AND sha256 IS NULL", (value, str(path)))
        return value


def _message_row(chat_id: str, seq: int, m: dict[str, Any], now: float) -> tuple:
    if m.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(m.get("content"), str):
        raise UserError(f"Message {seq + 1} needs a role (user, assistant, system or tool) and text content.")
    values = []
    for key in MESSAGE_KEYS[2:]:
        value = m.get(key)
        if key == "created_at" and value is None:
            value = now
        if key in _JSON_KEYS and value is not None:
            value = json.dumps(value, sort_keys=True)
        values.append(value)
    return (chat_id, seq, m["role"], m["content"], *values)


def _message_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = {key: row[key] for key in MESSAGE_KEYS}
    for key in _JSON_KEYS:
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out


def _info(row: sqlite3.Row) -> ChatInfo:
    return ChatInfo(
        id=row["id"],
        title=row["title"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        messages=row["n"],
        model=row["model"],
        owner=row["owner"],
        system=row["system"],
    )


# ---- what a reply records ---------------------------------------------------------------------------


def figures_of(summary: Any) -> dict[str, Any]:
    """A reply's figures from its GenerationSummary: every plain field but the text, plus the derived ones."""
    out = {}
    for f in dataclasses.fields(summary):
        value = getattr(summary, f.name)
        if f.name in ("text", "reasoning"):  # the message holds them
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    out["cached_tokens"] = summary.cached_tokens
    out["acceptance_rate"] = summary.acceptance_rate
    return out


def run_of(*, model: str, report: Any, options: Any, params: Any, quant: str | None = None) -> dict[str, Any]:
    """How a reply was made: the model, where it ran, the load options and the sampling settings with its seed."""
    from localrun.records import as_dict

    return {
        "model": model,
        "quant": quant if quant is not None else model_quant(report.model_path),
        "backend": report.backend,
        "device": report.device,
        "n_ctx": report.n_ctx,
        "load_options": _plain(as_dict(options)),
        "sampling": _plain(as_dict(params)),
        "seed": params.seed,
    }


def model_quant(path: str | None) -> str | None:
    """A GGUF file's quant type (Q4_1, F16, …) from its header; None for other models."""
    if not path or not str(path).endswith(".gguf"):
        return None
    try:
        from localrun.models.gguf_info import inspect_gguf

        return inspect_gguf(path).quant_type
    except (UserError, OSError):
        return None


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def reply_message(
    text: str, summary: Any, *, model: str, report: Any, options: Any, params: Any, quant: str | None = None
) -> dict[str, Any]:
    """An assistant message as the store keeps it: the text, how it was made and its figures."""
    return {
        "role": "assistant",
        "content": text,
        "reasoning": getattr(summary, "reasoning", "") or None,
        "created_at": time.time(),
        "model": model,
        "model_path": report.model_path,
        "run": run_of(model=model, report=report, options=options, params=params, quant=quant),
        "figures": figures_of(summary) if summary is not None else None,
    }


class ChatRecorder:
    """Keeps one conversation saved as it goes (the REPL's): after each turn, the history as it now stands,
    the new reply with how it was made and its figures. The chat is created with its first saved turn."""

    def __init__(self, store: ChatStore, *, owner: str = "", chat_id: str | None = None) -> None:
        self.store, self.owner, self.chat_id = store, owner, chat_id
        self.messages: list[dict[str, Any]] = store.messages(chat_id) if chat_id else []
        self.title: str | None = None

    def record(self, history: Sequence[dict[str, Any]], reply: dict[str, Any] | None, *, system: str | None) -> str:
        """Save the conversation; reply is the stored form of its last message when that is a new reply."""
        now = time.time()
        out = []
        for i, m in enumerate(history):
            old = self.messages[i] if i < len(self.messages) else None
            if old is not None and (old["role"], old["content"]) == (m["role"], m["content"]):
                out.append(old)
            else:
                out.append({"role": m["role"], "content": m["content"], "created_at": now})
        if reply is not None and out and out[-1]["role"] == "assistant":
            out[-1] = {**out[-1], **reply, "content": out[-1]["content"]}
        if self.chat_id is None:
            first = next((m["content"] for m in out if m["role"] == "user"), "New chat")
            self.chat_id = self.store.create(title=self.title or title_from(first), owner=self.owner, system=system)
        self.store.save_messages(self.chat_id, out, system=system)
        self.messages = out
        return self.chat_id
