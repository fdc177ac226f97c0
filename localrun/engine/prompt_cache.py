"""The host-RAM prompt cache: the KV state of prompts pushed out of their slots, kept to be put back.

A slot's cache holds one conversation. When a new request takes a slot that holds another conversation, that
conversation's KV state (llama_state_seq_get_data) is copied here first, and when a later request continues it,
the state is copied back into whichever slot it gets, instead of evaluating the prompt again. So more chats
than slots (UI tabs, saved chats reopened, agents with long system prompts) keep their prefix: copying the KV
of a few thousand tokens takes milliseconds, evaluating them takes seconds on a CPU.

The cache is bounded in bytes (its limit is counted in the model's planned memory: engine.plan), and the
oldest entries go first. An entry is a token list and its state; one whose tokens start another's is dropped as
covered, and an entry goes back to a slot at most once (the slot holds it then, and saves it again on leaving).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_TOKENS = 64  # shorter prompts are evaluated again faster than they are worth keeping
MIN_KEEP = 0.25  # an entry goes back only when the new prompt shares at least this share of it


@dataclass(slots=True)
class _Entry:
    tokens: list[int]
    state: bytearray


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share (a whole match, the usual case, is compared at C speed)."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """States of token prefixes, oldest first, within limit_bytes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = max(0, limit_bytes)
        self._entries: list[_Entry] = []
        self.restored = 0  # states taken back into a slot (the /metrics counter)

    @property
    def used_bytes(self) -> int:
        return sum(len(e.state) for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def wants(self, tokens: Sequence[int], size: int) -> bool:
        """Whether a state of size bytes for tokens would be kept (ask before copying it out of the context)."""
        if len(tokens) < MIN_TOKENS or size > self.limit_bytes:
            return False
        return not any(common_prefix(e.tokens, tokens) == len(tokens) for e in self._entries)

    def put(self, tokens: Sequence[int], state: bytearray) -> None:
        """Keep a state; entries it covers (their tokens start these) go, then the oldest until it fits."""
        if not self.wants(tokens, len(state)):
            return
        self._entries = [e for e in self._entries if common_prefix(e.tokens, tokens) < len(e.tokens)]
        while self._entries and self.used_bytes + len(state) > self.limit_bytes:
            self._entries.pop(0)
        self._entries.append(_Entry(list(tokens), state))

    def take(self, prompt: Sequence[int], have: int) -> tuple[list[int], bytearray] | None:
        """The entry sharing the longest prefix with prompt, when that is longer than the have tokens a slot
        already shares and at least MIN_KEEP of the entry; it leaves the cache (a slot holds it from now on)."""
        best, best_len = None, have
        for entry in self._entries:
            n = common_prefix(entry.tokens, prompt)
            if n > best_len and n >= MIN_KEEP * len(entry.tokens):
                best, best_len = entry, n
        if best is None:
            return None
        self._entries.remove(best)
        self.restored += 1
        return best.tokens, best.state

    def status(self) -> dict[str, int]:
        return {
            "prompt_cache_entries": len(self._entries),
            "prompt_cache_bytes": self.used_bytes,
            "prompt_cache_limit_bytes": self.limit_bytes,
            "prompt_cache_restored": self.restored,
        }
