"""A llama.cpp context driven directly through the C API: our own decode loop's building blocks.

`LlamaRunner` owns a context and the bookkeeping of which tokens sit in its KV cache (sequence 0),
and decodes with preallocated batches, asking for logits only where they are needed. `LlamaSequence` is
that sequence a step at a time for the shared speculative loops. `SamplerChain` is llama.cpp's own
sampler chain, built once per request. No llama_cpp.Llama: its constructor
cannot ask for flash attention "auto", and its generate() does per-token work we do not need. Nor
llama_cpp._internals' model and context classes: that module imports numpy, which a plain chat does not
otherwise need (about 0.06 s of a cold start).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from localrun.engine.penalties import DRY_BREAKERS, PENALTY_LAST_N, uses_counts, uses_dry
from localrun.engine.speculative import MAX_VERIFY
from localrun.llama_lib import llama_cpp as _llama_cpp
from localrun.settings import SamplingParams

if TYPE_CHECKING:
    import numpy as np

llama_cpp = _llama_cpp()

FLASH_ATTN_TYPES = {"auto": -1, "off": 0, "on": 1}  # LLAMA_FLASH_ATTN_TYPE_*


def open_model(path: str, *, n_gpu_layers: int = 0, vocab_only: bool = False) -> LlamaModel:
    """A llama.cpp model, quietly; raises ValueError on failure."""
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's log goes to a Python callback: errors only
    llama_cpp.llama_backend_init()  # cheap and idempotent (timer and fp16 tables)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
    params.vocab_only = vocab_only
    return LlamaModel(path, params)


class LlamaModel:
    """A loaded llama.cpp model (weights, or only the vocabulary) and its tokenizer."""

    def __init__(self, path: str, params) -> None:
        self.model = None
        self._free = llama_cpp.llama_model_free  # held: at interpreter exit the module may be gone first
        if not os.path.exists(path):
            raise ValueError(f"Model path does not exist: {path}")
        self.model = llama_cpp.llama_model_load_from_file(path.encode("utf-8"), params)
        if not self.model:
            self.model = None
            raise ValueError(f"Failed to load model from file: {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self._local = threading.local()

    def token_bos(self) -> int:
        return llama_cpp.llama_vocab_bos(self.vocab)

    def token_eos(self) -> int:
        return llama_cpp.llama_vocab_eos(self.vocab)

    def add_bos_token(self) -> bool:
        return llama_cpp.llama_vocab_get_add_bos(self.vocab)

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        size = len(text) + 2  # at most one token per byte, plus BOS and EOS
        for _ in range(2):
            ids = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, text, len(text), ids, size, add_bos, special)
            if n >= 0:
                return ids[:n]
            size = -n  # too small: -n is what it needs
        raise RuntimeError(f"llama.cpp could not tokenize {len(text)} bytes of text")

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        # a buffer per thread: with several slots, requests detokenize on threads of their own
        piece = getattr(self._local, "piece", None)
        if piece is None:
            piece = self._local.piece = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, piece, len(piece), 0, special)
        if n < 0:  # a piece longer than the buffer: grow it
            piece = self._local.piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, piece, len(piece), 0, special)
        return piece.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The tokens' text; a leading space after BOS is dropped, as llama-cpp-python does."""
        out = b"".join(self.token_to_piece(t, special) for t in tokens)
        if tokens and tokens[0] == self.token_bos() and out[:1] == b" ":
            return out[1:]
        return out

    def close(self) -> None:
        if getattr(self, "model", None) is not None:
            self._free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()


class LlamaContext:
    """A llama.cpp context on a loaded model, for n_seq sequences: its handles, logits rows, the end-of-generation
    test, and freeing it with the batches it owns. LlamaRunner (one sequence) and LlamaSlots build on it."""

    def __init__(
        self,
        model,
        *,
        n_ctx: int,
        n_seq: int = 1,
        n_threads: int,
        flash_attn: str = "auto",
        kv_type: int = 1,
        n_batch: int = 2048,
        n_ubatch: int = 512,
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = min(n_ctx, n_batch)
        params.n_ubatch = min(params.n_batch, n_ubatch)
        params.n_seq_max = n_seq
        if n_seq > 1:
            params.kv_unified = False  # each sequence owns n_ctx / n_seq cells
        params.n_threads = params.n_threads_batch = n_threads
        params.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        params.type_k = params.type_v = kv_type
        params.no_perf = True
        self.model = model  # held: the model must outlive its context
        self._batches: list = []  # llama_batch_init batches, freed with the context
        self._free_batch, self._free_ctx = llama_cpp.llama_batch_free, llama_cpp.llama_free  # as in LlamaModel
        self.ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not self.ctx:
            self.ctx = None
            raise ValueError("llama.cpp could not create a context (out of memory?)")
        self.vocab = model.vocab
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)

    def new_batch(self, n_tokens: int):
        """A batch of up to n_tokens (one sequence id each), freed with the context."""
        batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
        self._batches.append(batch)
        return batch

    def logits(self, i: int = -1) -> np.ndarray:
        """A view (no copy) of the logits of output row i of the last decode."""
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def is_eog(self, token: int) -> bool:
        return llama_cpp.llama_vocab_is_eog(self.vocab, token)

    def close(self) -> None:
        for batch in getattr(self, "_batches", ()):  # getattr: __del__ after a failed __init__
            self._free_batch(batch)
        self._batches = []
        if getattr(self, "ctx", None) is not None:
            self._free_ctx(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        self.close()


def put_tokens(batch, at: int, ids: Sequence[int], *, pos0: int, seq: int = 0, logits_from: int = 0) -> int:
    """Write ids into a llama_batch from row at on: positions pos0.., sequence seq, logits asked for the ids from
    index logits_from on (len(ids): none). Returns the next free row; the caller sets batch.n_tokens."""
    for j, token in enumerate(ids):
        k = at + j
        batch.token[k] = token
        batch.pos[k] = pos0 + j
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = seq
        batch.logits[k] = 1 if j >= logits_from else 0
    return at + len(ids)


class LlamaRunner(LlamaContext):
    """One sequence: decodes into the context and knows which tokens its KV cache holds. The keyword
    arguments are LlamaContext's (n_threads, flash_attn, kv_type, n_batch, n_ubatch)."""

    def __init__(self, model, *, n_ctx: int, max_verify: int = MAX_VERIFY, **context: Any) -> None:
        super().__init__(model, n_ctx=n_ctx, **context)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.tokens: list[int] = []  # what the KV cache holds, positions 0..n_cached-1 (no numpy: cold start)
        self._live_at = -1  # n_cached when the last decode's last logits row was made
        self._one = (llama_cpp.llama_token * 1)()
        self._one_batch = llama_cpp.llama_batch_get_one(self._one, 1)  # reused for every decode step
        self._chunk = (llama_cpp.llama_token * self.n_batch)()
        self.max_verify = max_verify
        self._verify = self.new_batch(max_verify)

    @property
    def logits_live(self) -> bool:
        """Whether the last logits row belongs to the last cached token."""
        return self._live_at == self.n_cached

    @property
    def n_cached(self) -> int:
        return len(self.tokens)

    def cached(self) -> list[int]:
        return list(self.tokens)

    def reuse_prefix(self, ids: Sequence[int]) -> int:
        """Keep the longest cached prefix of ids (at most len(ids) - 1, so the last token is evaluated
        again and gives fresh logits), drop the rest; returns how many tokens are kept."""
        from localrun.engine.prompt_cache import common_prefix

        keep = min(common_prefix(self.tokens, ids), len(ids) - 1)
        self.trim(keep)
        return self.n_cached

    def trim(self, n: int) -> None:
        """Forget cached tokens from position n on."""
        if n >= self.n_cached:
            return
        if not llama_cpp.llama_memory_seq_rm(self.mem, 0, n, -1):  # recurrent models: all or nothing
            llama_cpp.llama_memory_clear(self.mem, True)
            n = 0
        del self.tokens[n:]

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)
        self.tokens.clear()

    def eval(self, ids: Sequence[int]) -> None:
        """Decode tokens after the cache in n_batch chunks; logits for the last one only."""
        for start in range(0, len(ids), self.n_batch):
            part = ids[start : start + self.n_batch]
            n = len(part)
            self._chunk[:n] = part
            self._decode(llama_cpp.llama_batch_get_one(self._chunk, n), part)

    def step(self, token: int) -> None:
        """Decode one token (the per-token path: one ctypes store and one call)."""
        self._one[0] = token
        rc = llama_cpp.llama_decode(self.ctx, self._one_batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.tokens.append(token)
        self._live_at = len(self.tokens)

    def eval_all(self, ids: Sequence[int]) -> None:
        """Decode a few tokens with logits for every one of them (a speculative verify batch)."""
        if len(ids) > self.max_verify:
            raise ValueError(f"verify batch of {len(ids)} > {self.max_verify}")
        self._verify.n_tokens = put_tokens(self._verify, 0, ids, pos0=self.n_cached)
        self._decode(self._verify, ids)

    def _decode(self, batch: llama_cpp.llama_batch, ids: Sequence[int]) -> None:
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.tokens.extend(ids)
        self._live_at = len(self.tokens)


class LlamaSequence:
    """Sequence 0 of a LlamaRunner for one request, a step at a time (speculative.TargetSequence and DraftSequence). As a
    target it samples with the request's SamplerChain; as a draft model it needs none (greedy is the
    plain argmax, a sampled draft's distribution speculative.filtered_probs)."""

    def __init__(
        self,
        runner: LlamaRunner,
        params: SamplingParams,
        *,
        chain: SamplerChain | None = None,
        breakers: frozenset[int] = frozenset(),
    ) -> None:
        self.runner, self.params, self.chain, self.breakers = runner, params, chain, breakers
        self.n_ctx, self.max_verify, self.n_vocab = runner.n_ctx, runner.max_verify, runner.n_vocab

    @property
    def n_cached(self) -> int:
        return self.runner.n_cached

    def prefill(self, ids: Sequence[int]) -> int:
        """0 when the cache holds exactly ids and its last logits are still live."""
        runner = self.runner
        if runner.logits_live and runner.n_cached == len(ids) and runner.tokens == list(ids):
            return 0
        keep = runner.reuse_prefix(ids)
        runner.eval(ids[keep:])
        return len(ids) - keep

    def decode(self, ids: Sequence[int]) -> None:
        if len(ids) == 1:
            self.runner.step(ids[0])
        else:
            self.runner.eval_all(ids)

    def trim(self, n: int) -> None:
        self.runner.trim(n)

    def is_eog(self, token: int) -> bool:
        return self.runner.is_eog(token)

    def choose(self, row: int, history: Sequence[int]) -> int:
        return self.chain.sample(row)  # the chain follows the text itself

    def probs(self, row: int, history: Sequence[int]) -> np.ndarray:
        from localrun.engine.speculative import filtered_probs

        return filtered_probs(self.runner.logits(row), self.params, history, breakers=self.breakers)

    def greedy(self, row: int, history: Sequence[int], *, confidence: bool) -> tuple[int, float]:
        import numpy as np

        logits = self.runner.logits(row)
        token = int(np.argmax(logits))
        # softmax(logits)[token], without building the whole distribution twice
        return token, float(1.0 / np.exp(logits - logits[token]).sum()) if confidence else 0.0

    def accept(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.chain.accept(token)


class SamplerChain:
    """llama.cpp's sampler chain for one request: penalties (repeat, frequency, presence), DRY, grammar,
    top-k, top-p, min-p, temperature, then a seeded draw (or greedy at temperature 0), llama.cpp's order.
    speculative.filtered_probs recomputes the same distribution in numpy."""

    def __init__(self, runner: LlamaRunner, params: SamplingParams, *, seed: int, history: Sequence[int] = ()) -> None:
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._ctx = runner.ctx
        if uses_counts(params):
            penalties = llama_cpp.llama_sampler_init_penalties(
                runner.n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            )
            self._add(penalties, history[-PENALTY_LAST_N:])  # the prompt's tail counts as recent text
        if uses_dry(params):
            self._add(dry_sampler(runner.vocab, params), history[-params.dry_penalty_last_n :])
        if params.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(runner.vocab, params.grammar.encode(), b"root")
            if not grammar:
                self.close()
                from localrun.errors import UserError

                raise UserError("The grammar could not be parsed: check its GBNF syntax (it needs a root rule).")
            self._add(grammar)
        # plain greedy (nothing else in the chain) is an argmax over the logits row: llama_sampler_sample would
        # first copy every logit into a candidate array, a cost that grows with the vocabulary (262k on Gemma 3)
        self._n_vocab = runner.n_vocab
        self._argmax = params.temperature <= 0 and llama_cpp.llama_sampler_chain_n(self.chain) == 0
        if params.temperature <= 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
        else:
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
            self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, sampler, seen: Sequence[int] = ()) -> None:
        for token in seen:
            llama_cpp.llama_sampler_accept(sampler, token)
        llama_cpp.llama_sampler_chain_add(self.chain, sampler)

    def sample(self, i: int = -1) -> int:
        """Pick a token from output row i of the last decode; the chain records it (penalties, grammar)."""
        if self._argmax:  # the first of the largest logits, as llama.cpp's greedy sampler picks
            import numpy as np

            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))
            return int(np.argmax(row))
        return llama_cpp.llama_sampler_sample(self.chain, self._ctx, i)

    def accept(self, token: int) -> None:
        """Record a token chosen elsewhere (speculative sampling) so penalties and grammar see it."""
        llama_cpp.llama_sampler_accept(self.chain, token)

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


def dry_sampler(vocab, params: SamplingParams):
    """llama.cpp's DRY sampler with its default sequence breakers."""
    breakers = (ctypes.c_char_p * len(DRY_BREAKERS))(*(b.encode() for b in DRY_BREAKERS))
    return llama_cpp.llama_sampler_init_dry(
        vocab,
        params.dry_multiplier,
        params.dry_base,
        params.dry_allowed_length,
        params.dry_penalty_last_n,
        breakers,
        len(DRY_BREAKERS),
    )
