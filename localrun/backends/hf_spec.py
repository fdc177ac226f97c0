"""Speculative decoding on the transformers backend: our own KV-cached loop around the model's forward
pass, so every token can say whether it came from the draft (transformers' assisted generation cannot),
with the drafters, schedule and acceptance rule shared with llama.cpp (localrun/engine/speculative.py).

HFSequence is this backend's step-level sequence: the verify and drafting loops themselves are
speculative.verify_steps and draft_tokens, shared with llama.cpp. The target runs one forward over
[last token, d1..dk] and gets k+1 logits rows; it crops its DynamicCache past what it kept. The token distributions are
the ones model.generate() draws from on the plain path (the same transformers logits processors, in
the same order), so greedy output is the plain output and sampled output follows its distribution.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from localrun.engine.penalties import dry_penalties, recent_counts, uses_counts, uses_dry
from localrun.engine.speculative import MAX_VERIFY, VocabSummary, sample_from, sample_ids
from localrun.errors import UserError
from localrun.settings import SamplingParams


class PenaltyProcessor:
    """A transformers logits processor for what the library lacks: the frequency and presence penalties
    and DRY, by the same rules as llama.cpp's chain (localrun.engine.penalties)."""

    def __init__(self, params: SamplingParams, breakers: frozenset[int]) -> None:
        self.params, self.breakers = params, breakers

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        p = self.params
        for row in range(input_ids.shape[0]):
            history = input_ids[row].tolist()
            change = {t: c * p.frequency_penalty + p.presence_penalty for t, c in recent_counts(history).items()}
            for token, amount in dry_penalties(history, p, self.breakers).items():
                change[token] = change.get(token, 0.0) + amount
            change = {t: v for t, v in change.items() if v and t < scores.shape[1]}
            if change:
                index = torch.tensor(list(change), dtype=torch.long, device=scores.device)
                amounts = torch.tensor(list(change.values()), dtype=scores.dtype, device=scores.device)
                scores[row, index] -= amounts
        return scores


def needs_own_processors(params: SamplingParams) -> bool:
    """Whether generate() needs our processor list (penalties transformers does not have)."""
    return params.frequency_penalty != 0.0 or params.presence_penalty != 0.0 or uses_dry(params)


def sampling_processors(params: SamplingParams, breakers: frozenset[int] = frozenset()) -> list[Any]:
    """The processors the plain path applies, in its order: the repetition penalty over every earlier id,
    our penalties (frequency, presence, DRY), then temperature, top-k, top-p, min-p when sampling."""
    from transformers import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out: list[Any] = []
    if params.repeat_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(params.repeat_penalty)))
    if needs_own_processors(params):
        out.append(PenaltyProcessor(params, breakers))
    if params.temperature > 0:  # the same conditions as transformers' _get_logits_processor
        if params.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k:
            out.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            out.append(TopPLogitsWarper(float(params.top_p)))
        if params.min_p:
            out.append(MinPLogitsWarper(float(params.min_p)))
    return out


class Scorer:
    """The distribution the plain path (model.generate) draws from, for one request's settings
    (sampling_processors: the same processors in the same order)."""

    def __init__(self, params: SamplingParams, breakers: frozenset[int] = frozenset()) -> None:
        self.greedy = params.temperature <= 0
        self.processors = sampling_processors(params, breakers)
        self.needs_ids = uses_counts(params) or uses_dry(params)

    @torch.inference_mode()
    def scores(self, row: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """Processed scores for one logits row, the text so far being history."""
        s = row.to(torch.float32).reshape(1, -1)
        ids = torch.tensor([list(history)], dtype=torch.long, device=s.device) if self.needs_ids else None
        for processor in self.processors:
            s = processor(ids, s)
        return s[0]

    @torch.inference_mode()
    def probs(self, row: torch.Tensor, history: Sequence[int]) -> np.ndarray:
        return torch.softmax(self.scores(row, history), dim=-1).to(torch.float64).cpu().numpy()

    def choose(self, row: torch.Tensor, history: Sequence[int], rng: np.random.Generator) -> int:
        if self.greedy:
            return int(torch.argmax(self.scores(row, history)))
        return sample_from(self.probs(row, history), rng)


class KVState:
    """One model's DynamicCache and the ids it holds (the counterpart of llama_ctx.LlamaRunner)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.tokens: list[int] = []
        self.cache: Any = None
        self._grown = 0  # positions added since the last crop: what a sliding-window layer can give back
        self._rows_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def n_cached(self) -> int:
        return len(self.tokens)

    def clear(self) -> None:
        self.cache, self.tokens, self._grown = None, [], 0

    def trim(self, n: int) -> None:
        """Forget cached positions from n on (all of them where a sliding window cannot roll back so far)."""
        drop = len(self.tokens) - n
        if drop <= 0:
            return
        if n == 0 or (drop > self._grown and any(self.cache.is_sliding)):
            self.clear()
            return
        self.cache.crop(-drop)
        del self.tokens[n:]
        self._grown = 0

    def reuse_prefix(self, ids: Sequence[int]) -> int:
        """Keep the longest cached prefix of ids (at most all but the last id, whose logits are needed
        again); returns how many positions are kept."""
        limit = min(len(self.tokens), len(ids) - 1)
        common = next((i for i in range(limit) if self.tokens[i] != ids[i]), limit)
        self.trim(common)
        return self.n_cached

    @torch.inference_mode()
    def eval(self, ids: Sequence[int], rows: int = 1) -> torch.Tensor:
        """Run ids after the cached positions; the logits of the last `rows` of them, [rows, vocab]."""
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
            self.cache.activate_past_recording()  # sliding-window layers keep what a crop may need
        start, device = len(self.tokens), self.model.device
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        pos = torch.arange(start, start + len(ids), device=device).unsqueeze(0)
        extra = {"logits_to_keep": rows} if self._rows_arg else {}
        try:
            out = self.model(input_ids=x, position_ids=pos, cache=self.cache, use_cache=True, **extra)
        except BaseException:  # some layers may hold the new positions and others not: start afresh next time
            self.clear()
            raise
        self.tokens.extend(ids)
        self._grown += len(ids)
        if not self.cache.is_croppable:
            self.clear()
            raise UserError(
                "This model keeps a recurrent state that cannot be rolled back, so it cannot draft or verify drafts: drop --draft/--lookup."
            )
        return out.logits[0, -rows:]


class HFSequence:
    """A KVState for one request, a step at a time (speculative.TargetSequence and DraftSequence): the rows of its last
    forward pass, scored by the plain path's processors (Scorer)."""

    max_verify = MAX_VERIFY

    def __init__(
        self,
        state: KVState,
        params: SamplingParams,
        rng: np.random.Generator,
        *,
        n_ctx: int,
        n_vocab: int,
        eos: frozenset[int],
        breakers: frozenset[int] = frozenset(),
    ) -> None:
        self.state, self.rng, self.eos = state, rng, eos
        self.n_ctx, self.n_vocab = n_ctx, n_vocab
        self.scorer = Scorer(params, breakers)
        self._rows: torch.Tensor | None = None

    @property
    def n_cached(self) -> int:
        return self.state.n_cached

    def prefill(self, ids: Sequence[int]) -> int:
        keep = self.state.reuse_prefix(ids)
        self._rows = self.state.eval(ids[keep:])
        return len(ids) - keep

    def decode(self, ids: Sequence[int]) -> None:
        self._rows = self.state.eval(ids, rows=len(ids))

    def trim(self, n: int) -> None:
        self.state.trim(n)

    def is_eog(self, token: int) -> bool:
        return token in self.eos

    def choose(self, row: int, history: Sequence[int]) -> int:
        return self.scorer.choose(self._rows[row], history, self.rng)

    def probs(self, row: int, history: Sequence[int]) -> np.ndarray:
        return self.scorer.probs(self._rows[row], history)

    @torch.inference_mode()
    def greedy(self, row: int, history: Sequence[int], *, confidence: bool) -> tuple[int, float]:
        s = self.scorer.scores(self._rows[row], history)
        token = int(torch.argmax(s))
        return token, float(torch.softmax(s, dim=-1)[token]) if confidence else 0.0

    def accept(self, tokens: Sequence[int]) -> None:
        pass  # the processors read the text from history


def tokenizer_vocab(tokenizer: Any) -> VocabSummary:
    """The vocabulary facts a draft must share: size, special tokens, a sample of token texts."""
    n = len(tokenizer)
    specials = {"beginning-of-sequence": tokenizer.bos_token_id, "end-of-sequence": tokenizer.eos_token_id}
    pieces = tokenizer.convert_ids_to_tokens(sample_ids(n))
    return VocabSummary(n, specials, dict(zip(sample_ids(n), pieces, strict=True)))
