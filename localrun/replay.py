"""Replay a saved chat: re-run its user turns with the same model file, settings and seed, and compare each
reply with the saved one (identical, or where it first differs) and the figures then and now.

Each turn is answered from the saved history before it, not from the replayed replies, so one difference
does not carry into every later turn. A model file whose sha256 differs from the saved one is named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localrun.chats import ChatStore, figures_of
from localrun.errors import UserError


@dataclass(frozen=True, slots=True)
class TurnReplay:
    """One reply replayed: the saved text and the new one, where they first differ (None: identical) and
    the figures of both."""

    index: int
    question: str
    saved: str
    now: str
    first_diff: int | None
    figures_then: dict[str, Any]
    figures_now: dict[str, Any]
    model: str
    sha_then: str | None
    sha_now: str | None

    @property
    def identical(self) -> bool:
        return self.first_diff is None

    @property
    def model_changed(self) -> bool:
        return bool(self.sha_then and self.sha_now and self.sha_then != self.sha_now)


class LocalAnswerer:
    """Answers replayed turns with a backend in this process, loaded per model and options. A reused KV cache
    changes the arithmetic (a near-tie can flip), so a reply that was made from a cold cache is answered on a
    freshly loaded model."""

    def __init__(self, *, progress: Callable[[str], None] | None = None) -> None:
        self.progress = progress
        self._key: tuple = ()
        self._backend: Any = None
        self._turns = 0

    def __call__(self, spec: str, options: Any, system: str | None, history: list, params: Any, *, cold: bool) -> tuple:
        """(summary, model file path) of the reply to history's last message."""
        from localrun.backends import load_backend
        from localrun.engine.chat import ChatSession

        if self._key != (spec, options) or (cold and self._turns):
            self.close()
            if self.progress is not None:
                self.progress(f"Loading {spec}…")
            self._backend, self._key, self._turns = load_backend(spec or None, options), (spec, options), 0
        self._turns += 1
        summary = None
        for event in ChatSession(self._backend, system=system).answer(history, params):
            summary = event.summary or summary
        return summary, self._backend.report.model_path

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def first_difference(a: str, b: str) -> int | None:
    """The index of the first character where a and b differ (None when they are equal)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def replay_chat(
    store: ChatStore,
    chat_id: str,
    *,
    model: str | None = None,
    answer: Callable[..., tuple] | None = None,
    progress: Callable[[str], None] | None = None,
    owner: str | None = None,
) -> Iterator[TurnReplay]:
    """Replay each saved reply of a chat, in order. model: this model instead of the saved one (e.g. another
    quant of it); answer(spec, options, system, history, params, cold=) -> (summary, model path) makes a reply
    (default: a LocalAnswerer, in this process)."""
    info = store.info(chat_id, owner=owner)
    messages = store.messages(chat_id)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("run")]
    if not replies:
        raise UserError(f"Chat {chat_id} has no saved reply with its settings to replay.")
    local = answer is None
    answer = answer or LocalAnswerer(progress=progress)
    shas: dict[str, str | None] = {}
    try:
        for number, i in enumerate(replies, start=1):
            saved = messages[i]
            params, options = _settings(saved["run"])
            spec = model or saved_spec(saved)
            history = [{"role": m["role"], "content": m["content"]} for m in messages[:i]]
            cold = (saved.get("figures") or {}).get("cached_tokens") == 0
            summary, path = answer(spec, options, info.system, history, params, cold=cold)
            if path and path not in shas:
                shas[path] = store.sha256_of(path)
            now = summary.text if summary is not None else ""
            yield TurnReplay(
                index=number,
                question=history[-1]["content"] if history else "",
                saved=saved["content"],
                now=now,
                first_diff=first_difference(saved["content"], now),
                figures_then=saved.get("figures") or {},
                figures_now=figures_of(summary) if summary is not None else {},
                model=spec,
                sha_then=saved.get("sha256")
                or (store.sha256_of(saved["model_path"]) if saved.get("model_path") else None),
                sha_now=shas.get(path) if path else None,
            )
    finally:
        if local:
            answer.close()


def saved_spec(message: dict[str, Any]) -> str:
    """What to load for a saved reply: its model id where that still names the same file (so the id shows),
    else its model file where that is still there, else the id."""
    path = message.get("model_path")
    name = message.get("model") or (message.get("run") or {}).get("model") or ""
    if name and path:
        try:
            from localrun.models.catalog import resolve_model

            resolved = resolve_model(name)
            if resolved.path is not None and Path(resolved.path).resolve() == Path(path).resolve():
                return name
        except (UserError, OSError):
            pass
    if path and Path(path).exists():
        return path
    return name


def _settings(run: dict[str, Any]) -> tuple[Any, Any]:
    """The saved sampling settings and load options, as records (fields this localrun no longer has are
    dropped; fields it added since take their defaults)."""
    from localrun.records import fields
    from localrun.settings import LoadOptions, SamplingParams, validated

    def known(model: type, values: dict[str, Any]) -> dict[str, Any]:
        names = fields(model)
        out = {k: v for k, v in (values or {}).items() if k in names}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}

    return validated(SamplingParams, known(SamplingParams, run.get("sampling"))), validated(
        LoadOptions, known(LoadOptions, run.get("load_options"))
    )


def _load_here(spec: str, options: Any) -> Any:
    from localrun.backends import load_backend

    return load_backend(spec or None, options)


def describe(turn: TurnReplay, *, context: int = 30) -> list[str]:
    """The lines the CLI prints for one replayed turn: the outcome, then the figures then → now."""
    if turn.identical:
        head = f"reply {turn.index}: identical ({len(turn.now)} characters)"
    else:
        k = turn.first_diff or 0
        start = max(0, k - context)
        head = (
            f"reply {turn.index}: differs from character {k}: saved {turn.saved[start : k + context]!r}"
            f" · now {turn.now[start : k + context]!r}"
        )
    lines = [head]
    if turn.model_changed:
        lines.append(
            f"  the model file is not the one saved: sha256 {turn.sha_then[:16]}… then, {turn.sha_now[:16]}… now ({turn.model})"
        )
    for label, show in _FIGURES:
        lines.append(f"  {label:<12} {show(turn.figures_then):>14}  →  {show(turn.figures_now)}")
    return lines


def _figure(key: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    return lambda figures: fmt(figures.get(key)) if figures else "n/a"


def _fmt(kind: str) -> Callable[[Any], str]:
    from localrun import format as f

    return {"ms": f.fmt_ms, "rate": f.fmt_rate, "bytes": f.fmt_bytes}.get(
        kind, lambda v: "n/a" if v is None else str(v)
    )


_FIGURES = (
    ("TTFT", _figure("ttft_s", _fmt("ms"))),
    ("prompt", _figure("prompt_tps", _fmt("rate"))),
    ("generation", _figure("decode_tps", _fmt("rate"))),
    ("tokens", _figure("generated_tokens", _fmt(""))),
    ("peak RAM", _figure("peak_ram_bytes", _fmt("bytes"))),
    ("finish", _figure("finish_reason", _fmt(""))),
)


def summary_line(turn: TurnReplay) -> str:
    """One Markdown line for a replayed reply: the outcome and the figures then → now."""
    from localrun.format import fmt_ms, fmt_rate

    def pair(key: str, fmt: Callable[[Any], str]) -> str:
        return f"{fmt(turn.figures_then.get(key))} → {fmt(turn.figures_now.get(key))}"

    outcome = "identical" if turn.identical else f"**differs** from character {turn.first_diff}"
    line = f"**Reply {turn.index}**: {outcome} · TTFT {pair('ttft_s', fmt_ms)} · gen {pair('decode_tps', fmt_rate)}"
    if turn.model_changed:
        line += f" · model file changed (sha256 {turn.sha_then[:12]}… → {turn.sha_now[:12]}…)"
    return line
