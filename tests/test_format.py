"""The figures the CLI and the UI print: the prompt figure says what was evaluated and what came from the cache."""

from __future__ import annotations

from localrun.engine.events import GenerationSummary
from localrun.format import MIN_RATE_TOKENS, prompt_figure, prompt_rate, stats_line, summary_table


def summary(prompt_tokens: int, prefill_tokens: int, prompt_tps: float = 11.0) -> GenerationSummary:
    return GenerationSummary(
        finish_reason="stop",
        prompt_tokens=prompt_tokens,
        prefill_tokens=prefill_tokens,
        generated_tokens=5,
        ttft_s=0.09,
        prompt_tps=prompt_tps,
        decode_tps=90.0,
        total_s=0.2,
        peak_ram_bytes=300_000_000,
        peak_vram_bytes=None,
        backend="llamacpp",
        device="cpu",
    )


def test_a_cache_hit_says_what_was_new_and_shows_no_rate() -> None:
    s = summary(81, 1)
    assert prompt_figure(s) == "1 new prompt token (80 cached)"
    assert prompt_rate(s) is None
    assert "tok/s · gen" not in stats_line(s) and "1 new prompt token (80 cached) · gen 90 tok/s" in stats_line(s)
    assert dict(summary_table(s))["prompt processing"].startswith("no rate")


def test_enough_evaluated_tokens_show_the_rate() -> None:
    assert prompt_figure(summary(80, 80, 310.0)) == "80 prompt tokens at 310 tok/s"
    assert prompt_figure(summary(110, 30, 250.0)) == "30 new prompt tokens (80 cached) at 250 tok/s"
    assert prompt_rate(summary(MIN_RATE_TOKENS, MIN_RATE_TOKENS, 200.0)) == 200.0
    assert prompt_figure(summary(MIN_RATE_TOKENS - 1, MIN_RATE_TOKENS - 1)) == f"{MIN_RATE_TOKENS - 1} prompt tokens"
