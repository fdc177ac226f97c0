"""One llama.cpp context holding several sequences (slots), each with its own KV stream: the rows the
scheduler (localrun.engine.scheduler) decodes together in one llama_decode per step.

Slot s is llama.cpp's sequence s. The cache is not unified: each slot owns n_ctx_slot cells, so one long chat
cannot take the cells of another, and attention reads only the slot's own stream (as `llama-server -np N`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from localrun.backends.llama_ctx import LlamaContext, llama_cpp, put_tokens
from localrun.engine.prompt_cache import common_prefix
from localrun.engine.speculative import MAX_VERIFY

if TYPE_CHECKING:
    import numpy as np

    from localrun.backends.llama_ctx import LlamaModel


class LlamaSlots(LlamaContext):
    """A context with n_slots sequences of n_ctx_slot tokens; knows which tokens each slot's cache holds."""

    def __init__(self, model: LlamaModel, *, n_slots: int, n_ctx_slot: int, **context: Any) -> None:
        """context: LlamaContext's keyword arguments (n_threads, flash_attn, kv_type, n_batch, n_ubatch)."""
        super().__init__(model, n_ctx=n_slots * n_ctx_slot, n_seq=n_slots, **context)
        self.n_slots = n_slots
        self.n_ctx_slot = llama_cpp.llama_n_ctx(self.ctx) // n_slots
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]  # what each slot's cache holds
        self._batch = self.new_batch(self.n_batch)

    def common_prefix(self, slot: int, ids: Sequence[int]) -> int:
        """How many leading tokens of ids the slot's cache holds already."""
        return common_prefix(self.tokens[slot], ids)

    def state_size(self, slot: int) -> int:
        """The bytes save_state would give for the slot (its cells in every layer's cache)."""
        return llama_cpp.llama_state_seq_get_size_ext(self.ctx, slot, 0)

    def save_state(self, slot: int, size: int) -> bytearray:
        """A copy of the slot's KV state (size: state_size's answer), for the host-RAM prompt cache."""
        import ctypes

        state = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data_ext(
            self.ctx, (ctypes.c_uint8 * size).from_buffer(state), size, slot, 0
        )
        del state[written:]
        return state

    def load_state(self, slot: int, tokens: Sequence[int], state: bytearray) -> bool:
        """Put a saved state (of tokens) into the slot in place of what it holds; False leaves the slot empty."""
        import ctypes

        llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
        self.tokens[slot] = []
        buffer = (ctypes.c_uint8 * len(state)).from_buffer(state)
        if llama_cpp.llama_state_seq_set_data_ext(self.ctx, buffer, len(state), slot, 0) != len(state):
            llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
            return False
        self.tokens[slot] = list(tokens)
        return True

    def trim(self, slot: int, n: int) -> int:
        """Forget the slot's cached tokens from position n on; returns how many stay."""
        if n >= len(self.tokens[slot]):
            return len(self.tokens[slot])
        if not llama_cpp.llama_memory_seq_rm(self.mem, slot, n, -1):  # recurrent models: all or nothing
            llama_cpp.llama_memory_seq_rm(self.mem, slot, -1, -1)
            n = 0
        del self.tokens[slot][n:]
        return n

    def decode(self, rows: Sequence[tuple[int, Sequence[int], bool]]) -> list[int]:
        """One llama_decode of (slot, tokens, logits for the last one) rows, each after its slot's cache.
        Returns, per row, the batch position of its logits (-1 where none was asked for)."""
        n = 0
        out: list[int] = []
        for slot, ids, wants in rows:
            n = self._put(n, slot, ids, every=False)
            if wants:
                self._batch.logits[n - 1] = 1
                out.append(n - 1)  # llama_get_logits_ith and llama_sampler_sample take the batch position
            else:
                out.append(-1)
        self._run(n, [(slot, ids) for slot, ids, _ in rows])
        return out

    def decode_all(self, slot: int, ids: Sequence[int]) -> None:
        """One llama_decode of ids after the slot's cache, with logits for every one (a speculative verify
        batch): row i's logits are at batch position i."""
        self._run(self._put(0, slot, ids, every=True), [(slot, ids)])

    def _put(self, n: int, slot: int, ids: Sequence[int], *, every: bool) -> int:
        """Write ids into the batch from position n on, after the slot's cache; returns the next position."""
        if n + len(ids) > self.n_batch:
            raise ValueError(f"a step of {n + len(ids)} tokens > n_batch {self.n_batch}")
        pos0 = len(self.tokens[slot])
        return put_tokens(self._batch, n, ids, pos0=pos0, seq=slot, logits_from=0 if every else len(ids))

    def _run(self, n: int, rows: Sequence[tuple[int, Sequence[int]]]) -> None:
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for slot, ids in rows:
            self.tokens[slot].extend(ids)


class SlotSequence:
    """One slot of a LlamaSlots context a step at a time (speculative.TargetSequence), for the scheduler's
    speculative rounds: it samples with the request's SamplerChain, which follows the text itself."""

    max_verify = MAX_VERIFY

    def __init__(self, slots: LlamaSlots, slot: int, params: Any, chain: Any, breakers: frozenset[int]) -> None:
        self.slots, self.slot, self.params, self.chain, self.breakers = slots, slot, params, chain, breakers
        self.n_ctx, self.n_vocab = slots.n_ctx_slot, slots.n_vocab
        self._rows = 1  # rows the last decode gave logits for (row -1 is the last)

    @property
    def n_cached(self) -> int:
        return len(self.slots.tokens[self.slot])

    def decode(self, ids: Sequence[int]) -> None:
        self.slots.decode_all(self.slot, ids)
        self._rows = len(ids)

    def trim(self, n: int) -> None:
        self.slots.trim(self.slot, n)

    def is_eog(self, token: int) -> bool:
        return self.slots.is_eog(token)

    def _position(self, row: int) -> int:
        return row % self._rows

    def choose(self, row: int, history: Sequence[int]) -> int:
        return self.chain.sample(self._position(row))

    def probs(self, row: int, history: Sequence[int]) -> np.ndarray:
        from localrun.engine.speculative import filtered_probs

        logits = self.slots.logits(self._position(row))
        return filtered_probs(logits, self.params, history, breakers=self.breakers)

    def accept(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.chain.accept(token)
