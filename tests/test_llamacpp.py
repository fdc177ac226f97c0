"""Our own llama.cpp decode loop: the same tokens as Llama.generate(), exact prefill counts with
KV-cache reuse across turns, seeds, grammars, flash-attention settings."""

from __future__ import annotations

import pytest

from localrun.engine.generate import generate, stream_generate
from localrun.errors import UserError
from localrun.settings import LoadOptions, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


def _tokens(backend, ids, params, **kw) -> list[int]:
    return [t for e in stream_generate(backend, ids, params, **kw) for t in e.token_ids]


def _chat(backend, text: str) -> list[int]:
    return backend.tokenize(backend.render_chat([{"role": "user", "content": text}]))


def test_plain_decode_equals_llama_generate(default_gguf) -> None:
    """Greedy tokens match llama-cpp-python's own Llama.generate() on the same file and settings."""
    import llama_cpp

    from localrun.backends import load_backend

    backend = load_backend(default_gguf, LoadOptions(n_threads=1, n_ctx=512, flash_attn="on"))
    llm = llama_cpp.Llama(str(default_gguf), n_ctx=512, n_batch=512, flash_attn=True, verbose=False)
    try:
        ids = _chat(backend, "Name three colours.")
        ours = _tokens(backend, ids, GREEDY.replace(ignore_eos=True))
        theirs = []
        for token in llm.generate(ids, temp=0.0):
            theirs.append(token)
            if len(theirs) == len(ours):
                break
        assert ours == theirs
    finally:
        backend.close()
        llm.close()


def test_prefix_reuse_counts_exactly(llama_backend) -> None:
    """The next turn evaluates only what the KV cache lacks, and the count says so."""
    b = llama_backend
    first = [{"role": "user", "content": "What is the capital of France?"}]
    ids1 = b.tokenize(b.render_chat(first))
    s1 = generate(b, ids1, GREEDY)
    assert s1.prefill_tokens in (len(ids1), len(ids1) - 1, 0) or s1.prefill_tokens <= len(ids1)
    cached = ids1 + b.tokenize(s1.text, special=False)[: s1.generated_tokens - 1]
    second = first + [{"role": "assistant", "content": s1.text}, {"role": "user", "content": "And of Italy?"}]
    ids2 = b.tokenize(b.render_chat(second))
    common = next(
        (i for i, (x, y) in enumerate(zip(cached, ids2, strict=False)) if x != y), min(len(cached), len(ids2))
    )
    s2 = generate(b, ids2, GREEDY)
    assert s2.prefill_tokens == len(ids2) - common
    assert 0 < s2.prefill_tokens < len(ids2)
    assert s2.cached_tokens == common


def test_same_prompt_after_one_token_needs_no_prefill(llama_backend) -> None:
    """Stopped right after the first token, the cache holds exactly the prompt and its logits are live."""
    ids = _chat(llama_backend, "Say hello.")
    one = SamplingParams(temperature=0.0, max_tokens=1)
    a = generate(llama_backend, ids, one)
    b = generate(llama_backend, ids, one)
    assert b.prefill_tokens == 0 and b.text == a.text
    c = generate(llama_backend, ids, GREEDY)
    assert c.prefill_tokens == 0 and c.text.startswith(a.text)
    d = generate(llama_backend, ids, GREEDY)  # the cache ran on past the prompt: its last token is evaluated again
    assert d.prefill_tokens == 1 and d.text == c.text


def test_seed_is_honoured(llama_backend) -> None:
    ids = _chat(llama_backend, "Write a word.")
    params = SamplingParams(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, max_tokens=12, seed=7, ignore_eos=True)
    assert _tokens(llama_backend, ids, params) == _tokens(llama_backend, ids, params)
    others = {tuple(_tokens(llama_backend, ids, params.replace(seed=s))) for s in (8, 9, 10)}
    assert len(others | {tuple(_tokens(llama_backend, ids, params))}) > 1


def test_grammar_constrains_output(llama_backend) -> None:
    ids = _chat(llama_backend, "Is the sky green? Answer in one word.")
    yes_no = SamplingParams(temperature=1.0, max_tokens=8, seed=1, grammar='root ::= "yes" | "no"')
    for seed in (1, 2, 3):
        assert generate(llama_backend, ids, yes_no.replace(seed=seed)).text in ("yes", "no")
    digits = SamplingParams(temperature=0.0, max_tokens=6, grammar="root ::= [0-9]+")
    text = generate(llama_backend, ids, digits).text
    assert text and text.isdigit()


def test_bad_grammar_is_one_sentence(llama_backend) -> None:
    s = generate(llama_backend, _chat(llama_backend, "Hi"), SamplingParams(max_tokens=4, grammar="root ::= ("))
    assert s.finish_reason == "error" and "grammar" in s.error


def test_quantized_kv_needs_flash_attention(default_gguf) -> None:
    from localrun.backends import load_backend

    with pytest.raises(UserError, match="flash attention"):
        load_backend(default_gguf, LoadOptions(n_threads=1, n_ctx=256, kv_type="q8_0", flash_attn="off"))
    backend = load_backend(default_gguf, LoadOptions(n_threads=1, n_ctx=256, kv_type="q8_0"))  # auto turns it on
    try:
        assert generate(backend, _chat(backend, "Hi"), GREEDY).generated_tokens > 0
    finally:
        backend.close()


def test_ready_line_shows_flash_attention_and_context(llama_backend) -> None:
    line = llama_backend.report.describe()
    assert "ctx 2048" in line and "flash-attn auto" in line


def test_context_full_is_length(default_gguf) -> None:
    from localrun.backends import load_backend

    backend = load_backend(default_gguf, LoadOptions(n_threads=1, n_ctx=64))
    try:
        ids = _chat(backend, "Count to one hundred.")
        s = generate(backend, ids, SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
        assert s.finish_reason == "length" and s.generated_tokens == backend.report.n_ctx - len(ids)
    finally:
        backend.close()


def test_plain_greedy_is_an_argmax_equal_to_llama_cpps_greedy_sampler(llama_backend) -> None:
    """Greedy with nothing else in the chain skips llama_sampler_sample (it copies every logit into a candidate
    array first); the token must be the one llama.cpp's own greedy sampler picks, step after step."""
    from localrun.backends.llama_ctx import SamplerChain

    runner = llama_backend._runner
    params = SamplingParams(temperature=0.0)
    fast, slow = SamplerChain(runner, params, seed=0), SamplerChain(runner, params, seed=0)
    slow._argmax = False  # the chain as llama.cpp runs it
    assert fast._argmax and not SamplerChain(runner, params.replace(repeat_penalty=1.1), seed=0)._argmax
    ids = llama_backend.tokenize("The three primary colours are")
    runner.trim(0)
    runner.eval(ids)
    try:
        for _ in range(24):
            token = fast.sample(-1)
            assert token == slow.sample(-1)
            runner.eval([token])
    finally:
        fast.close()
        slow.close()
        runner.trim(0)
