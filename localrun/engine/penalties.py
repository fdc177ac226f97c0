"""The repetition penalties llama.cpp's sampler chain applies, as plain rules on token ids: the
numpy chain of speculative sampling (speculative.filtered_probs) and the transformers backend use
them, so all three paths penalise the same tokens by the same amounts.

- penalties (llama_sampler_init_penalties): over the last PENALTY_LAST_N tokens, a token seen c times
  has its logit divided by repeat_penalty (multiplied, when negative), then lowered by
  c * frequency_penalty + presence_penalty.
- DRY (llama_sampler_init_dry, by p-e-w): a token that would extend a span already seen earlier in the
  window, once that span is longer than dry_allowed_length, is lowered by
  dry_multiplier * dry_base ** (length - dry_allowed_length). A span never crosses a sequence breaker
  (a token whose text holds a newline, ':', '"' or '*'), and breakers themselves are never penalised.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

PENALTY_LAST_N = 64  # llama.cpp's default repeat window (llama-cli --repeat-last-n)
DRY_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's default DRY sequence breakers
_FLOAT_MAX_LOG = 88.7228391  # log(FLT_MAX): llama.cpp clamps the exponent so the penalty stays finite


def uses_counts(params: Any) -> bool:
    """Whether the count-based penalties (repeat, frequency, presence) change anything."""
    return params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def uses_dry(params: Any) -> bool:
    return params.dry_multiplier > 0.0 and params.dry_penalty_last_n > 0


def recent_counts(history: Sequence[int]) -> Counter[int]:
    """How often each token occurs in the penalty window."""
    return Counter(history[-PENALTY_LAST_N:])


def count_penalty(logit: float, count: int, params: Any) -> float:
    """A logit after the repeat, frequency and presence penalties for a token seen count > 0 times."""
    r = params.repeat_penalty
    logit = logit * r if logit <= 0 else logit / r
    return logit - count * params.frequency_penalty - params.presence_penalty


def breaker_ids(pieces: Iterable[tuple[int, str]]) -> frozenset[int]:
    """The single-token sequence breakers: tokens whose text holds any of DRY_BREAKERS."""
    return frozenset(i for i, text in pieces if any(b in text for b in DRY_BREAKERS))


def dry_penalties(history: Sequence[int], params: Any, breakers: frozenset[int]) -> dict[int, float]:
    """Token id -> how much DRY lowers its logit after history (empty when nothing is penalised)."""
    if not uses_dry(params):
        return {}
    rev = list(reversed(history[-params.dry_penalty_last_n :]))  # rev[0] is the newest token
    n, allowed = len(rev), params.dry_allowed_length
    if n <= allowed:
        return {}
    # a repeat may not reach back past the newest breaker
    limit = next((i for i, t in enumerate(rev) if t in breakers), n)
    if limit < allowed:
        return {}
    longest: dict[int, int] = {}
    for k in range(1, n):  # the span ending k tokens back matches the newest m tokens
        m = 0
        while m + k < n and rev[m] == rev[m + k]:
            m += 1
        m = min(m, limit)
        if m >= allowed:
            follower = rev[k - 1]  # the token that came next there would repeat the span once more
            if longest.get(follower, -1) < m:
                longest[follower] = m
    base = params.dry_base
    top = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    out: dict[int, float] = {}
    for token, m in longest.items():
        if token in breakers:
            continue
        exp = m - allowed
        if top > 0 and exp > top:
            exp = top
        out[token] = params.dry_multiplier * base**exp
    return out


def penalized(
    logits: np.ndarray, params: Any, history: Sequence[int], *, breakers: frozenset[int] = frozenset()
) -> np.ndarray:
    """The logits (float64, a copy) after the repeat, frequency, presence and DRY penalties."""
    import numpy as np

    x = np.array(logits, dtype=np.float64)
    if uses_counts(params) and len(history):
        for token, count in recent_counts(history).items():
            x[token] = count_penalty(x[token], count, params)
    for token, amount in dry_penalties(history, params, breakers).items():
        x[token] -= amount
    return x
