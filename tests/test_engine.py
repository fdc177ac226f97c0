"""Continuous batching (localrun.engine.scheduler) on the real default model: several requests decoded together
give what each gives alone, a consumer that leaves frees its slot, a shared prefix is not evaluated again, and a
long prompt is fed in chunks between the running streams' steps."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from localrun.backends import load_backend
from localrun.engine.generate import generate, stream_generate
from localrun.engine.scheduler import PREFILL_CHUNK
from localrun.models.catalog import resolve_model
from localrun.settings import LoadOptions, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
QUESTIONS = [
    "What is the capital of France?",
    "Write a poem about the sea.",
    "Explain photosynthesis in one paragraph.",
    "List three colours and say why you like them.",
    "Who wrote Hamlet?",
    "What is two plus two?",
    "Name a fruit that is yellow.",
    "Tell me a joke about cats.",
]


@pytest.fixture(scope="module")
def backend() -> Iterator:
    b = load_backend(resolve_model(None), LoadOptions(parallel=4, n_ctx=2048))
    yield b
    b.close()


def _ids(backend, question: str) -> list[int]:
    return backend.tokenize(backend.render_chat([{"role": "user", "content": question}]))


def _together(backend, prompts: list[list[int]], params: SamplingParams) -> list:
    out: list = [None] * len(prompts)

    def run(i: int) -> None:
        out[i] = generate(backend, prompts[i], params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_the_load_report_shows_the_slots(backend) -> None:
    assert backend.report.parallel == 4 and backend.report.n_ctx == 2048
    assert "4 slots" in backend.report.describe()


@pytest.mark.parametrize("n", [4, 8])
def test_replies_decoded_together_equal_each_alone(backend, n: int) -> None:
    prompts = [_ids(backend, q) for q in QUESTIONS[:n]]
    alone = [generate(backend, p, GREEDY).text for p in prompts]
    together = _together(backend, prompts, GREEDY)  # 8 requests on 4 slots: 4 wait for a free one
    assert [s.text for s in together] == alone
    assert all(s.generated_tokens == GREEDY.max_tokens and s.finish_reason == "length" for s in together)


def test_a_consumer_that_leaves_frees_its_slot_and_the_others_are_unchanged(backend) -> None:
    prompts = [_ids(backend, q) for q in QUESTIONS[:3]]
    alone = [generate(backend, p, GREEDY).text for p in prompts]
    leaver = stream_generate(backend, _ids(backend, QUESTIONS[5]), GREEDY.replace(max_tokens=400))
    next(leaver)
    next(leaver)
    assert backend.scheduler.status()["slots_busy"] == 1
    results: list = [None] * 3

    def run(i: int) -> None:
        results[i] = generate(backend, prompts[i], GREEDY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    leaver.close()  # a client hanging up mid-stream
    for t in threads:
        t.join(300)
    assert [r.text for r in results] == alone
    assert backend.scheduler.status()["slots_busy"] == 0


def test_a_shared_prefix_is_not_evaluated_again(backend) -> None:
    system = " ".join(f"Rule {i}: answer briefly and politely." for i in range(70))
    first = backend.tokenize(
        backend.render_chat([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
    )
    second = backend.tokenize(
        backend.render_chat([{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}])
    )
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= 500
    before = backend.scheduler.status()["cached_tokens"]
    generate(backend, first, GREEDY.replace(max_tokens=4))
    summary = generate(backend, second, GREEDY.replace(max_tokens=4))
    assert summary.prompt_tokens == len(second)
    assert summary.prefill_tokens == len(second) - shared  # only the new tokens were evaluated
    assert backend.scheduler.status()["cached_tokens"] - before >= shared


def test_a_long_prompt_is_fed_in_chunks_between_the_running_streams_steps(backend) -> None:
    long_prompt = _ids(backend, " ".join(f"Sentence number {i} is about the weather." for i in range(180)))
    assert 3 * PREFILL_CHUNK < len(long_prompt) < backend.report.n_ctx - 2
    params = GREEDY.replace(max_tokens=200)
    streams = [stream_generate(backend, _ids(backend, q), params) for q in QUESTIONS[:3]]
    for s in streams:
        next(s)  # all three are generating
    counts = [0, 0, 0]
    seen: list[list[int]] = []  # the streams' token counts when the newcomer arrives, and at its first token

    def newcomer() -> None:
        seen.append(list(counts))
        for event in stream_generate(backend, long_prompt, GREEDY.replace(max_tokens=2)):
            assert event.summary is None, event.summary  # a token, not an error
            seen.append(list(counts))
            break

    t = threading.Thread(target=newcomer)
    t.start()
    while t.is_alive():  # keep consuming the three streams while the long prompt is evaluated
        for i, s in enumerate(streams):
            next(s)
            counts[i] += 1
            if counts[i] > params.max_tokens - 10:
                break
        else:
            continue
        break
    t.join(300)
    for s in streams:
        s.close()
    steps = -(-len(long_prompt) // PREFILL_CHUNK)
    # A prompt evaluated in one go would give the streams one token meanwhile; in chunks they each get one
    # per step of it (one decode row each, beside the chunk).
    assert len(seen) == 2, seen
    assert min(b - a for a, b in zip(*seen, strict=True)) >= steps - 1, (seen, steps)


MODEL_SIDE = """
import sys
from localrun.backends import load_backend
from localrun.models.catalog import resolve_model
from localrun.engine.jobs import run
from localrun.engine.messages import GenerateRequest
from localrun.settings import LoadOptions, SamplingParams
import localrun.engine.worker_child

params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
tool = {"type": "function", "function": {"name": "now", "description": "the time", "parameters": {"type": "object"}}}
backend = load_backend(resolve_model(None), LoadOptions(parallel=2, n_ctx=512))
chat = GenerateRequest(messages=({"role": "user", "content": "Hi"},), params=params, max_tokens=4, tools=(tool,))
for request in (chat, GenerateRequest(prompt="Once upon a time", params=params, max_tokens=4)):
    assert sum(len(e.token_ids) for e in run(backend, request, None)) == 4
backend.close()
print(sorted(m for m in sys.modules if m.startswith(("localrun.server", "fastapi", "starlette", "uvicorn"))))
"""


def test_the_model_side_of_an_api_request_never_imports_the_server() -> None:
    """What the model process runs for `localrun serve` (a tool chat and a completion through the engine's run, and the
    worker module) imports neither localrun.server nor the HTTP stack: the server sits on one side of the pipe."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MODEL_SIDE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_sequence_drafts_while_it_runs_alone_and_decodes_in_the_batch_otherwise(default_gguf) -> None:
    """--parallel 2 with a draft (the model drafting for itself, fixed length): a request alone runs speculative
    rounds in its slot and nearly every drafted token is accepted; two at once decode in one batch, not drafting
    while both generate. Every reply equals the plain one (greedy)."""
    opts = LoadOptions(parallel=2, n_ctx=1024, draft=str(default_gguf), draft_max=4, draft_mode="fixed")
    b = load_backend(resolve_model(None), opts)
    plain = load_backend(resolve_model(None), LoadOptions(n_ctx=1024))
    try:
        assert b.report.parallel == 2 and b.scheduler is not None and b.drafter is not None
        prompts = [_ids(b, q) for q in QUESTIONS[:2]]
        expected = [generate(plain, p, GREEDY).text for p in prompts]
        alone = generate(b, prompts[0], GREEDY)
        assert alone.text == expected[0]
        assert alone.draft_tokens >= 20 and alone.acceptance_rate >= 0.95 and alone.mean_accepted_length > 2
        steps_before = b.scheduler.status()["decode_steps"]
        both = _together(b, prompts, GREEDY)
        assert [s.text for s in both] == expected
        # a round emits up to draft_max + 1 tokens a step; 96 tokens in far fewer steps means drafting took over
        steps = b.scheduler.status()["decode_steps"] - steps_before
        assert steps >= GREEDY.max_tokens - 1, "two sequences generating together should not draft"
        assert sum(s.draft_tokens for s in both) <= 2 * GREEDY.max_tokens
    finally:
        b.close()
        plain.close()
