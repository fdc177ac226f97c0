"""Drafters and how long they draft: the adaptive draft length (DraftSchedule), a draft model's calibrated
early stop, prompt lookup, and load_drafter, which picks one from the load options. The verify loop they
feed, and the acceptance rule, are in localrun/engine/speculative.py."""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from localrun.engine.speculative import Draft, Drafter
from localrun.errors import UserError
from localrun.settings import LoadOptions, SamplingParams

if TYPE_CHECKING:  # numpy loads when a speculative request first needs it, not on every cold start
    import numpy as np

    from localrun.backends.base import DraftingBackend

# A round always catches the draft up on 1-2 tokens (the target's own token, the last drafted one); more means
# it was behind (a new prompt, or plain steps during a pause), and the round is not timed.
CATCHUP_TIMED_MAX = 2


# -- the draft length -------------------------------------------------------------------------------


class DraftSchedule:
    """How many tokens to draft next, and when not to draft. Fixed: always n_max. Adaptive (default):

    - the length: what a cost model says gives the most tokens per second, from what this pair measured:
      t, plain decoding's step time; d, the draft model's time per evaluation (0 for prompt lookup); the
      verify batch's time for n tokens, a + b·n, a least-squares line through recent rounds anchored by the
      plain step (a batch of one); and α, the chance that a drafted token is accepted (accepted tokens over
      accepted + rejections). A round of k drafted tokens yields (1 − α^(k+1)) / (1 − α) tokens on average
      in k·d + a + b·(k+1) seconds, where plain decoding takes t per token.
    - pausing: when rounds clearly lose to plain decoding (their measured speed, a moving average, below
      LOSING of plain's, and the cost model sees no faster length), drafting pauses and probes again later,
      twice as long after each failed probe; at once for the longest when even a draft that is always right
      could not pay (a draft about as slow as the target). Marginal rounds go on: drafting that breaks even early often pays later in a reply.
    - With carry_pause (a draft model, which must catch up on the skipped text before it can probe), a pause
      goes on into the next request; prompt lookup probes for free, so each request starts drafting."""

    PROBE = 4  # the first length, before anything is known
    BACKOFF_MIN, BACKOFF_MAX = 16, 256
    LOSING = 0.9
    JUDGE_AFTER = 3  # timed rounds before the first verdict

    def __init__(self, *, n_max: int = 16, mode: str = "adaptive", carry_pause: bool = False) -> None:
        self.n_max, self.mode, self.carry_pause = n_max, mode, carry_pause
        self.k = n_max if mode == "fixed" else min(self.PROBE, n_max)
        self.plain_s: float | None = None  # one plain decode step: the median of the recent ones
        self._plain: deque[float] = deque(maxlen=9)
        self.draft_s: float | None = None  # EMA of one draft evaluation (or of a drafted token, without a model)
        self.gain: float | None = None  # EMA of the rounds' speed over plain decoding's
        self.timed_rounds = 0
        self.accepted, self.rejected = 1.0, 1.0  # decayed counts behind α (a uniform prior)
        self._verify: deque[tuple[int, float]] = deque(maxlen=32)  # (batch tokens, seconds) of recent rounds
        self.pause = 0 if mode == "fixed" else 4  # plain steps left before drafting (again); the first are timed
        self.backoff = self.BACKOFF_MIN
        self.lengths: list[int] = []

    def begin(self) -> None:
        """A new request. What was learnt (step times, acceptance, the length) carries over; a pause does only
        with carry_pause. Once plain decoding's step time is known, drafting may start at once."""
        if self.mode == "fixed" or (self.carry_pause and self.pause > 0):
            return
        self.pause = 0 if self.plain_s is not None else 4
        self.backoff = self.BACKOFF_MIN

    def next_length(self) -> int:
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.k

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe_round(
        self,
        drafted: int,
        accepted: int,
        seconds: float,
        draft_seconds: float = 0.0,
        *,
        draft_decodes: int = 0,
        draft_timed: bool = True,
    ) -> None:
        """One round: drafted tokens, how many the target accepted, the round's seconds (0: untimed), the part
        spent drafting and the draft model's evaluations in it (0: no model). draft_timed False: the drafting
        time is not representative (the draft first caught up on text it had not seen)."""
        self.lengths.append(drafted)
        if self.mode == "fixed" or drafted <= 0:
            return
        self.accepted = 0.9 * self.accepted + accepted
        self.rejected = 0.9 * self.rejected + (accepted < drafted)
        if seconds > 0:
            verify_s = max(seconds - draft_seconds, 1e-6)
            self._verify.append((drafted + 1, verify_s))
            if draft_timed:
                per = draft_seconds / (draft_decodes or drafted)
                self.draft_s = per if self.draft_s is None else 0.7 * self.draft_s + 0.3 * per
            if self.plain_s is not None and (draft_timed or self.draft_s is not None):
                # a round that caught up first: its drafting costed at the usual rate
                spent = seconds if draft_timed else verify_s + (draft_decodes or drafted) * (self.draft_s or 0.0)
                gain = (accepted + 1) * self.plain_s / spent
                self.gain = gain if self.gain is None else 0.8 * self.gain + 0.2 * gain
                self.timed_rounds += 1
        self._choose()

    def observe_plain(self, seconds: float) -> None:
        """A plain step's seconds. The median, not an average: plain steps are timed only while drafting
        pauses (a few at a time), and one slow step (the first after a library's threads start, say)
        would otherwise set the baseline that every round is judged against for a long while."""
        if seconds > 0:
            self._plain.append(seconds)
            ordered = sorted(self._plain)
            self.plain_s = ordered[len(ordered) // 2]

    def verify_line(self) -> tuple[float, float]:
        """(a, b): a verify batch of n tokens takes a + b·n seconds. Weighted least squares over recent rounds
        and the plain step, a batch of one, weighted like four rounds; b ≥ 0."""
        t = self.plain_s or 0.0
        points = [(1, t, 4.0), *((n, v, 1.0) for n, v in self._verify)]
        w = sum(p[2] for p in points)
        mn = sum(n * wi for n, _, wi in points) / w
        mv = sum(v * wi for _, v, wi in points) / w
        var = sum(wi * (n - mn) ** 2 for n, _, wi in points)
        b = max(sum(wi * (n - mn) * (v - mv) for n, v, wi in points) / var, 0.0) if var > 0 else 0.0
        return mv - b * mn, b

    def expected_gain(self, k: int, alpha: float | None = None) -> float:
        """The cost model's tokens per second drafting k at a time, over plain decoding's."""
        t, d = self.plain_s or 0.0, self.draft_s or 0.0
        a, b = self.verify_line()
        alpha = self.alpha if alpha is None else alpha
        tokens = k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        cost = k * d + a + b * (k + 1)
        return tokens * t / cost if cost > 0 else 0.0

    def _clearly_losing(self) -> bool:
        """The rounds measured slower than plain decoding (a few of them: one unlucky round is not a verdict),
        and the cost model, from everything measured so far, sees no length that would be faster."""
        if self.gain is None or self.gain >= self.LOSING or self.timed_rounds < self.JUDGE_AFTER:
            return False
        return self.expected_gain(self.k) < 1.0

    def extra_token_cost(self) -> float | None:
        """(d + b) / t: what one more drafted token costs, in plain steps (None: not measured yet)."""
        if self.plain_s is None or self.draft_s is None or not self._verify:
            return None
        return (self.draft_s + self.verify_line()[1]) / self.plain_s

    def _choose(self) -> None:
        if self.plain_s is None or self.draft_s is None:  # too early for the model: grow while drafts hold
            self.k = min(self.n_max, self.k * 2) if self.accepted > 3 * self.rejected else self.k
            return
        self.k = max(range(1, self.n_max + 1), key=self.expected_gain)
        if self.expected_gain(self.n_max, alpha=1.0) < 1.0:  # even an always-right draft would lose
            self.pause = self.backoff = self.BACKOFF_MAX
            self.gain = None
        elif self._clearly_losing():
            self.pause, self.gain = self.backoff, None
            self.backoff = min(self.backoff * 2, self.BACKOFF_MAX)
        elif self.gain is not None and self.gain > 1.1:
            self.backoff = self.BACKOFF_MIN


# -- drafters ---------------------------------------------------------------------------------------


class Calibration:
    """How often the target accepts a drafted token, by the draft's own probability of it (in bins): a draft
    close to its target (Q8_0 of an F32) is right even where it is unsure, a rougher one (Q4_0) much less.
    Each bin starts at its own probability, weighted like two tokens, and forgets slowly."""

    EDGES = (0.2, 0.4, 0.6, 0.8, 0.9)
    DECAY = 0.99

    def __init__(self) -> None:
        mids = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95)
        self.accepted = [2.0 * m for m in mids]
        self.seen = [2.0] * len(mids)

    def rate(self, confidence: float) -> float:
        i = bisect.bisect_right(self.EDGES, confidence)
        return self.accepted[i] / self.seen[i]

    def observe(self, confidence: Sequence[float], accepted: int) -> None:
        """A round's drafted tokens' probabilities; the first `accepted` were accepted, the next one was not
        (the tokens after it were never judged)."""
        for j, c in enumerate(confidence[: accepted + 1]):
            i = bisect.bisect_right(self.EDGES, c)
            self.accepted[i] = self.DECAY * self.accepted[i] + (j < accepted)
            self.seen[i] = self.DECAY * self.seen[i] + 1.0


class ModelDrafter:
    """A second, smaller model with its own context and KV cache: reused across rounds and requests,
    trimmed to the longest common prefix when the target rejected part of a draft. The draft
    backend does the decoding (its propose_tokens()); this class owns the schedule.

    Adaptive greedy drafting also stops a round early where going on does not pay (llama.cpp's --draft-p-min
    idea, with the threshold learnt): one more drafted token is accepted with the chance that every token so
    far and it are (each from the Calibration of the draft's probability of it), and saves a plain step, t;
    it costs a draft step and a longer verify batch, d + b (the schedule's cost model). Drafting goes on while
    that chance × t exceeds d + b."""

    def __init__(self, backend: DraftingBackend, *, n_max: int = 16, mode: str = "adaptive") -> None:
        self.backend = backend
        self.schedule = DraftSchedule(n_max=n_max, mode=mode, carry_pause=True)
        self.calibration = Calibration() if mode == "adaptive" else None
        self._catchup = self._decodes = 0  # the last draft's catch-up tokens and evaluations
        self._confidence: tuple[float, ...] = ()

    def begin(self) -> None:
        self.schedule.begin()

    def propose(self, ids: Sequence[int], params: SamplingParams, rng: np.random.Generator) -> Draft:
        n = self.schedule.next_length()
        if n <= 0:
            return Draft()
        draft = self.backend.propose_tokens(ids, n, params, rng, go_on=self._stop_rule())
        self._catchup, self._decodes, self._confidence = draft.catchup, draft.decodes, draft.confidence
        return draft

    def _stop_rule(self) -> Callable[[float], bool] | None:
        """None in fixed mode; before the costs are measured, a rule that never stops (the calibration still
        learns from the probabilities it asks for)."""
        calibration, threshold = self.calibration, self.schedule.extra_token_cost()
        if calibration is None:
            return None
        if threshold is None:
            return _never_stop
        chance = 1.0

        def go_on(confidence: float) -> bool:
            nonlocal chance
            chance *= calibration.rate(confidence)
            return chance >= threshold

        return go_on

    def observe_round(self, drafted: int, accepted: int, seconds: float, draft_seconds: float | None = None) -> None:
        # A round that first caught the draft model up on text it had not seen (the prompt, or the tokens of a
        # pause) drafted slower than drafting does: only its verify part is representative.
        catching_up = self._catchup > CATCHUP_TIMED_MAX
        if self.calibration is not None:
            self.calibration.observe(self._confidence[:drafted], accepted)
        self.schedule.observe_round(
            drafted, accepted, seconds, draft_seconds or 0.0, draft_decodes=self._decodes, draft_timed=not catching_up
        )

    def observe_plain(self, seconds: float) -> None:
        self.schedule.observe_plain(seconds)

    def close(self) -> None:
        self.backend.close()


def _never_stop(confidence: float) -> bool:
    return True


class PromptLookupDrafter:
    """Drafts by n-gram lookup (prompt lookup decoding): find the latest earlier occurrence of the
    text's last n tokens (n from ngram_max down to ngram_min) and propose what followed it."""

    def __init__(self, *, n_max: int = 16, mode: str = "adaptive", ngram_min: int = 2, ngram_max: int = 4) -> None:
        self.schedule = DraftSchedule(n_max=n_max, mode=mode)
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._seen: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}

    def __call__(self, ids: Sequence[int]) -> list[int]:
        """The plain drafter callable: up to n_max proposed ids."""
        return self.lookup(ids, self.schedule.n_max)

    def begin(self) -> None:
        self.schedule.begin()

    def propose(self, ids: Sequence[int], params: SamplingParams, rng: np.random.Generator) -> Draft:
        n = self.schedule.next_length()
        return Draft(tuple(self.lookup(ids, n))) if n > 0 else Draft()

    def lookup(self, ids: Sequence[int], n: int) -> list[int]:
        self._sync(ids)
        for size in range(min(self.ngram_max, len(ids) - 1), self.ngram_min - 1, -1):
            end = self._index.get(tuple(ids[len(ids) - size :]))
            if end is not None:
                return list(ids[end : end + n])
        return []

    def _sync(self, ids: Sequence[int]) -> None:
        """Index every n-gram that has a continuation: those ending before the last token."""
        seen = len(self._seen)
        if seen > len(ids) or list(ids[:seen]) != self._seen:  # a new request
            self._seen, self._index, seen = [], {}, 0
        for end in range(max(seen, 1), len(ids)):
            for size in range(self.ngram_min, self.ngram_max + 1):
                if end >= size:
                    self._index[tuple(ids[end - size : end])] = end
        self._seen = list(ids[: len(ids) - 1]) if len(ids) else []

    def observe_round(self, drafted: int, accepted: int, seconds: float, draft_seconds: float | None = None) -> None:
        self.schedule.observe_round(drafted, accepted, seconds, draft_seconds or 0.0)

    def observe_plain(self, seconds: float) -> None:
        self.schedule.observe_plain(seconds)

    def close(self) -> None:
        pass


class CallableDrafter:
    """Wraps a plain `(ids) -> proposed ids` callable (the Backend protocol's Drafter type)."""

    def __init__(self, fn: Callable[[Sequence[int]], Sequence[int]]) -> None:
        self.fn = fn

    def begin(self) -> None:
        pass

    def propose(self, ids: Sequence[int], params: SamplingParams, rng: np.random.Generator) -> Draft:
        return Draft(tuple(self.fn(ids)))

    def observe_round(self, drafted: int, accepted: int, seconds: float, draft_seconds: float | None = None) -> None:
        pass

    def observe_plain(self, seconds: float) -> None:
        pass


def as_drafter(obj: Any) -> Drafter | None:
    if obj is None or hasattr(obj, "propose"):
        return obj
    return CallableDrafter(obj)


def load_drafter(target: DraftingBackend, options: LoadOptions) -> Drafter | None:
    """The drafter that options ask for, or None: a draft model (checked, then loaded with the
    target's settings) or prompt lookup."""
    if options.draft and options.lookup:
        raise UserError("Choose one way of drafting: --draft MODEL or --lookup, not both.")
    if options.draft or options.lookup:
        # Speculative rounds use numpy; importing it here, at load, keeps its import and the start of its
        # BLAS threads out of the first timed steps that the adaptive draft length learns from.
        import numpy  # noqa: F401
    if options.lookup:
        return PromptLookupDrafter(n_max=options.draft_max, mode=options.draft_mode)
    if not options.draft:
        return None
    from localrun.models.catalog import resolve_model

    model = resolve_model(options.draft)
    draft_backend = target.load_draft(model, options)
    return ModelDrafter(draft_backend, n_max=options.draft_max, mode=options.draft_mode)
