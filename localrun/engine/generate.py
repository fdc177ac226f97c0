"""stream_generate(): the one place that times, detokenises, matches stop strings and reads memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from localrun.backends.base import Backend
from localrun.engine.drafting import as_drafter
from localrun.engine.events import GenerationEvent, GenerationSummary, ServerCounts, TokenStep
from localrun.engine.reasoning import ReasoningPlan, ReasoningSplitter
from localrun.engine.repetition import LoopDetector
from localrun.engine.speculative import Draft, Drafter
from localrun.errors import UserError
from localrun.hardware import MemorySampler
from localrun.settings import SamplingParams

_REPLACEMENT = "\ufffd"
_MAX_HELD_TOKENS = 8  # a UTF-8 character is at most 4 byte-tokens; room for empty special tokens too


class IncrementalDetokenizer:
    """Turns token ids into text deltas without ever printing half a UTF-8 character.

    It decodes a small window of recent tokens twice (with and without the newest) and emits
    the difference; while the window ends in U+FFFD, a character is still incomplete.
    """

    def __init__(self, detokenize: Callable[[Sequence[int]], str]) -> None:
        self._detokenize = detokenize
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True) if self._read < len(self._ids) else ""

    def _emit(self, *, final: bool) -> str:
        prefix_text = self._detokenize(self._ids[self._prefix : self._read])
        new_text = self._detokenize(self._ids[self._prefix :])
        held = len(self._ids) - self._read
        if not final and new_text.endswith(_REPLACEMENT) and held < _MAX_HELD_TOKENS:
            return ""
        if len(new_text) <= len(prefix_text) and not final:
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return delta


class StopMatcher:
    """Finds stop strings across token boundaries by holding back text that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to show, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


class _TimedDrafter:
    """Wraps a drafter so its time is measured here, where all timing lives: the seconds spent
    proposing, and each round's and each plain step's duration, which the drafter's adaptive draft
    length is fed with (it cannot time itself: backends and drafters never read the clock)."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.draft_s = 0.0
        self.last_s = 0.0  # the last proposal's seconds
        drafter.begin()

    def propose(self, ids: Sequence[int], params: SamplingParams, rng) -> Draft:
        t0 = time.perf_counter()
        try:
            return self.drafter.propose(ids, params, rng)
        finally:
            self.last_s = time.perf_counter() - t0
            self.draft_s += self.last_s


class _Stats:
    """Cumulative counters for one request; turns them into events."""

    def __init__(self, prompt_tokens: int, drafter: _TimedDrafter | None = None, memory: Any = None) -> None:
        self.t_start = time.perf_counter()  # first, so TTFT includes all of our own set-up
        self.t_first: float | None = None
        self.t_last = self.t_start
        self.t_mark = self.t_start  # when the last plain step or round ended
        self.prompt_tokens = prompt_tokens
        self.prefill_tokens = prompt_tokens
        self.generated = 0
        self.draft_tokens = 0
        self.accepted = 0
        self.round_drafted = 0  # > 0 while a speculative round is open
        self.round_accepted = 0
        self.accept_counts: list[int] = []
        self.draft_lengths: list[int] = []
        self.round_s = 0.0
        self.drafter = drafter
        self.memory = memory if memory is not None else MemorySampler()
        self.text_parts: list[str] = []
        self.reasoning_parts: list[str] = []
        self.reasoning_tokens = 0
        self.t_thought: float | None = None  # when the thinking block ended
        self.reasoning_cut = False

    def end_thinking(self, *, cut: bool = False) -> None:
        if self.t_thought is None:
            self.t_thought, self.reasoning_cut = time.perf_counter(), cut

    def reasoning_s(self) -> float | None:
        if not self.reasoning_tokens or self.t_first is None:
            return None
        return (self.t_thought if self.t_thought is not None else self.t_last) - self.t_first

    def on_token(self, step: TokenStep) -> None:
        now = self.t_last = time.perf_counter()
        first = self.t_first is None
        if first:
            self.t_first = now
            if step.prefill_tokens is not None:
                self.prefill_tokens = step.prefill_tokens
        self.generated += 1
        if step.drafted:
            self.round_drafted, self.round_accepted = step.drafted, 0
            self.draft_tokens += step.drafted
            self.draft_lengths.append(step.drafted)
        self.memory.sample()
        if step.from_draft:
            self.accepted += 1
            self.round_accepted += 1
            return
        seconds, self.t_mark = now - self.t_mark, now
        if self.round_drafted:
            self._close_round(seconds)
        elif self.drafter is not None and not first:
            self.drafter.drafter.observe_plain(seconds)

    def _close_round(self, seconds: float) -> None:
        while len(self.accept_counts) <= self.round_accepted:
            self.accept_counts.append(0)
        self.accept_counts[self.round_accepted] += 1
        self.round_s += seconds
        if self.drafter is not None:
            d = self.drafter
            d.drafter.observe_round(self.round_drafted, self.round_accepted, seconds, min(d.last_s, seconds))
        self.round_drafted = 0

    def server_counts(self, end: ServerCounts) -> str:
        """A remote engine's own counts replace ours (we counted streamed pieces); returns its finish reason."""
        if end.prompt_tokens is not None:
            self.prompt_tokens = end.prompt_tokens
            self.prefill_tokens = end.prompt_tokens - (end.cached_tokens or 0)
        if end.generated_tokens is not None:
            self.generated = end.generated_tokens
        if end.reasoning_tokens is not None:
            self.reasoning_tokens = end.reasoning_tokens
        return end.finish_reason

    def rates(self) -> tuple[float | None, float | None, float | None]:
        """(ttft_s, prompt_tps, decode_tps); decode counts from the first token on."""
        if self.t_first is None:
            return None, None, None
        ttft = self.t_first - self.t_start
        prompt_tps = self.prefill_tokens / ttft if ttft > 0 and self.prefill_tokens else None
        span = self.t_last - self.t_first
        decode_tps = (self.generated - 1) / span if self.generated > 1 and span > 0 else None
        return ttft, prompt_tps, decode_tps

    def event(
        self, text: str, ids: tuple[int, ...], drafts: tuple[bool, ...], reasoning: str = "", **final
    ) -> GenerationEvent:
        ttft, prompt_tps, decode_tps = self.rates()
        m = self.memory
        return GenerationEvent(
            text=text,
            reasoning=reasoning,
            reasoning_tokens=self.reasoning_tokens,
            reasoning_s=self.reasoning_s(),
            token_ids=ids,
            from_draft=drafts,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated,
            ttft_s=ttft,
            prompt_tps=prompt_tps,
            decode_tps=decode_tps,
            elapsed_s=time.perf_counter() - self.t_start,
            ram_bytes=m.ram_bytes,
            peak_ram_bytes=m.peak_ram_bytes,
            vram_bytes=m.vram_bytes,
            peak_vram_bytes=m.peak_vram_bytes,
            draft_tokens=self.draft_tokens,
            accepted_tokens=self.accepted,
            prefill_tokens=self.prefill_tokens,
            **final,
        )

    def summary(self, finish_reason: str, backend: Backend, error: str | None) -> GenerationSummary:
        if self.round_drafted:  # a round cut short by the token limit or a stop string
            self._close_round(time.perf_counter() - self.t_mark)
        ttft, prompt_tps, decode_tps = self.rates()
        draft_s = self.drafter.draft_s if self.drafter is not None else 0.0
        report = getattr(backend, "report", None)
        return GenerationSummary(
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            prefill_tokens=self.prefill_tokens,
            generated_tokens=self.generated,
            ttft_s=ttft,
            prompt_tps=prompt_tps,
            decode_tps=decode_tps,
            total_s=time.perf_counter() - self.t_start,
            peak_ram_bytes=self.memory.peak_ram_bytes,
            peak_vram_bytes=self.memory.peak_vram_bytes,
            backend=getattr(report, "backend", ""),
            device=getattr(report, "device", ""),
            draft_tokens=self.draft_tokens,
            accepted_tokens=self.accepted,
            accept_counts=tuple(self.accept_counts),
            error=error,
            text="".join(self.text_parts),
            draft_s=draft_s,
            verify_s=max(self.round_s - draft_s, 0.0),
            draft_lengths=tuple(self.draft_lengths),
            reasoning="".join(self.reasoning_parts).strip(),
            reasoning_tokens=self.reasoning_tokens,
            reasoning_s=self.reasoning_s(),
            reasoning_cut=self.reasoning_cut,
        )


class RemoteMemory:
    """MemorySampler's fields for a model served elsewhere: what its engine reports (read at the start and the
    end, not per token: each read is a request), or None, shown as n/a."""

    def __init__(self, read: Callable[[], tuple[int | None, int | None]]) -> None:
        self._read = read
        self.peak_ram_bytes = self.peak_vram_bytes = None
        self.sample(force=True)

    def sample(self, *, force: bool = False) -> None:
        if force:
            self.ram_bytes, self.vram_bytes = self._read()
            self.peak_ram_bytes = _larger(self.peak_ram_bytes, self.ram_bytes)
            self.peak_vram_bytes = _larger(self.peak_vram_bytes, self.vram_bytes)


def _larger(a: int | None, b: int | None) -> int | None:
    return a if b is None else b if a is None else max(a, b)


def check_prompt_text(text: str, *, hint: str = "there is nothing to answer") -> None:
    """The one empty-prompt rule; each edge adds what its user can do about it (hint)."""
    if not text.strip():
        raise UserError(f"The prompt is empty: {hint}.")


def check_prompt_fits(
    n_prompt: int, n_ctx: int, *, advice: str = "shorten it, or load the model with a larger --n-ctx"
) -> None:
    """The one prompt-length rule: a prompt must leave room in the context for at least one new token (n_ctx 0:
    not known here, as for a remote engine, which checks its own)."""
    if n_prompt == 0:
        check_prompt_text("")
    if n_ctx and n_prompt >= n_ctx:
        raise UserError(f"The prompt is {n_prompt} tokens, more than the context of {n_ctx} holds: {advice}.")


class _Thinking:
    """The reasoning split of one reply (localrun.engine.reasoning) and the end of its block: the model's own
    end marker, or the thinking budget, where the engine writes the model's end marker itself and generation
    goes on after it (the block is never left open, and no marker reaches the content). A grammar that waits
    for the thinking to end (a schema or tool call after thinking) applies from there."""

    def __init__(self, plan: ReasoningPlan, backend: Backend, stats: _Stats, detok: IncrementalDetokenizer) -> None:
        self.plan, self.backend, self.stats, self.detok = plan, backend, stats, detok
        self.split = ReasoningSplitter(plan.format, starts_open=plan.starts_open)
        self.grammar_pending = plan.grammar_after is not None

    def params(self, params: SamplingParams) -> SamplingParams:
        """The settings of the next stretch: the waiting grammar once the block has ended."""
        if self.grammar_pending and not self.split.thinking and self.split.state != "before":
            self.grammar_pending = False
            return params.replace(grammar=self.plan.grammar_after)
        return params

    def over_budget(self) -> bool:
        budget = self.plan.budget
        return self.split.thinking and budget is not None and self.stats.reasoning_tokens >= budget

    def feed(self, piece: str) -> tuple[str, str, list[int] | None]:
        """(reasoning, content, restart) for one token's text. restart is None, or the ids to add to the
        context before generating on: the end marker when the budget ended the block, [] when the model ended
        it itself and a grammar waits for that."""
        split, state = self.split, self.split.state
        reasoning, content = split.feed(piece)
        if state == "thinking" or (state == "before" and split.opened):
            self.stats.reasoning_tokens += 1
        if state in ("before", "thinking") and split.opened and not split.thinking:
            self.stats.end_thinking()
            return reasoning, content, [] if self.grammar_pending else None
        if self.over_budget():
            more, closing = self.close()
            return reasoning + more, content, closing
        return reasoning, content, None

    def close(self) -> tuple[str, list[int]]:
        """End the block now: the thought's held tail, and the end marker's ids."""
        marker = self.plan.format.closing()
        held, _ = self.split.feed(self.detok.flush())
        tail, _ = self.split.feed(marker)
        self.stats.end_thinking(cut=True)
        return held + tail, continuation_ids(self.backend, marker)

    def tail(self, piece: str) -> tuple[str, str]:
        reasoning, content = self.split.feed(piece)
        more, rest = self.split.flush()
        return reasoning + more, content + rest


def continuation_ids(backend: Backend, text: str) -> list[int]:
    """Token ids of text written after other text (no BOS: the tokenizer's ids for "" are taken off)."""
    ids = backend.tokenize(text)
    lead = backend.tokenize("")
    return ids[len(lead) :] if lead and ids[: len(lead)] == lead else ids


def stream_generate(
    backend: Backend,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    cancel: threading.Event | None = None,
    drafter: Drafter | Callable[[Sequence[int]], Sequence[int]] | None = None,
    reasoning: ReasoningPlan | None = None,
) -> Iterator[GenerationEvent]:
    """Generate from prompt ids, yielding one GenerationEvent per token; the last has finish_reason.

    A reply that keeps repeating one span (localrun.engine.repetition) ends with finish reason "repetition"
    unless params.loop_guard is off (or ignore_eos on). TTFT is first token out minus the call. Stop early with `cancel.set()` (a final event with
    finish reason "cancelled" follows) or by closing the iterator; both leave the model usable.
    drafter defaults to the backend's own (loaded with --draft or --lookup); pass one to override.
    reasoning splits a thinking model's block from its answer (events' reasoning and text) and bounds it;
    max_tokens counts both, as OpenAI's does.
    """
    drafter = as_drafter(drafter if drafter is not None else getattr(backend, "drafter", None))
    timed = _TimedDrafter(drafter) if drafter is not None else None
    # A server-side backend (a remote engine) counts, checks the context and stops at max_tokens itself: its
    # prompt is a handle, its steps are streamed pieces, and its counts come with its end (ServerCounts).
    server_side = getattr(backend, "server_side", False)
    memory = RemoteMemory(backend.read_memory) if server_side else None
    stats = _Stats(0 if server_side else len(prompt_ids), timed, memory)
    specials = reasoning is not None and reasoning.format.specials
    detok = IncrementalDetokenizer(
        getattr(backend, "detokenize_special", backend.detokenize) if specials else backend.detokenize
    )
    thinking = _Thinking(reasoning, backend, stats, detok) if reasoning is not None else None
    stops = StopMatcher(params.stop)
    # the loop guard (finish reason "repetition"); ignore_eos asks for a fixed count of tokens, loops or not
    guard = params.loop_guard and not params.ignore_eos
    loops = LoopDetector(lambda t: backend.detokenize([t])) if guard else None
    context = list(prompt_ids)  # what the model has seen: the prompt, its tokens and any end marker we wrote
    opening = ""
    if thinking is not None and thinking.over_budget():  # a budget of 0 on a prompt that opened the block
        opening, closing = thinking.close()
        context += closing
    steps = backend.generate_tokens(list(context), thinking.params(params) if thinking else params, timed)
    finish, error, stop_hit = None, None, False
    try:
        if not server_side:
            check_prompt_fits(len(prompt_ids), backend.report.n_ctx)
        while finish is None:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            try:
                step = next(steps)
            except StopIteration as end:
                done = end.value
                finish = stats.server_counts(done) if isinstance(done, ServerCounts) else done or "stop"
                break
            stats.on_token(step)
            context.append(step.token_id)
            piece = detok.add(step.token_id)
            thought, restart = "", None
            if thinking is not None:
                thought, piece, restart = thinking.feed(piece)
                thought, opening = opening + thought, ""
                stats.reasoning_parts.append(thought)
            text, hit = stops.feed(piece)
            stats.text_parts.append(text)
            if hit:
                finish, stop_hit = "stop", True
            elif loops is not None and loops.feed(step.token_id):
                finish = "repetition"
            elif not server_side and stats.generated >= params.max_tokens:
                finish = "length"
            yield stats.event(text, (step.token_id,), (step.from_draft,), thought)
            if restart is not None and finish is None:  # generation goes on after the block's end
                steps.close()
                context += restart
                if len(context) + 1 >= backend.report.n_ctx:
                    finish = "length"
                    break
                left = params.max_tokens - stats.generated
                steps = backend.generate_tokens(list(context), thinking.params(params).replace(max_tokens=left), timed)
    except UserError as exc:  # the user's mistake (prompt too long, ...): its sentence as it is
        finish, error = "error", str(exc)
    except Exception as exc:  # a backend failure ends the stream with an error event, not a traceback
        finish, error = "error", f"{type(exc).__name__}: {exc}"
    finally:
        steps.close()
    tail, thought = "", ""
    if not stop_hit:  # text held back for UTF-8 or a possible stop string is released now
        piece = detok.flush()
        if thinking is not None:
            thought, piece = thinking.tail(piece)
            stats.reasoning_parts.append(thought)
        tail, stop_hit = stops.feed(piece)
        tail += "" if stop_hit else stops.flush()
        finish = "stop" if stop_hit else finish
    stats.text_parts.append(tail)
    stats.memory.sample(force=True)
    summary = stats.summary(finish, backend, error)
    yield stats.event(tail, (), (), thought, finish_reason=finish, summary=summary)


def generate(backend: Backend, prompt_ids: Sequence[int], params: SamplingParams, **kwargs) -> GenerationSummary:
    """Run to the end and return the summary (its .text is the whole reply)."""
    summary = None
    for event in stream_generate(backend, prompt_ids, params, **kwargs):
        summary = event.summary or summary
    assert summary is not None
    return summary
