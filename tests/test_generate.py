"""stream_generate on the real default model: streaming, stop strings, UTF-8, cancel, cache reuse."""

from __future__ import annotations

import threading

import pytest
from conftest import llama_device, nvidia_gpus

from localrun.engine.chat import ChatSession
from localrun.engine.generate import IncrementalDetokenizer, StopMatcher, generate, stream_generate
from localrun.errors import UserError
from localrun.settings import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)
QUESTION = [{"role": "user", "content": "Write three sentences about the sea."}]


def _prompt(backend, messages=QUESTION):
    return backend.tokenize(backend.render_chat(messages))


def test_streamed_text_equals_non_streamed(llama_backend):
    ids = _prompt(llama_backend)
    events = list(stream_generate(llama_backend, ids, GREEDY))
    streamed = "".join(e.text for e in events)
    token_ids = [t for e in events for t in e.token_ids]
    assert len(events) > 5 and events[-1].finish_reason in ("stop", "length")
    assert streamed == llama_backend.detokenize(token_ids)
    # The library's own non-streaming completion gives the same text at temperature 0 (same file and
    # context; flash attention on, which is what our default "auto" resolves to on a CPU).
    import llama_cpp

    report = llama_backend.report
    llm = llama_cpp.Llama(report.model_path, n_ctx=report.n_ctx, flash_attn=True, verbose=False)
    try:
        plain = llm.create_completion(ids, max_tokens=GREEDY.max_tokens, temperature=0.0)
    finally:
        llm.close()
    assert streamed == plain["choices"][0]["text"]


def test_events_carry_cumulative_stats(llama_backend):
    events = list(stream_generate(llama_backend, _prompt(llama_backend), GREEDY))
    assert [e.generated_tokens for e in events[:-1]] == list(range(1, len(events)))
    first, last = events[0], events[-1]
    assert first.ttft_s is not None and first.ttft_s > 0 and first.decode_tps is None
    assert last.decode_tps > 0 and last.prompt_tps > 0 and last.peak_ram_bytes >= first.ram_bytes > 0
    assert (last.peak_vram_bytes is not None) == bool(nvidia_gpus())  # a VRAM figure exactly when there is a GPU
    s = last.summary
    assert s.finish_reason == last.finish_reason and s.generated_tokens == last.generated_tokens
    assert s.backend == "llamacpp" and s.device == llama_device() and s.text == "".join(e.text for e in events)


def test_stop_string_across_token_boundaries(llama_backend):
    ids = _prompt(llama_backend)
    full = generate(llama_backend, ids, GREEDY).text
    words = full.split()
    assert len(words) > 6
    stop = f"{words[3]} {words[4]}"  # spans at least two tokens
    cut = generate(llama_backend, ids, GREEDY.replace(stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["</end>"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("en") == ("", False)
    assert m.feed("d> tail") == ("", True)
    m = StopMatcher(["xyz"])
    assert m.feed("abc x") == ("abc ", False)
    assert m.feed("q") == ("xq", False)
    assert m.flush() == ""


@pytest.mark.parametrize("text", ["Emoji: 🦙🚀👩‍💻 done", "中文字符测试，日本語のテキスト", "naïve café — ½ ∑"])
def test_incremental_detokenizer_never_splits_characters(llama_backend, text):
    ids = llama_backend.tokenize(text, special=False)
    assert len(ids) > len(text.split())  # the real tokenizer splits these characters into byte tokens
    detok = IncrementalDetokenizer(llama_backend.detokenize)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_cancel_then_next_request_works(llama_backend):
    ids = _prompt(llama_backend)
    reference = generate(llama_backend, ids, GREEDY).text
    cancel = threading.Event()
    events = []
    for event in stream_generate(llama_backend, ids, GREEDY.replace(max_tokens=200), cancel=cancel):
        events.append(event)
        if event.generated_tokens == 5:
            cancel.set()
    assert events[-1].finish_reason == "cancelled" and events[-1].generated_tokens == 5
    # closing the iterator half-way is the other way to stop
    stream = stream_generate(llama_backend, ids, GREEDY)
    next(stream)
    stream.close()
    assert generate(llama_backend, ids, GREEDY).text == reference


def test_second_chat_turn_evaluates_only_new_tokens(llama_backend):
    session = ChatSession(llama_backend)
    list(session.send("Name a colour.", GREEDY))
    first = session.last
    list(session.send("Name another one.", GREEDY))
    second = session.last
    # Tokens turn 2 adds beyond what turn 1 already ran through the model (its prompt and reply).
    new_part = second.prompt_tokens - first.prompt_tokens - first.generated_tokens
    assert 0 < second.prefill_tokens <= new_part + 2, (second.prefill_tokens, new_part)
    assert second.cached_tokens >= first.prompt_tokens


def test_errors_end_the_stream_with_an_error_event(llama_backend):
    too_long = [1] * (llama_backend.report.n_ctx + 1)
    events = list(stream_generate(llama_backend, too_long, GREEDY))
    assert len(events) == 1 and events[0].finish_reason == "error"
    assert "context" in events[0].summary.error


def test_a_turn_that_produces_nothing_is_undone(llama_backend):
    session = ChatSession(llama_backend)
    list(session.send("Name a colour.", GREEDY))
    before = list(session.messages)
    with pytest.raises(UserError):  # refused before generating: too long for the context
        list(session.send("word " * (llama_backend.report.n_ctx + 10), GREEDY))
    assert session.messages == before
    cancel = threading.Event()
    cancel.set()  # stopped before the first token: nothing comes back
    list(session.regenerate(GREEDY, cancel=cancel))
    assert session.messages == before  # the previous reply is restored
    list(session.send("And another?", GREEDY, cancel=cancel))
    assert session.messages == before


def test_answer_takes_a_given_history(llama_backend):
    session = ChatSession(llama_backend, system="Answer briefly.")
    given = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Name another one."},
    ]
    events = list(session.answer(given, GREEDY.replace(max_tokens=6)))
    assert session.messages[:3] == given and session.messages[3]["role"] == "assistant"
    assert session.messages[3]["content"] == events[-1].summary.text != ""
    answered = list(session.messages)
    cancel = threading.Event()
    cancel.set()
    list(session.answer(given[:1], GREEDY, cancel=cancel))  # nothing comes back: the history stays as it was
    assert session.messages == answered
    with pytest.raises(UserError, match="nothing to regenerate"):
        list(ChatSession(llama_backend).regenerate(GREEDY))
