"""What a loop is, defined once: the engine's loop guard (stream_generate) and the benches judge a reply by
this same rule.

A reply loops when its newest tokens are one span of `period` tokens (1 to MAX_PERIOD) said over and over:
in the last `window` tokens (MIN_TOKENS, or MIN_REPEATS periods when that is longer), at least MIN_SHARE of
them equal the token `period` places before them. Two refinements keep normal replies out:
- numbers count as equal (a token of digits is "a number"), so "36. Mona Ali / 37. Mona Ali / ..." is the loop
  it is, while a list of numbers alone ("10, 11, 12, ...") is not one: the repeated span must hold a word (a
  token with a letter in it);
- the share allows a stray token ("bicycles, motorcycles, bicycles") without letting a list of different
  items through.
The values were chosen with bench/first_answers.py, which counts how often normal replies (lists, code,
poems, counting) would be stopped by each candidate rule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

MAX_PERIOD = 50
MIN_TOKENS = 64
MIN_REPEATS = 3
MIN_SHARE = 0.9
_NUMBER = -1  # the class every all-digit token falls in


class LoopDetector:
    """Fed a reply's token ids one by one; says when its tail has become a loop. text_of(token) is a
    token's text (to tell numbers and words)."""

    def __init__(
        self,
        text_of: Callable[[int], str],
        *,
        max_period: int = MAX_PERIOD,
        min_tokens: int = MIN_TOKENS,
        min_repeats: int = MIN_REPEATS,
        min_share: float = MIN_SHARE,
    ) -> None:
        self._text_of, self.min_share = text_of, min_share
        self._kinds: dict[int, tuple[int, bool]] = {}  # token -> (class, has a letter)
        self.keys: list[int] = []
        self.wordy: list[bool] = []
        self.max_period = max_period
        self._windows = {p: max(min_tokens, min_repeats * p) for p in range(1, max_period + 1)}
        self._bits = {p: deque(maxlen=w) for p, w in self._windows.items()}  # recent match bits per period
        self._hits = dict.fromkeys(self._windows, 0)
        self.period: int | None = None  # the loop's period once found

    def _kind(self, token: int) -> tuple[int, bool]:
        kind = self._kinds.get(token)
        if kind is None:
            text = self._text_of(token).strip()
            kind = (_NUMBER if text.isdigit() else token, any(c.isalpha() for c in text))
            self._kinds[token] = kind
        return kind

    def feed(self, token: int) -> bool:
        """Add the next token; True once the reply loops (and from then on)."""
        key, wordy = self._kind(token)
        keys = self.keys
        keys.append(key)
        self.wordy.append(wordy)
        n = len(keys)
        for p in range(1, min(self.max_period, n - 1) + 1):
            bits, hit = self._bits[p], keys[-1] == keys[-1 - p]
            if len(bits) == bits.maxlen:
                self._hits[p] -= bits[0]
            bits.append(hit)
            self._hits[p] += hit
            if self.period is None and len(bits) == bits.maxlen and self._hits[p] >= self.min_share * bits.maxlen:
                if any(self.wordy[-p:]):
                    self.period = p
        return self.period is not None

    @property
    def looping(self) -> bool:
        return self.period is not None


def find_loop(ids: Iterable[int], text_of: Callable[[int], str], **rule: float) -> int | None:
    """How many tokens in a reply was first seen looping (None: it never loops)."""
    detector = LoopDetector(text_of, **rule)  # type: ignore[arg-type]
    for i, token in enumerate(ids):
        if detector.feed(token):
            return i + 1
    return None
