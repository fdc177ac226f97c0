"""What a loop is, defined once: the engine's loop guard (stream_generate) and the benches judge a reply
by this same rule.

A reply loops when its newest tokens are one span of `period` tokens (1 to MAX_PERIOD) said over and over:
each of the last `window` tokens equals the token `period` places before it, where the window is
MIN_TOKENS long and holds at least MIN_REPEATS copies of the span (so a long span must come back three
times, not once). The values were chosen with bench/first_answers.py, which counts how often normal
replies (lists, code, poems, counting) would be stopped by it.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_PERIOD = 50
MIN_TOKENS = 64
MIN_REPEATS = 3


class LoopDetector:
    """Fed a reply's token ids one by one; says when its tail has become a loop."""

    def __init__(self, *, max_period: int = MAX_PERIOD, min_tokens: int = MIN_TOKENS, min_repeats: int = MIN_REPEATS):
        self.max_period, self.min_tokens, self.min_repeats = max_period, min_tokens, min_repeats
        self.ids: list[int] = []
        self._run = [0] * (max_period + 1)  # _run[p]: how many newest tokens equal the one p before them
        self.period: int | None = None  # the loop's period once found

    def feed(self, token: int) -> bool:
        """Add the next token; True once the reply loops (and from then on)."""
        ids = self.ids
        ids.append(token)
        n = len(ids)
        for p in range(1, min(self.max_period, n - 1) + 1):
            run = self._run[p] + 1 if ids[-1] == ids[-1 - p] else 0
            self._run[p] = run
            # the run of matches plus the span it repeats: that many newest tokens are p-periodic
            if self.period is None and run + p >= max(self.min_tokens, self.min_repeats * p):
                self.period = p
        return self.period is not None

    @property
    def looping(self) -> bool:
        return self.period is not None


def find_loop(ids: Iterable[int], **rule: int) -> int | None:
    """The number of tokens after which a reply was first seen looping (None: it never loops)."""
    detector = LoopDetector(**rule)
    for i, token in enumerate(ids):
        if detector.feed(token):
            return i + 1
    return None
