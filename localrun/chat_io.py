"""Saved chats out and in: the JSON export (everything the store keeps, lossless), Markdown for reading, and
an import that checks the whole file before it writes anything."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localrun import __version__
from localrun.chats import MESSAGE_KEYS, ChatStore
from localrun.errors import UserError

FORMAT = "localrun.chats"
FORMAT_VERSION = 1
_CHAT_KEYS = {"id": str, "owner": str, "title": str, "system": (str, type(None)), "created_at": float}
_MESSAGE_TYPES: dict[str, Any] = {
    "role": str,
    "content": str,
    "reasoning": (str, type(None)),
    "created_at": float,
    "model": (str, type(None)),
    "model_path": (str, type(None)),
    "sha256": (str, type(None)),
    "run": (dict, type(None)),
    "figures": (dict, type(None)),
}
_ROLES = ("system", "user", "assistant", "tool")


def export_data(store: ChatStore, chat_ids: Sequence[str]) -> dict[str, Any]:
    """The export document for these chats (model files' sha256 filled in where it was not computed yet)."""
    chats = []
    for chat_id in chat_ids:
        info = store.info(chat_id)
        messages = store.messages(chat_id)
        for m in messages:
            if m["model_path"] and not m["sha256"]:
                m["sha256"] = store.sha256_of(m["model_path"])
        chats.append(
            {
                "id": info.id,
                "owner": info.owner,
                "title": info.title,
                "system": info.system,
                "created_at": info.created_at,
                "updated_at": info.updated_at,
                "messages": messages,
            }
        )
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "exported_at": time.time(),
        "localrun": __version__,
        "chats": chats,
    }


def write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def read_export(path: Path) -> list[dict[str, Any]]:
    """The chats of an export file, every field checked; one sentence for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is not a file: pass a JSON file written by `localrun chats export`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path.name} is not a localrun chat export: it is not JSON ({exc}).") from None
    except RecursionError:
        raise UserError(f"{path.name} is not a localrun chat export: it is nested too deeply.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f'{path.name} is not a localrun chat export (its "format" is not {FORMAT!r}).')
    version = data.get("version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise UserError(f"{path.name} is a chat export of version {version!r}, which this localrun cannot read.")
    chats = data.get("chats")
    if not isinstance(chats, list):
        raise UserError(f'{path.name}: "chats" must be a list.')
    return [_checked_chat(chat, f"chats[{i}]", path.name) for i, chat in enumerate(chats)]


def _checked_chat(chat: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(chat, dict):
        raise UserError(f"{name}: {where} must be an object.")
    out = {key: _field(chat, key, kind, where, name) for key, kind in _CHAT_KEYS.items()}
    out["updated_at"] = _field(chat, "updated_at", float, where, name)
    messages = chat.get("messages")
    if not isinstance(messages, list):
        raise UserError(f"{name}: {where}.messages must be a list.")
    out["messages"] = [_checked_message(m, f"{where}.messages[{j}]", name) for j, m in enumerate(messages)]
    extra = set(chat) - {*_CHAT_KEYS, "updated_at", "messages"}
    if extra:
        raise UserError(f"{name}: {where} has fields this format does not have: {', '.join(sorted(extra))}.")
    return out


def _checked_message(m: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise UserError(f"{name}: {where} must be an object.")
    extra = set(m) - set(MESSAGE_KEYS)
    if extra:
        raise UserError(f"{name}: {where} has fields this format does not have: {', '.join(sorted(extra))}.")
    out = {
        key: _field(m, key, _MESSAGE_TYPES[key], where, name, optional=key not in ("role", "content"))
        for key in MESSAGE_KEYS
    }
    if out["role"] not in _ROLES:
        raise UserError(f"{name}: {where}.role must be one of {', '.join(_ROLES)}.")
    if out["created_at"] is None:
        raise UserError(f"{name}: {where}.created_at is missing.")
    return out


def _field(obj: dict, key: str, kind: Any, where: str, name: str, *, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise UserError(f"{name}: {where}.{key} is missing.")
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise UserError(f"{name}: {where}.{key} has the wrong type ({type(value).__name__}).")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name}: {where}.{key} must be a finite number.")
    return value


# ---- Markdown ---------------------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    """The export as Markdown, for reading: each reply with how it was made and its figures."""
    out = []
    for chat in data["chats"]:
        out.append(f"# {chat['title']}\n")
        out.append(f"*chat {chat['id']} · started {_when(chat['created_at'])}*\n")
        if chat["system"]:
            out.append(f"> **System:** {chat['system']}\n")
        for m in chat["messages"]:
            out.append(f"**{m['role'].capitalize()}**{_made_with(m)}\n")
            if m.get("reasoning"):
                out.append("<details><summary>Thinking</summary>\n\n" + m["reasoning"] + "\n\n</details>\n")
            out.append(m["content"] + "\n")
    return "\n".join(out)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _made_with(m: dict[str, Any]) -> str:
    run, figures = m.get("run") or {}, m.get("figures") or {}
    if not run and not figures:
        return ""
    parts = [p for p in (run.get("model"), run.get("quant"), _where(run)) if p]
    if m.get("sha256"):
        parts.append(f"sha256 {m['sha256'][:12]}")
    parts += figure_parts(figures)
    return " · " + " · ".join(parts) if parts else ""


def _where(run: dict[str, Any]) -> str | None:
    if run.get("backend"):
        return f"{run['backend']} on {run.get('device') or '?'}"
    return None


def figure_parts(figures: dict[str, Any]) -> list[str]:
    """The figures of one reply, short (TTFT, tok/s, tokens, memory, finish)."""
    from localrun.format import fmt_bytes, fmt_ms, fmt_rate

    if not figures:
        return []
    parts = [f"TTFT {fmt_ms(figures.get('ttft_s'))}", f"gen {fmt_rate(figures.get('decode_tps'))}"]
    parts.append(f"{figures.get('generated_tokens', 0)} tok")
    if figures.get("peak_ram_bytes"):
        parts.append(f"RAM {fmt_bytes(figures['peak_ram_bytes'])}")
    if figures.get("finish_reason"):
        parts.append(str(figures["finish_reason"]))
    return parts
