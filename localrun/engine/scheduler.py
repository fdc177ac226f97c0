"""Continuous batching: one thread owns a multi-sequence llama.cpp context and decodes every running
sequence together, one llama_decode per step.

Each step has one row per generating sequence (its last sampled token) and then chunks of prompts still
being evaluated, under a token budget (chunked prefill), so a long prompt arriving does not freeze the
streams already running for longer than one chunk. A sequence joins at the next step and leaves when it
ends (end of generation, its token budget, or its consumer closing it: Stop, a stop string, a client gone).
A new sequence takes the free slot whose cache shares the longest prefix with its prompt, so a chat's next
turn or a repeated system prompt is not evaluated again (the reused count is its `cached_tokens`); when no
slot shares half of the prompt, it takes the slot idle longest, and the other slots keep their chats. What
that slot held goes to the host-RAM prompt cache (engine.prompt_cache) first, and a prompt the cache continues
further than the slot does is copied back in from there.

The consumer side is a generator per request (`Scheduler.stream`), so stream_generate's detokenizing, stop
strings, loop guard and timing stay one code path for batched and single-sequence backends.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from localrun.engine.events import TokenStep
from localrun.engine.prompt_cache import PromptCache

PREFILL_CHUNK = 512  # prompt tokens per step at most: the longest a running stream waits for a newcomer


@dataclass(eq=False)
class _Seq:
    prompt: list[int]
    chain: Any  # the sequence's own sampler chain (penalties, grammar, seed)
    max_new: int
    ignore_eos: bool
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    slot: int = -1
    done: int = 0  # prompt tokens in the slot's cache
    cached: int = 0  # of those, the ones reused from an earlier request
    generated: int = 0
    last: int | None = None  # the sampled token not decoded yet
    closed: bool = False
    draft: Any = None  # a Speculation: this request drafts when it runs alone
    text: list[int] = field(default_factory=list)  # prompt and generated tokens (what a drafter continues)


@dataclass(frozen=True, slots=True)
class Speculation:
    """What a request needs to draft: its drafter (speculative.Drafter), its settings, the generator its
    sampled verification draws from, and DRY's breaker ids (for the numpy distributions)."""

    drafter: Any
    params: Any
    rng: Any
    breakers: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class _End:
    reason: str | None  # None: end of generation ("stop"); "length": the slot's context is full
    error: BaseException | None = None


class Scheduler:
    """Sequences in, one batched decode per step, TokenSteps out to each sequence's generator."""

    def __init__(self, slots: Any, *, prefill_chunk: int = PREFILL_CHUNK, cache: PromptCache | None = None) -> None:
        self.slots = slots
        self.cache = cache if cache is not None and cache.limit_bytes > 0 else None
        self.prefill_chunk = min(prefill_chunk, slots.n_batch)
        self._lock = threading.Condition()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._free = list(range(slots.n_slots))
        self._used_at = [0.0] * slots.n_slots  # when each slot last ended a sequence (LRU among equals)
        self._closing = False
        self.steps = 0
        self.last_batch = 0  # tokens in the last decode step (each generating sequence's one, prompt chunks)
        self.last_sequences = 0  # sequences in it
        self.sequence_rows = 0  # sequences summed over every step: over self.steps, the mean batch
        self.cached_tokens = 0  # summed over every request so far (the /metrics counter)
        self._thread = threading.Thread(target=self._loop, name="localrun-scheduler", daemon=True)
        self._thread.start()

    # -- the consumer side ------------------------------------------------------------------------

    def stream(
        self, prompt: Sequence[int], chain: Any, *, max_new: int, ignore_eos: bool, draft: Speculation | None = None
    ) -> Iterator[TokenStep]:
        """The sequence's tokens; returns "length" when its slot is full. Closing it frees its slot at the next
        step. The chain is the scheduler's from here on (it closes it). With draft, the sequence runs
        speculative rounds while it is the only one generating."""
        seq = _Seq(list(prompt), chain, max_new, ignore_eos, draft=draft, text=list(prompt))
        with self._lock:
            self._waiting.append(seq)
            self._lock.notify()
        try:
            while True:
                item = seq.out.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return item.reason
                yield item
        finally:
            with self._lock:
                seq.closed = True
                self._lock.notify()

    def status(self) -> dict[str, int]:
        with self._lock:
            return {
                **(self.cache.status() if self.cache is not None else {}),
                "slots": self.slots.n_slots,
                "slots_busy": len(self._running),
                "waiting": len(self._waiting),
                "batch_tokens": self.last_batch,
                "batch_size": self.last_sequences,
                "decode_steps": self.steps,
                "decode_sequences": self.sequence_rows,
                "cached_tokens": self.cached_tokens,
            }

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # -- the scheduler thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._retire_closed()
                self._admit()
                while not self._running and not self._closing:
                    self._lock.wait()
                    self._retire_closed()
                    self._admit()
                if self._closing:
                    for seq in self._running + self._waiting:
                        self._finish(seq, _End(None, RuntimeError("The model is being unloaded.")))
                    return
                running = list(self._running)
                alone = len(running) == 1 and not self._waiting
            if alone and self._speculate(running[0]):
                continue
            self._step(running)

    def _admit(self) -> None:
        """Give waiting sequences free slots, the one with the longest shared prefix first (lock held)."""
        while self._waiting and self._free:
            seq = self._waiting.pop(0)
            if seq.closed:
                seq.chain.close()
                continue
            best = self._pick_slot(seq.prompt)
            self._free.remove(best)
            if self.cache is not None:
                self._swap(best, seq.prompt)
            keep = min(self.slots.common_prefix(best, seq.prompt), len(seq.prompt) - 1)
            seq.slot, seq.done = best, self.slots.trim(best, keep)
            seq.cached = seq.done
            self.cached_tokens += seq.cached
            self._running.append(seq)

    def _swap(self, slot: int, prompt: list[int]) -> None:
        """Before a prompt takes the slot: keep what the slot would lose in the prompt cache, and put back a
        cached state that continues the prompt further than the slot does (lock held; copies take ms)."""
        held, shared = self.slots.tokens[slot], self.slots.common_prefix(slot, prompt)
        found = self.cache.take(prompt, shared)  # first: saving the slot could push it out
        if len(held) > shared + 1:  # the prompt would cut it (its last token is evaluated again in any case)
            size = self.slots.state_size(slot)
            if self.cache.wants(held, size):
                self.cache.put(list(held), self.slots.save_state(slot, size))
        if found is not None:
            self.slots.load_state(slot, *found)  # a state that does not go back leaves the slot empty

    def _pick_slot(self, prompt: list[int]) -> int:
        """The free slot sharing the longest prefix with the prompt when that is at least half of it (a chat's
        next turn, a long system prompt), else the one idle longest, so other chats keep their caches."""
        shared = {s: self.slots.common_prefix(s, prompt) for s in self._free}
        best = max(self._free, key=lambda s: (shared[s], -self._used_at[s]))
        if shared[best] * 2 >= len(prompt):
            return best
        return min(self._free, key=lambda s: self._used_at[s])

    def _retire_closed(self) -> None:
        for seq in [s for s in self._running if s.closed]:
            self._finish(seq, None)

    def _finish(self, seq: _Seq, end: _End | None) -> None:
        """Take a sequence out (lock held); its slot keeps the cache for the next request's prefix."""
        if seq in self._running:
            self._running.remove(seq)
            self._free.append(seq.slot)
            self._used_at[seq.slot] = time.monotonic()
        elif seq in self._waiting:
            self._waiting.remove(seq)
        if seq.chain is not None:
            seq.chain.close()
            seq.chain = None
        if end is not None:
            seq.out.put(end)

    def _step(self, running: list[_Seq]) -> None:
        """One llama_decode: a row per generating sequence, then prompt chunks within the budget."""
        rows: list[tuple[int, list[int], bool]] = []
        members: list[_Seq] = []
        for seq in running:
            if seq.last is not None:
                rows.append((seq.slot, [seq.last], True))
                members.append(seq)
        budget = max(self.prefill_chunk, len(rows) + 1) - len(rows)
        for seq in running:
            if seq.last is None and budget > 0:
                part = seq.prompt[seq.done : seq.done + budget]
                rows.append((seq.slot, part, seq.done + len(part) == len(seq.prompt)))
                members.append(seq)
                budget -= len(part)
        try:
            at = self.slots.decode(rows)
        except Exception as exc:  # a failed step fails its sequences; their slots start empty
            with self._lock:
                for seq in members:
                    self.slots.trim(seq.slot, 0)
                    self._finish(seq, _End(None, exc))
            return
        self._count_step(sum(len(r[1]) for r in rows), len(rows))
        ended: list[tuple[_Seq, _End]] = []
        for seq, (_, ids, _wants), i in zip(members, rows, at, strict=True):
            if seq.last is None:
                seq.done += len(ids)
                if i < 0:
                    continue  # more of its prompt next step
                first = True
            else:
                first = False
            token = seq.chain.sample(i)
            end = self._emit(seq, token, first)
            if end is not None:
                ended.append((seq, end))
        if ended:
            with self._lock:
                for seq, end in ended:
                    self._finish(seq, end)

    def _count_step(self, tokens: int, sequences: int) -> None:
        """One decode step's figures (status(), /metrics): its tokens and its sequences."""
        self.steps += 1
        self.last_batch, self.last_sequences = tokens, sequences
        self.sequence_rows += sequences

    def _speculate(self, seq: _Seq) -> bool:
        """A speculative round for the one sequence generating, when it drafts and its drafter proposes; False:
        no round (a plain batched step follows). With several sequences, rows of other sequences fill the step
        that drafting would fill, so drafting waits until a sequence is alone again (llama.cpp users measured
        4x slower drafting with 2 slots); the drafter's own cost model decides while it is alone."""
        from localrun.backends.llama_slots import SlotSequence
        from localrun.engine.speculative import next_draft, verify_round

        spec = seq.draft
        if spec is None or seq.last is None or seq.closed:
            return False
        target = SlotSequence(self.slots, seq.slot, spec.params, seq.chain, spec.breakers)
        try:
            draft = next_draft(target, spec.drafter, seq.text, spec.params, spec.rng, left=seq.max_new - seq.generated)
            if not draft.tokens:
                return False
            n_ok, following = verify_round(target, seq.text, seq.last, draft, spec.params, spec.rng)
        except Exception as exc:  # a failed round fails its sequence, as a failed step does
            with self._lock:
                self.slots.trim(seq.slot, 0)
                self._finish(seq, _End(None, exc))
            return True
        self._count_step(len(draft.tokens) + 1, 1)
        kept = [*draft.tokens[:n_ok], following]
        end = None
        for i, token in enumerate(kept):
            opens = len(draft.tokens) if i == 0 else 0
            end = self._emit(seq, token, False, from_draft=i < n_ok, drafted=opens)
            if end is not None:
                break
        if end is not None:
            with self._lock:
                self._finish(seq, end)
        return True

    def _emit(self, seq: _Seq, token: int, first: bool, *, from_draft: bool = False, drafted: int = 0) -> _End | None:
        if not seq.ignore_eos and self.slots.is_eog(token):
            return _End(None)
        prefill = len(seq.prompt) - seq.cached if first else None
        seq.out.put(TokenStep(token, prefill_tokens=prefill, from_draft=from_draft, drafted=drafted))
        seq.generated += 1
        seq.text.append(token)
        seq.last = token
        in_cache = len(seq.prompt) + seq.generated - 1
        if in_cache + 1 >= self.slots.n_ctx_slot:
            return _End("length")
        if seq.generated >= seq.max_new:
            return _End(None)  # the consumer stops at max_tokens itself, on this same token
        return None
