"""Speculative decoding: the one verify loop (verify_steps) and the one drafting loop (draft_tokens) that
both backends run through their step-level sequences (TargetSequence, DraftSequence), the acceptance rule, and the check that
a draft shares its target's vocabulary. The drafters and the adaptive draft length are in drafting.py.

A drafter proposes tokens; the target verifies them all in one batch and keeps the longest prefix
it agrees with plus one token of its own. At temperature 0 "agrees" means "is its own greedy
choice", so the output is the plain output. Above 0 it is speculative sampling's rule (Leviathan
et al. 2023, Chen et al. 2023): accept a drafted x with probability min(1, p(x)/q(x)), else draw
from max(0, p - q) renormalised, which leaves the output distributed exactly as the target's p.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from localrun.engine.events import TokenStep
from localrun.engine.penalties import penalized
from localrun.errors import UserError
from localrun.settings import SamplingParams

if TYPE_CHECKING:  # numpy loads when a speculative request first needs it, not on every cold start
    import numpy as np

MAX_VERIFY = 65  # ids in one verify evaluation on either backend: the last token and up to 64 drafted ones


@dataclass(frozen=True, slots=True)
class Draft:
    """Proposed tokens; probs[i] is the distribution tokens[i] was drawn from (None: chosen
    deterministically, a point mass, as for greedy drafting and prompt lookup)."""

    tokens: tuple[int, ...] = ()
    probs: np.ndarray | None = None
    catchup: int = 0  # tokens the draft model evaluated first, to catch up with the text (not drafting proper)
    decodes: int = 0  # the draft model's evaluations: the catch-up batch and a step per token it went on from
    confidence: tuple[float, ...] = ()  # greedy drafting: the draft's own probability of each drafted token


class Drafter(Protocol):
    """What a backend's verify loop calls. The draft length is the drafter's own decision."""

    def begin(self) -> None:
        """A new request starts (the adaptive schedule probes again)."""

    def propose(self, ids: Sequence[int], params: SamplingParams, rng: np.random.Generator) -> Draft: ...

    def observe_round(self, drafted: int, accepted: int, seconds: float, draft_seconds: float | None = None) -> None:
        """A round ended: seconds in all (0: untimed), draft_seconds of them spent proposing."""

    def observe_plain(self, seconds: float) -> None: ...


class StepSequence(Protocol):
    """One sequence of a loaded model, driven a step at a time: what the verify loop (TargetSequence) and the
    draft loop (DraftSequence) both call, so the loops are written once for llama.cpp (llama_ctx.LlamaSequence,
    llama_slots.SlotSequence) and transformers (hf_spec.HFSequence). "Row i" is the logits of the i-th id of
    the last evaluation (-1: its last); history is the text before that row's token. A sequence is made for one
    request's settings."""

    n_ctx: int
    max_verify: int  # ids one evaluation may hold: the last token and the drafted ones
    n_vocab: int  # the width of a logits row

    @property
    def n_cached(self) -> int: ...

    def decode(self, ids: Sequence[int]) -> None:
        """Evaluate ids after the cached ones, keeping every one's logits row."""

    def trim(self, n: int) -> None:
        """Forget the cached positions from n on (a rejected draft's tail)."""

    def is_eog(self, token: int) -> bool: ...

    def probs(self, row: int, history: Sequence[int]) -> np.ndarray:
        """The distribution the request's sampler draws from at a row (speculative sampling's p, a sampled
        draft's q)."""
        ...


class TargetSequence(StepSequence, Protocol):
    """The sequence a request generates in: verify_steps and verify_round check drafts against it. Its sampler
    keeps its seed."""

    def choose(self, row: int, history: Sequence[int]) -> int:
        """The request's sampler's token at a row: greedy, or its seeded draw."""
        ...

    def accept(self, tokens: Sequence[int]) -> None:
        """Tokens a sampled verify kept, for a sampler that follows the text (llama.cpp's chain)."""


class DraftSequence(StepSequence, Protocol):
    """A draft model's sequence: draft_tokens catches it up with the text and proposes from it."""

    def prefill(self, ids: Sequence[int]) -> int:
        """Evaluate what the cache lacks of ids (it keeps the longest shared prefix); returns that count."""
        ...

    def greedy(self, row: int, history: Sequence[int], *, confidence: bool) -> tuple[int, float]:
        """A greedy draft's token at a row and, if asked, its probability (else 0.0)."""
        ...


# -- sampling distributions the way llama.cpp's chain builds them -----------------------------------


def filtered_probs(
    logits: np.ndarray, params: SamplingParams, history: Sequence[int] = (), *, breakers: frozenset[int] = frozenset()
) -> np.ndarray:
    """The distribution llama.cpp's chain samples from: the repeat, frequency and presence penalties over
    the last 64 tokens, DRY (breakers: the sequence-breaker token ids), top-k, top-p, min-p (all on the
    untempered softmax, as in the chain's order), then temperature. history is the whole text so far.
    Computed in float64 where the chain uses float32: a token at a filter's exact edge may differ."""
    import numpy as np

    x = penalized(logits, params, history, breakers=breakers)
    n = x.shape[0]
    cand = np.argpartition(x, n - params.top_k)[n - params.top_k :] if 0 < params.top_k < n else np.arange(n)
    cand = cand[np.argsort(-x[cand], kind="stable")]
    v = x[cand]
    if params.top_p < 1.0:
        cum = np.cumsum(np.exp(v - v[0]))
        last = min(int(np.searchsorted(cum / cum[-1], params.top_p)) + 1, len(v))
        cand, v = cand[:last], v[:last]
    if params.min_p > 0:
        keep = v >= v[0] + np.log(params.min_p)
        cand, v = cand[keep], v[keep]
    p = np.exp((v - v[0]) / params.temperature)
    out = np.zeros(n)
    out[cand] = p / p.sum()
    return out


def request_seed(params: SamplingParams) -> int:
    """The request's seed, or a fresh one: its sampler chain and its verification draws both start from it."""
    import random

    return params.seed if params.seed is not None else random.randrange(2**31)


def verify_rng(seed: int) -> np.random.Generator:
    """The generator a request's sampled verification draws from (speculative sampling's accept tests)."""
    import numpy as np

    return np.random.default_rng(seed)


def sample_from(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability vector (inverse CDF: cheaper than rng.choice on a big vocabulary)."""
    import numpy as np

    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(p) - 1))


def accept_sampled(target_row: Callable[[int], np.ndarray], draft: Draft, rng: np.random.Generator) -> tuple[int, int]:
    """Speculative sampling over one verify batch. target_row(i) is the target's distribution at
    drafted position i (and at len(draft.tokens) after the last). Returns (n accepted, next token)."""
    import numpy as np

    for i, x in enumerate(draft.tokens):
        p = target_row(i)
        q_x = 1.0 if draft.probs is None else float(draft.probs[i][x])
        if q_x > 0 and rng.random() * q_x < p[x]:  # accept with probability min(1, p(x)/q(x))
            continue
        q = _point_mass(x, len(p)) if draft.probs is None else draft.probs[i]
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return i, sample_from(residual / total if total > 0 else p, rng)
    return len(draft.tokens), sample_from(target_row(len(draft.tokens)), rng)


def _point_mass(x: int, n: int) -> np.ndarray:
    import numpy as np

    q = np.zeros(n)
    q[x] = 1.0
    return q


# -- the loops --------------------------------------------------------------------------------------


def verify_steps(
    seq: TargetSequence,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    drafter: Drafter,
    rng: np.random.Generator,
    *,
    prefill: int,
) -> Iterator[TokenStep]:
    """Rounds of: draft, verify [last, d1..dk] in one evaluation, keep the agreeing prefix plus one token of
    the target's own, trim the cache past them. With no draft this round, one plain step. The prompt is
    already evaluated (prefill: how many of its ids were). Never drafts past max_tokens or the context."""
    history = list(prompt_ids)
    limit = min(params.max_tokens, seq.n_ctx - len(prompt_ids))  # tokens we may emit
    token, first, opens = seq.choose(-1, history), True, 0
    while True:
        if not params.ignore_eos and seq.is_eog(token):
            return None
        yield TokenStep(token, prefill_tokens=prefill if first else None, drafted=opens)
        first = False
        history.append(token)
        emitted = len(history) - len(prompt_ids)
        if emitted >= limit:
            return "length"
        draft = next_draft(seq, drafter, history, params, rng, left=limit - emitted)
        if not draft.tokens:
            seq.decode([token])
            token, opens = seq.choose(-1, history), 0
            continue
        n_ok, token = verify_round(seq, history, token, draft, params, rng)
        for i, t in enumerate(draft.tokens[:n_ok]):
            if not params.ignore_eos and seq.is_eog(t):
                return None
            yield TokenStep(t, from_draft=True, drafted=len(draft.tokens) if i == 0 else 0)
            history.append(t)
        opens = len(draft.tokens) if n_ok == 0 else 0  # a round with nothing accepted opens on the target's token


def next_draft(
    seq: StepSequence,
    drafter: Drafter,
    history: list[int],
    params: SamplingParams,
    rng: np.random.Generator,
    *,
    left: int,
) -> Draft:
    """The drafter's proposal after history, cut to what the round may hold: left - 1 tokens (the round ends on
    one of the target's own, and left is what max_tokens still allows), the room in the cache, one verify batch."""
    room = min(left - 1, seq.n_ctx - seq.n_cached - 2, seq.max_verify - 1)
    return fit_draft(drafter.propose(history, params, rng) if room > 0 else Draft(), room, seq.n_vocab)


def verify_round(
    seq: TargetSequence, history: list[int], token: int, draft: Draft, params: SamplingParams, rng: np.random.Generator
) -> tuple[int, int]:
    """One round: evaluate [token, d1..dk] after the cache, verify, trim the cache past what was kept. history
    ends with token. Returns (drafted tokens accepted, the target's next token, not evaluated yet)."""
    n_past = seq.n_cached
    seq.decode([token, *draft.tokens])
    n_ok, following = _verify(seq, history, draft, params.temperature <= 0, rng)
    seq.trim(n_past + 1 + n_ok)
    return n_ok, following


def _verify(
    seq: TargetSequence, history: list[int], draft: Draft, greedy: bool, rng: np.random.Generator
) -> tuple[int, int]:
    """(drafted tokens accepted, the target's next token). Row i is the target after draft.tokens[:i]:
    greedy, its choice must equal the drafted token; sampled, speculative sampling's rule."""
    drafted = draft.tokens
    if greedy:
        seen = list(history)
        for i, d in enumerate(drafted):
            own = seq.choose(i, seen)
            if own != d:
                return i, own
            seen.append(d)
        return len(drafted), seq.choose(len(drafted), seen)
    n_ok, token = accept_sampled(lambda i: seq.probs(i, history + list(drafted[:i])), draft, rng)
    seq.accept([*drafted[:n_ok], token])
    return n_ok, token


def draft_tokens(
    seq: DraftSequence,
    ids: Sequence[int],
    n: int,
    params: SamplingParams,
    rng: np.random.Generator,
    go_on: Callable[[float], bool] | None = None,
) -> Draft:
    """As a draft model: up to n tokens after ids, from the draft's own cache (trimmed to what ids still
    share). Greedy at temperature 0, stopping before a token when go_on(its probability under the draft)
    says so (never before the first); else drawn from the request's distribution, returned for the
    acceptance rule."""
    import numpy as np

    if len(ids) + n >= seq.n_ctx:
        return Draft()
    catchup = seq.prefill(ids)
    text = list(ids)
    tokens: list[int] = []
    rows: list[np.ndarray] = []
    confidence: list[float] = []
    decodes = 1  # the catch-up evaluation
    for j in range(n):
        if params.temperature <= 0:
            tok, conf = seq.greedy(-1, text, confidence=go_on is not None)
            if go_on is not None:  # the draft's probability of its token: only a stop rule needs it
                if not go_on(conf) and j > 0:
                    break
                confidence.append(conf)
        else:
            q = seq.probs(-1, text)
            tok = sample_from(q, rng)
            rows.append(q)
        tokens.append(tok)
        text.append(tok)
        if j + 1 < n:
            seq.decode([tok])
            decodes += 1
    return Draft(tuple(tokens), np.stack(rows) if rows else None, catchup, decodes, tuple(confidence))


def fit_draft(draft: Draft, room: int, width: int) -> Draft:
    """At most room tokens, cut before any id the target's vocabulary lacks; the draft's distributions
    padded or cut to the target's width (a family's models may pad their embedding rows differently)."""
    import numpy as np

    tokens = draft.tokens[: max(room, 0)]
    cut = next((i for i, t in enumerate(tokens) if t >= width), len(tokens))
    tokens = tokens[:cut]
    if draft.probs is None or not tokens:
        return Draft(tokens)
    probs = draft.probs[: len(tokens)]
    if probs.shape[1] > width:
        probs = probs[:, :width]
    elif probs.shape[1] < width:
        probs = np.pad(probs, ((0, 0), (0, width - probs.shape[1])))
    return Draft(tokens, probs)


# -- compatibility ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VocabSummary:
    """What must match between a target and its draft."""

    n_tokens: int
    specials: dict[str, int]
    texts: dict[int, str]


def sample_ids(n_tokens: int, *, count: int = 256) -> list[int]:
    """A spread of token ids to compare: the first ones (specials live there) and an even sample."""
    step = max(1, n_tokens // count)
    return sorted(set(range(min(n_tokens, 16))) | set(range(0, n_tokens, step)) | {n_tokens - 1})


def check_compatible(target: VocabSummary, draft: VocabSummary, draft_name: str) -> None:
    """Refuse a draft whose vocabulary differs from the target's, with a sentence naming the difference."""
    if target.n_tokens != draft.n_tokens:
        raise UserError(
            f"The draft model {draft_name} has a vocabulary of {draft.n_tokens} tokens and the target {target.n_tokens}: "
            "a draft must share the target's tokenizer (pick a smaller model of the same family)."
        )
    for name, tid in target.specials.items():
        if draft.specials.get(name) != tid:
            raise UserError(
                f"The draft model {draft_name} has {name} token {draft.specials.get(name)} and the target {tid}: "
                "a draft must share the target's tokenizer."
            )
    for tid, text in target.texts.items():
        if draft.texts.get(tid) != text:
            raise UserError(
                f"Token {tid} is {draft.texts.get(tid)!r} in the draft model {draft_name} and {text!r} in the target: "
                "a draft must share the target's tokenizer."
            )
