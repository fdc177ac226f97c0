"""First answers: the loop guard (one definition of a loop, finish reason "repetition" everywhere it is
shown), DRY and the presence/frequency penalties on llama.cpp (the C chain and our numpy copy agree), and
`models info` on files nothing can load."""

from __future__ import annotations

import ctypes
import math
from collections import Counter

import numpy as np
import pytest
from gguf_corpus import STR, build, tiny_kvs, tiny_tensors

from localrun.cli import main
from localrun.engine.events import GenerationSummary
from localrun.engine.generate import generate
from localrun.engine.penalties import penalized
from localrun.engine.repetition import find_loop
from localrun.engine.speculative import filtered_probs
from localrun.format import stats_line, summary_table
from localrun.server.replies import figures, openai_finish
from localrun.settings import SamplingParams

LOOP_PROMPT = "Write the word hello 50 times."
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": 200}


def _words(text: str) -> tuple[list[int], dict[int, str]]:
    """Ids for a made-up vocabulary: each distinct word or number is one token."""
    vocab: dict[str, int] = {}
    return [vocab.setdefault(w, len(vocab)) for w in text.split(" ")], {i: w for w, i in vocab.items()}


def test_loop_rule_on_made_up_text() -> None:
    def loops(text: str) -> bool:
        ids, words = _words(text)
        return find_loop(ids, words.__getitem__) is not None

    assert loops(" ".join(["the cat sat on the mat ,"] * 12))  # a span said over and over
    assert loops(" ".join(f"{n} . Mona Ali \n" for n in range(10, 40)))  # the numbers change, the item does not
    assert not loops(" ".join(str(n) for n in range(1, 200)))  # counting is not a loop
    assert not loops(" ".join(f"{n} , {n + 1} ;" for n in range(100)))  # nor numbers in a repeating form
    assert not loops(" ".join(["the cat sat on the mat ,"] * 4))  # too short to call
    fruits = "apple pear plum fig kiwi lime date lemon mango melon grape peach cherry guava olive orange".split()
    assert not loops(" ".join(f"- {f} \n" for f in fruits * 2))  # a list of different items, even said twice


def _chat(backend, text: str) -> list[int]:
    return backend.tokenize(backend.render_chat([{"role": "user", "content": text}]))


def test_loop_guard_stops_a_looping_reply(llama_backend) -> None:
    ids = _chat(llama_backend, LOOP_PROMPT)
    guarded = generate(llama_backend, ids, SamplingParams(**GREEDY))
    free = generate(llama_backend, ids, SamplingParams(**GREEDY, loop_guard=False))
    assert free.finish_reason == "length" and free.generated_tokens == 200
    assert guarded.finish_reason == "repetition" and guarded.generated_tokens < 100
    assert free.text.startswith(guarded.text)
    assert "stopped: repetition" in stats_line(guarded) and "stopped: the token limit" in stats_line(free)
    assert dict(summary_table(guarded))["finish reason"].startswith("repetition")


def _repeated_ngrams(text: str, n: int = 3) -> int:
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return sum(c - 1 for c in grams.values() if c > 1)


def test_dry_repeats_less(llama_backend) -> None:
    ids = _chat(llama_backend, LOOP_PROMPT)
    plain = generate(llama_backend, ids, SamplingParams(**GREEDY, loop_guard=False))
    dry = generate(llama_backend, ids, SamplingParams(**GREEDY, loop_guard=False, dry_multiplier=0.8))
    assert _repeated_ngrams(dry.text) < _repeated_ngrams(plain.text) / 2, dry.text


def test_cli_says_why_it_stopped(default_gguf, cli) -> None:
    args = ("chat", str(default_gguf), "-p", LOOP_PROMPT, "--temperature", "0", "--repeat-penalty", "1")
    args += ("--dry-multiplier", "0")  # the catalog recommends DRY for this model: this is the guard on its own
    stopped = cli(*args, "--max-tokens", "200", "--n-ctx", "512", "--n-threads", "1")
    assert stopped.returncode == 0 and "stopped: repetition" in stopped.stderr
    free = cli(*args, "--no-loop-guard", "--max-tokens", "200", "--n-ctx", "512", "--n-threads", "1")
    assert free.returncode == 0 and "stopped: the token limit" in free.stderr
    assert len(free.stdout) > len(stopped.stdout)


def test_api_says_stop_and_the_real_reason_beside_it() -> None:
    s = GenerationSummary("repetition", 10, 10, 70, 0.01, 100.0, 50.0, 1.0, 1, None)
    assert openai_finish(s) == "stop" and figures(s)["finish_reason"] == "repetition"
    assert openai_finish(GenerationSummary("length", 1, 1, 1, None, None, None, 0.1, 1, None)) == "length"


# -- the C chain and the numpy chain (speculative sampling's) agree ------------------------------------


def _token_array(llama_cpp, logits: np.ndarray):
    n = len(logits)
    data = (llama_cpp.llama_token_data * n)()
    view = np.ctypeslib.as_array(ctypes.cast(data, ctypes.POINTER(ctypes.c_float)), shape=(3 * n,))
    view[0::3] = np.arange(n, dtype=np.int32).view(np.float32)
    view[1::3] = logits
    return data, llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)


def _c_chain(backend, params: SamplingParams, history: list[int], seed: int = 0):
    from localrun.backends.llama_ctx import SamplerChain

    return SamplerChain(backend._runner, params, seed=seed, history=history)


PENALTIES = [
    {"dry_multiplier": 0.8},
    {"dry_multiplier": 1.5, "dry_base": 2.0, "dry_allowed_length": 1, "dry_penalty_last_n": 24},
    {"frequency_penalty": 0.4, "presence_penalty": 0.6},
    {"repeat_penalty": 1.2, "frequency_penalty": 0.2, "presence_penalty": -0.3, "dry_multiplier": 1.0},
]


def _looping_context(backend) -> list[int]:
    text = backend.render_chat([{"role": "user", "content": "Name some fruit."}])
    return backend.tokenize(text + "Apples: pears, plums, apples, pears, plums, apples, pears")


@pytest.mark.parametrize("kw", PENALTIES)
def test_numpy_penalties_are_the_c_chains(llama_backend, kw) -> None:
    """The C chain's logits after its penalties and DRY (greedy: nothing else changes them) equal ours."""
    from localrun.backends.llama_ctx import llama_cpp

    b, ids = llama_backend, _looping_context(llama_backend)
    b._runner.trim(0)
    b._runner.eval(ids)
    logits = np.array(b._runner.logits(-1), dtype=np.float32)
    params = SamplingParams(temperature=0.0, **kw)
    chain = _c_chain(b, params, ids)
    try:
        data, arr = _token_array(llama_cpp, logits)
        for i in range(llama_cpp.llama_sampler_chain_n(chain.chain) - 1):  # all but the final greedy pick
            llama_cpp.llama_sampler_apply(llama_cpp.llama_sampler_chain_get(chain.chain, i), ctypes.byref(arr))
        theirs = np.empty(len(logits))
        for i in range(arr.size):
            theirs[data[i].id] = data[i].logit
    finally:
        chain.close()
    ours = penalized(logits, params, ids, breakers=b.dry_breakers(params))
    assert (np.abs(theirs - logits) > 1e-6).sum() >= 1  # the penalties did something here
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("kw", PENALTIES[:1] + PENALTIES[3:])
def test_c_chain_draws_follow_filtered_probs_with_penalties(llama_backend, kw) -> None:
    """Draws from llama.cpp's own chain (temperature 1, top-k 8) follow filtered_probs with the same
    penalties, the distribution speculative sampling keeps (chi-square); without the penalties they do not."""
    from localrun.backends.llama_ctx import llama_cpp

    b, ids = llama_backend, _looping_context(llama_backend)
    b._runner.trim(0)
    b._runner.eval(ids)
    logits = np.array(b._runner.logits(-1), dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, **kw)
    p = filtered_probs(logits, params, ids, breakers=b.dry_breakers(params))
    plain = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0), ids)
    chain = _c_chain(b, params, ids, seed=7)
    counts = np.zeros(len(p))
    try:
        for _ in range(4000):
            data, arr = _token_array(llama_cpp, logits)
            llama_cpp.llama_sampler_apply(chain.chain, ctypes.byref(arr))
            counts[data[arr.selected].id] += 1
    finally:
        chain.close()

    def stat(q: np.ndarray) -> tuple[float, int]:
        support = q > 0
        if counts[~support].sum():
            return math.inf, int(support.sum()) - 1
        expected = counts.sum() * q[support]
        return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1

    value, df = stat(p)
    assert value < _chi_square_critical(df)
    assert stat(plain)[0] > _chi_square_critical(stat(plain)[1])


# -- models info on files nothing can load ------------------------------------------------------------


def test_models_info_refuses_a_header_without_tensors(tmp_path, capsys) -> None:
    path = tmp_path / "header-only.gguf"
    path.write_bytes(build(tiny_kvs(**{"llama.block_count": None}), []))
    assert main(["models", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no tensors" in err and err.count(". ") == 0 and "Traceback" not in err


def test_models_info_shows_an_unknown_architecture_without_a_fit_verdict(tmp_path, capsys) -> None:
    path = tmp_path / "made-up.gguf"
    kvs = [(k, t, v) for k, t, v in tiny_kvs() if not k.startswith("llama.")]
    kvs = [
        ("general.architecture", STR, "madeupformer") if k == "general.architecture" else (k, t, v) for k, t, v in kvs
    ]
    path.write_bytes(build(kvs, tiny_tensors()))
    assert main(["models", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "madeupformer (unknown)" in out and "llama.cpp does not know this architecture" in out
    assert "CPU only" not in out and "largest context" not in out


# -- the same on transformers: the guard is backend-independent, DRY is our logits processor ----------


@pytest.fixture(scope="module")
def smol_hf():
    from localrun.backends import load_backend
    from localrun.settings import LoadOptions

    backend = load_backend(None, LoadOptions(backend="hf", n_ctx=512))
    yield backend
    backend.close()


def test_transformers_guard_and_dry(smol_hf) -> None:
    ids = _chat(smol_hf, LOOP_PROMPT)
    short = {**GREEDY, "max_tokens": 120}
    guarded = generate(smol_hf, ids, SamplingParams(**short))
    free = generate(smol_hf, ids, SamplingParams(**short, loop_guard=False))
    dry = generate(smol_hf, ids, SamplingParams(**short, loop_guard=False, dry_multiplier=0.8))
    assert free.finish_reason == "length" and guarded.finish_reason == "repetition"
    assert guarded.generated_tokens < free.generated_tokens
    assert _repeated_ngrams(dry.text) < _repeated_ngrams(free.text) / 2, dry.text
