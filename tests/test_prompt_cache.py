"""The host-RAM prompt cache (localrun.engine.prompt_cache) on the real default model: more chats than slots
keep their prefix, a state put back gives the same reply as the prompt evaluated afresh, the cache stays
within its limit, the oldest state goes first, and the model's plan counts the limit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localrun.backends import load_backend
from localrun.engine.generate import generate
from localrun.engine.prompt_cache import MIN_TOKENS, PromptCache
from localrun.models.catalog import resolve_model
from localrun.settings import LoadOptions, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
TOPICS = ["rivers", "bread", "owls", "trains", "violins"]
MB = 1024 * 1024


def _chat(backend, topic: str) -> list[int]:
    """A chat with a ~400-token system prompt of its own (no two share more than the template's first tokens)."""
    system = f"{topic.title()} first. " + " ".join(f"Fact {i} about {topic}: it matters." for i in range(40))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about {topic}."}]
    return backend.tokenize(backend.render_chat(messages))


@pytest.fixture(scope="module")
def cached() -> Iterator:
    b = load_backend(resolve_model(None), LoadOptions(parallel=2, n_ctx=2048))
    yield b
    b.close()


@pytest.fixture(scope="module")
def uncached() -> Iterator:
    b = load_backend(resolve_model(None), LoadOptions(parallel=2, n_ctx=2048, prompt_cache_mb=0))
    yield b
    b.close()


def test_more_chats_than_slots_keep_their_prefix_and_reply_the_same(cached, uncached) -> None:
    chats = [_chat(cached, t) for t in TOPICS]
    assert all(len(c) >= 300 for c in chats)
    # the reference: each chat asked twice in a row without the cache, so the second reply comes from the slot
    # that kept the chat (its last prompt token evaluated again alone, which can move a near-tie: a kept prefix
    # is not bit-equal to the prompt evaluated in one batch, here and in llama-server)
    fresh, kept = [], []
    for chat in chats:
        fresh.append(generate(uncached, chat, GREEDY))
        kept.append(generate(uncached, chat, GREEDY))
    assert [s.prefill_tokens for s in kept] == [1] * len(chats)
    first = [generate(cached, c, GREEDY) for c in chats]  # 5 chats through 2 slots: 3 are pushed out
    again = [generate(cached, c, GREEDY) for c in chats]
    assert [s.text for s in first] == [s.text for s in fresh]
    # each chat's state came back from the cache: only the last prompt token is evaluated again, and the reply
    # is the one the slot gives when it kept the chat
    assert [s.prefill_tokens for s in again] == [1] * len(chats)
    assert [s.text for s in again] == [s.text for s in kept]
    status = cached.scheduler.status()
    assert status["prompt_cache_restored"] >= len(chats)
    assert 0 < status["prompt_cache_bytes"] <= status["prompt_cache_limit_bytes"]
    # without the cache, a chat pushed out of its slot is evaluated again
    assert generate(uncached, chats[0], GREEDY).prefill_tokens > 300
    assert "prompt_cache_bytes" not in uncached.scheduler.status()


def test_the_cache_stays_within_its_limit_and_the_oldest_goes_first() -> None:
    b = load_backend(resolve_model(None), LoadOptions(parallel=2, n_ctx=2048, prompt_cache_mb=12))
    try:
        chats = [_chat(b, t) for t in TOPICS]
        for chat in chats:
            generate(b, chat, GREEDY)
            status = b.scheduler.status()
            assert status["prompt_cache_bytes"] <= 12 * MB
        assert status["prompt_cache_entries"] == 1, "one ~420-token state (~10 MB) fits in 12 MB, not two"
        # the slots hold the last two chats and the cache the one before (taken out before a slot is saved in
        # its place); the first two are gone and are evaluated again
        assert generate(b, chats[2], GREEDY).prefill_tokens == 1
        assert generate(b, chats[0], GREEDY).prefill_tokens > 300
    finally:
        b.close()


def test_entries_that_a_longer_state_covers_go_and_a_small_share_is_not_taken() -> None:
    cache = PromptCache(10_000)
    base = list(range(100))
    cache.put(base, bytearray(1000))
    cache.put(base + [7] * 50, bytearray(1500))  # the same chat one turn on: it covers the first
    assert len(cache) == 1 and cache.used_bytes == 1500
    cache.put(base[: MIN_TOKENS - 1], bytearray(10))  # too short to keep
    assert len(cache) == 1
    assert cache.take(base + [7] * 50 + [1, 2], have=0) is not None and len(cache) == 0
    cache.put(base + [9] * 300, bytearray(3000))
    # a prompt that shares the first 60 tokens shares under a quarter of the 400-token entry: not taken
    assert cache.take(base[:60] + [5] * 40, have=0) is None
    # nor when a slot already shares as much
    assert cache.take(base + [9] * 300, have=400) is None
    for i in range(5):  # each 3000 bytes: the oldest go
        cache.put([1000 + i] * 100, bytearray(3000))
    assert cache.used_bytes <= 10_000 and len(cache) == 3


def test_the_plan_counts_the_limit_and_a_budget_cuts_it(default_gguf) -> None:
    from localrun.engine.messages import LoadRequest
    from localrun.engine.plan import PROMPT_CACHE_CAP, plan_load
    from localrun.models import fit
    from localrun.models.gguf_info import inspect_gguf

    info = inspect_gguf(default_gguf)
    slot_kv = fit.kv_cache_bytes(info, n_ctx=2048, kv_type="f16")
    plan = plan_load(LoadRequest(str(default_gguf), LoadOptions(parallel=4, n_ctx=2048)))
    model = fit.worker_bytes(info, n_ctx=2048, slots=4, kv_type="f16")
    assert plan.prompt_cache == min(slot_kv, PROMPT_CACHE_CAP) and plan.bytes == model + plan.prompt_cache
    assert "prompt cache ≤" in plan.how
    tight = plan_load(
        LoadRequest(str(default_gguf), LoadOptions(parallel=4, n_ctx=2048, memory_budget_bytes=model + MB))
    )
    assert tight.prompt_cache == MB and tight.bytes == model + MB  # what the budget leaves beside the model
    one = plan_load(LoadRequest(str(default_gguf), LoadOptions(parallel=1, n_ctx=2048)))
    assert one.prompt_cache == 0  # one slot: a chat keeps its own cache, nothing is pushed out
