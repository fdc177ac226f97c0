"""Thinking blocks: which markers a model thinks between, and the one parser that splits its output into
reasoning and content (stream_generate runs it; the CLI, the UI and the server read the split events).

The markers come from the model's own chat template, not from its name:
- a template that writes `<think>`/`</think>` (Qwen3, DeepSeek-R1 distills, SmolLM3, Phi-4-reasoning) thinks
  between them; it may open the block itself at the end of the generation prompt (DeepSeek-R1 does), and one
  that reads `enable_thinking` can turn thinking off (Qwen3, SmolLM3);
- a template that writes channels (gpt-oss's harmony format) thinks in the `analysis` channel and answers in
  the `final` one; its `reasoning_effort` variable sets how much.

A model whose template has neither never has its output split: a `<think>` it writes is content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

THINK_MODES = ("auto", "on", "off", "low", "medium", "high")


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    """How one kind of template marks a thinking block.

    open/close wrap the thinking; answer is what introduces the answer after close (gpt-oss's final channel),
    and direct_answer the opening that skips thinking altogether. empty_block is what a prompt ends with to
    say "no thinking" where the template has no switch of its own. specials: the markers are control tokens,
    which text must be decoded with."""

    name: str
    open: str
    close: str
    answer: str = ""
    direct_answer: str = ""
    empty_block: str = ""
    specials: bool = False
    toggle: str | None = None  # the template variable that turns thinking off (enable_thinking)
    effort: bool = False  # the template reads reasoning_effort

    def opening(self) -> str:
        """The text the engine writes to open a block the template left closed (a grammar waits after it)."""
        return self.open + ("" if self.answer else "\n")

    def closing(self) -> str:
        """The text the engine writes to end a block the model has not ended (the thinking budget)."""
        return self.close + ("\n\n" if not self.answer else self.answer)


THINK_TAGS = ReasoningFormat("think tags", "<think>", "</think>", empty_block="<think>\n\n</think>\n\n")
CHANNELS = ReasoningFormat(
    "channels",
    "<|channel|>analysis<|message|>",
    "<|end|>",
    answer="<|start|>assistant<|channel|>final<|message|>",
    direct_answer="<|channel|>final<|message|>",
    specials=True,
    effort=True,
)


def detect(template: str | None) -> ReasoningFormat | None:
    """The thinking format a chat template uses, or None (the model does not think in a block)."""
    if not template:
        return None
    from dataclasses import replace

    if "<|channel|>" in template and "<|message|>" in template:
        return CHANNELS
    if "<think>" in template or "</think>" in template:
        toggle = "enable_thinking" if "enable_thinking" in template else None
        return replace(THINK_TAGS, toggle=toggle, effort="reasoning_effort" in template)
    return None


def template_source(backend: Any) -> str | None:
    """The chat template text of a loaded backend (None: it has none, or it is a remote engine)."""
    return getattr(backend, "chat_template_source", None)


def template_vars(fmt: ReasoningFormat | None, think: str) -> dict[str, Any]:
    """What the template is told: enable_thinking for one with that switch, reasoning_effort for one that
    reads it. "auto" tells it nothing (the model's own default)."""
    if fmt is None or think == "auto":
        return {}
    out: dict[str, Any] = {}
    if fmt.toggle:
        out[fmt.toggle] = think != "off"
    if fmt.effort:
        out["reasoning_effort"] = {"off": "low", "on": "medium"}.get(think, think)
    return out


def opens_block(fmt: ReasoningFormat, prompt: str) -> bool:
    """Whether the prompt ends inside a thinking block the template opened (DeepSeek-R1's `<think>\\n`)."""
    at = prompt.rfind(fmt.open)
    return at >= 0 and prompt.find(fmt.close, at) < 0 and not prompt[at + len(fmt.open) :].strip()


@dataclass(frozen=True, slots=True)
class ReasoningPlan:
    """What stream_generate needs to split one reply: the format, whether the prompt left a block open,
    the thinking budget (None: unbounded), and the grammar to apply once thinking ends (schema or tool call
    after thinking; None: the params' own grammar applies from the first token)."""

    format: ReasoningFormat
    starts_open: bool
    budget: int | None = None
    grammar_after: str | None = None


def _held(buf: str, marks: Sequence[str]) -> int:
    """How many characters at the end of buf could be the start of one of the marks."""
    best = 0
    for mark in marks:
        for k in range(min(len(mark) - 1, len(buf)), best, -1):
            if buf.endswith(mark[:k]):
                best = k
                break
    return best


class ReasoningSplitter:
    """Text deltas in, (reasoning, content) deltas out, holding back text that could be half a marker.

    States: "before" (the reply may open a block: leading space and a prefix of the opening are held),
    "thinking", "after" (the block ended: the answer marker and the blank lines after it are dropped) and
    "content". Only a reply's first block is thinking; markers written later in the answer (a model cut off
    by the thinking budget may go on and close its thought itself) are dropped from it."""

    def __init__(self, fmt: ReasoningFormat, *, starts_open: bool) -> None:
        self.fmt = fmt
        self.state = "thinking" if starts_open else "before"
        self.opened = starts_open
        self._buf = ""
        self._reasoning_started = False

    @property
    def thinking(self) -> bool:
        return self.state == "thinking"

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            before = (self.state, len(self._buf))
            self._step(reasoning, content, final=False)
            if (self.state, len(self._buf)) == before:
                break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        self._step(reasoning, content, final=True)
        return "".join(reasoning), "".join(content)

    def _step(self, reasoning: list[str], content: list[str], *, final: bool) -> None:
        fmt, buf = self.fmt, self._buf
        if self.state == "before":
            s = buf.lstrip()
            if s.startswith(fmt.open):
                self.state, self.opened, self._buf = "thinking", True, s[len(fmt.open) :]
            elif fmt.direct_answer and s.startswith(fmt.direct_answer):
                self.state, self._buf = "content", s[len(fmt.direct_answer) :]
            elif not final and (not s or any(m.startswith(s) for m in (fmt.open, fmt.direct_answer) if m)):
                return  # still undecided
            else:
                self.state = "content"
        elif self.state == "thinking":
            at = buf.find(fmt.close)
            if at >= 0:
                self._think(buf[:at], reasoning)
                self.state, self._buf = "after", buf[at + len(fmt.close) :]
                return
            keep = 0 if final else _held(buf, [fmt.close])
            self._think(buf[: len(buf) - keep], reasoning)
            self._buf = buf[len(buf) - keep :]
        elif self.state == "after":
            s = buf.lstrip()
            if fmt.answer and s.startswith(fmt.answer):
                self._buf = s[len(fmt.answer) :]
                self.state = "content"
                self._buf = self._buf.lstrip()
            elif not final and (not s or (fmt.answer and fmt.answer.startswith(s))):
                return
            else:
                self.state, self._buf = "content", s
        else:  # the answer: a marker the model writes here again (it went on thinking) is dropped, never shown
            marks = [m for m in (fmt.close, fmt.open, fmt.answer) if m]
            for mark in marks:
                buf = buf.replace(mark, "")
            keep = 0 if final else _held(buf, marks)
            if buf[: len(buf) - keep]:
                content.append(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]

    def _think(self, text: str, out: list[str]) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        if text:
            out.append(text)
