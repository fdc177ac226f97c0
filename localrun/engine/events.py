"""The one streamed type: every consumer (CLI, UI, bench, server) reads GenerationEvent."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenStep:
    """One token out of a backend's generate_tokens().

    prefill_tokens is set on the first step only: how many prompt tokens the backend actually
    evaluated (fewer than the prompt when the KV-cache prefix was reused). drafted is set on the
    step that opens a speculative round: how many draft tokens were proposed in that round. The
    round's accepted drafts follow (from_draft=True) and the first step not from the draft, the
    target's own token, closes it (a round with nothing accepted opens and closes on that step).
    """

    token_id: int
    from_draft: bool = False
    prefill_tokens: int | None = None
    drafted: int = 0


@dataclass(frozen=True, slots=True)
class ServerCounts:
    """What a server-side backend's generate_tokens() returns at its end (a remote engine): its finish reason and
    its own counts, from its `usage` (None where it gave none), and the timings it reports itself, where it does
    (llama-server's `timings`: prompt_ms, predicted_per_second, ...), for benches that hold ours against them."""

    finish_reason: str
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    cached_tokens: int | None = None
    engine_timings: dict | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationSummary:
    """The full figures of one finished request (what `/stats` prints)."""

    finish_reason: str
    prompt_tokens: int
    prefill_tokens: int
    generated_tokens: int
    ttft_s: float | None
    prompt_tps: float | None
    decode_tps: float | None
    total_s: float
    peak_ram_bytes: int | None  # None: unknown (a remote engine that does not say)
    peak_vram_bytes: int | None
    backend: str = ""
    device: str = ""
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accept_counts: tuple[int, ...] = ()
    error: str | None = None
    text: str = ""
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_lengths: tuple[int, ...] = ()
    overrun_tokens: int = 0  # tokens generated after Stop was seen (the model process counts them)
    reasoning: str = ""  # the thinking block's text (text is the answer only)
    reasoning_tokens: int = 0  # tokens generated inside it, its markers included (they count in generated_tokens)
    reasoning_s: float | None = None  # from the first token to the block's end (None: no thinking)
    reasoning_cut: bool = False  # the thinking budget closed the block, not the model
    dropped_messages: int = 0  # the oldest messages left out of the prompt so the reply had room

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the KV cache instead of being evaluated."""
        return self.prompt_tokens - self.prefill_tokens

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def draft_rounds(self) -> int:
        return sum(self.accept_counts)

    @property
    def mean_accepted_length(self) -> float | None:
        """Drafted tokens accepted per speculative round."""
        return self.accepted_tokens / self.draft_rounds if self.draft_rounds else None


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """A piece of streamed output plus the cumulative figures so far.

    text is the new answer text since the previous event (may be empty when a token is held back for
    UTF-8 or stop-string reasons); reasoning the new thinking text (localrun.engine.reasoning), never in
    text. finish_reason and summary are set on the last event only.
    """

    text: str
    token_ids: tuple[int, ...]
    from_draft: tuple[bool, ...]
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float | None
    prompt_tps: float | None
    decode_tps: float | None
    elapsed_s: float
    ram_bytes: int | None
    peak_ram_bytes: int | None
    vram_bytes: int | None
    peak_vram_bytes: int | None
    draft_tokens: int = 0
    accepted_tokens: int = 0
    finish_reason: str | None = None
    summary: GenerationSummary | None = field(default=None, repr=False)
    prefill_tokens: int | None = None  # prompt tokens evaluated (the rest came from the KV cache); None: unknown
    reasoning: str = ""
    reasoning_tokens: int = 0
    reasoning_s: float | None = None  # thinking so far (None: none)

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    def merged(self, later: GenerationEvent) -> GenerationEvent:
        """This event and a later one as one: the text and tokens of both, the later one's figures (a
        consumer that shows a few updates a second sends fewer, larger pieces)."""
        from dataclasses import replace

        return replace(
            later,
            text=self.text + later.text,
            reasoning=self.reasoning + later.reasoning,
            token_ids=self.token_ids + later.token_ids,
            from_draft=self.from_draft + later.from_draft,
        )
