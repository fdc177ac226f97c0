"""Speculative decoding on llama.cpp: the same greedy output as plain decoding, a model drafting for
itself accepts (nearly) everything, speculative sampling keeps the target's distribution, and a
draft with another vocabulary is refused with a sentence."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cached_build

from localrun.engine.drafting import Calibration, DraftSchedule, ModelDrafter, PromptLookupDrafter
from localrun.engine.generate import stream_generate
from localrun.engine.speculative import (
    Draft,
    VocabSummary,
    accept_sampled,
    check_compatible,
    filtered_probs,
    sample_from,
)
from localrun.errors import UserError
from localrun.settings import LoadOptions, SamplingParams

COPY_PROMPT = "Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons, limes, melons."


@pytest.fixture(scope="module")
def self_drafting(default_gguf):
    """The default model with itself as its draft (fixed length, so every round drafts)."""
    from localrun.backends import load_backend

    opts = LoadOptions(n_threads=1, n_ctx=512, draft=str(default_gguf), draft_max=4, draft_mode="fixed")
    backend = load_backend(default_gguf, opts)
    yield backend
    backend.close()


def _run(backend, ids, params, *, draft: bool) -> tuple[list[int], list[bool], object]:
    saved = backend.drafter
    backend.drafter = saved if draft else None
    try:
        events = list(stream_generate(backend, ids, params))
    finally:
        backend.drafter = saved
    tokens = [t for e in events for t in e.token_ids]
    flags = [f for e in events for f in e.from_draft]
    return tokens, flags, events[-1].summary


def _chat(backend, text: str) -> list[int]:
    return backend.tokenize(backend.render_chat([{"role": "user", "content": text}]))


def _assert_same_or_near_tie(backend, ids: list[int], plain: list[int], spec: list[int]) -> None:
    """Token-for-token equal, except where batched verify and single-token decode may disagree: a
    near-tie, the target's top two logits within 1e-3 at the first differing position."""
    diff = next((i for i, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b), None)
    if diff is None:
        assert len(plain) == len(spec)
        return
    runner = backend._runner
    context = ids + plain[:diff]
    runner.trim(0)
    runner.eval(context)
    top2 = np.sort(runner.logits(-1))[-2:]
    assert top2[1] - top2[0] < 1e-3, f"outputs differ at token {diff} without a near-tie"


def test_self_draft_is_plain_output_and_accepts_everything(self_drafting) -> None:
    b = self_drafting
    ids = _chat(b, "Tell me about the moon.")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain, _, _ = _run(b, ids, params, draft=False)
    spec, flags, summary = _run(b, ids, params, draft=True)
    _assert_same_or_near_tie(b, ids, plain, spec)
    assert summary.draft_tokens >= 20 and summary.acceptance_rate >= 0.99
    assert sum(flags) == summary.accepted_tokens and summary.mean_accepted_length > 2
    assert summary.draft_s > 0 and summary.verify_s > 0 and set(summary.draft_lengths[:-1]) == {4}
    assert summary.draft_lengths[-1] == 3  # 1 + 7 rounds of 5 leave 4 tokens: the last round drafts no further


def test_a_draft_under_auto_slots_drafts_for_a_request_alone(default_gguf) -> None:
    """The UI and the server ask for slots chosen from memory (parallel 0): the target takes its slots, the draft
    keeps one sequence (it once took slots and had no runner), and a request alone drafts in its slot."""
    from localrun.backends import load_backend

    backend = load_backend(default_gguf, LoadOptions(n_threads=1, n_ctx=512, parallel=0, draft=str(default_gguf)))
    try:
        assert backend.report.parallel >= 1 and backend.drafter.backend.report.parallel == 1
        events = list(
            stream_generate(backend, _chat(backend, COPY_PROMPT), SamplingParams(max_tokens=24, ignore_eos=True))
        )
        assert events[-1].summary.generated_tokens == 24 and events[-1].summary.draft_tokens > 0
    finally:
        backend.close()


@pytest.mark.gpu
def test_self_draft_on_the_gpu(default_gguf) -> None:
    """The same on a CUDA build of llama-cpp-python with an NVIDIA GPU: target and draft both offloaded."""
    from conftest import llama_device

    from localrun.backends import load_backend

    if llama_device() != "cuda":
        pytest.skip("needs a CUDA build of llama-cpp-python and an NVIDIA GPU")
    opts = LoadOptions(device="cuda", n_ctx=512, draft=str(default_gguf), draft_max=4, draft_mode="fixed")
    b = load_backend(default_gguf, opts)
    try:
        assert b.report.device == "cuda" and b.drafter.backend.report.device == "cuda"
        ids = _chat(b, "Tell me about the moon.")
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        plain, _, _ = _run(b, ids, params, draft=False)
        spec, _, summary = _run(b, ids, params, draft=True)
        _assert_same_or_near_tie(b, ids, plain, spec)
        assert summary.draft_tokens >= 20 and summary.acceptance_rate >= 0.99
    finally:
        b.close()


PENALTIES = [
    {},
    {"repeat_penalty": 1.1},
    {"dry_multiplier": 1.5, "dry_allowed_length": 1, "frequency_penalty": 0.5, "presence_penalty": 0.5},
]


@pytest.mark.parametrize("penalty", PENALTIES)
def test_sampled_self_draft_accepts_nearly_all(self_drafting, penalty: dict) -> None:
    """At temperature 1 with p = q the rule min(1, p/q) accepts everything; the verify batch's logits
    differ from single-token decoding in the last bits, which moves a few tokens across the top-p /
    min-p edges, so a few are rejected. With penalties and DRY the draft's q sees the same text as p."""
    ids = _chat(self_drafting, "Tell me about the sea.")
    params = SamplingParams(temperature=1.0, max_tokens=32, seed=3, ignore_eos=True, **penalty)
    tokens, _, summary = _run(self_drafting, ids, params, draft=True)
    assert len(tokens) == 32 and summary.acceptance_rate >= 0.8
    again, _, _ = _run(self_drafting, ids, params, draft=True)
    assert again == tokens  # seeded


def test_prompt_lookup_is_plain_output(default_gguf) -> None:
    from localrun.backends import load_backend

    b = load_backend(default_gguf, LoadOptions(n_threads=1, n_ctx=512, lookup=True))
    try:
        ids = _chat(b, COPY_PROMPT)
        params = SamplingParams(temperature=0.0, max_tokens=30)
        plain, _, _ = _run(b, ids, params, draft=False)
        spec, flags, summary = _run(b, ids, params, draft=True)
        _assert_same_or_near_tie(b, ids, plain, spec)
        assert any(flags) and summary.accepted_tokens == sum(flags)
        assert "draft prompt lookup" in b.report.describe()
    finally:
        b.close()


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (Wilson-Hilferty; no scipy here)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    support = p > 0
    expected = counts.sum() * p[support]
    assert counts[~support].sum() == 0, "a token outside the target's support came out"
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.mark.parametrize("point_mass", [False, True])
def test_speculative_sampling_follows_the_target(llama_backend, point_mass: bool) -> None:
    """Real target and draft distributions (the model after two different prompts, temperature 1,
    top-k 6); the first token out of many simulated rounds follows the target (chi-square, seeded),
    while the draft's own distribution fails the same test."""
    b = llama_backend
    params = SamplingParams(temperature=1.0, top_k=6, top_p=1.0, min_p=0.0)
    runner = b._runner

    def dist(text: str) -> np.ndarray:
        ids = _chat(b, text)
        runner.trim(0)
        runner.eval(ids)
        return filtered_probs(runner.logits(-1), params)

    p, q = dist("Name a colour."), dist("Name a fruit.")
    assert np.abs(p - q).sum() > 0.5  # really different
    rng = np.random.default_rng(1234)
    n = 20000
    first = np.zeros(len(p))
    for _ in range(n):
        x = int(np.argmax(q)) if point_mass else sample_from(q, rng)
        draft = Draft((x,), None if point_mass else q[None, :])
        n_ok, token = accept_sampled(lambda i: p, draft, rng)
        first[x if n_ok else token] += 1
    stat, df = _chi_square(first, p)
    assert stat < _chi_square_critical(df)
    draws = np.bincount([sample_from(q, rng) for _ in range(n)], minlength=len(p))
    assert (draws[p == 0].sum() > 0) or _chi_square(draws, p)[0] > _chi_square_critical(df)


def test_vocab_mismatch_is_one_sentence() -> None:
    target = VocabSummary(100, {"end-of-sequence": 2}, {5: "a", 50: "b"})
    with pytest.raises(UserError, match="vocabulary of 90 tokens and the target 100"):
        check_compatible(target, VocabSummary(90, {"end-of-sequence": 2}, {5: "a", 50: "b"}), "d.gguf")
    with pytest.raises(UserError, match="end-of-sequence token 3 and the target 2"):
        check_compatible(target, VocabSummary(100, {"end-of-sequence": 3}, {5: "a", 50: "b"}), "d.gguf")
    with pytest.raises(UserError, match="Token 50 is 'c' in the draft"):
        check_compatible(target, VocabSummary(100, {"end-of-sequence": 2}, {5: "a", 50: "c"}), "d.gguf")


@pytest.fixture(scope="module")
def other_vocab_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama whose tokenizer has two tokens swapped: same size, another vocabulary."""
    from test_to_gguf import build_tiny_model

    from localrun.models.catalog import default_model_path
    from localrun.quantize.to_gguf import convert_hf_to_gguf, restore_pre_tokenizer

    def build(path: Path) -> None:
        from transformers import AutoTokenizer

        tok = path.parent / "swapped-tok"
        gguf = default_model_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tok)
        restore_pre_tokenizer(tok, "smollm")
        data = json.loads((tok / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        by_id = {i: t for t, i in vocab.items()}
        a, b = by_id[192], by_id[384]
        vocab[a], vocab[b] = 384, 192
        (tok / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        hf = build_tiny_model("llama", tok, path.parent / "swapped-hf")
        convert_hf_to_gguf(hf, path, out_type="F32")
        shutil.rmtree(hf)

    return cached_build(tmp_path_factory, "swapped-vocab.gguf", build)


def test_draft_with_another_vocabulary_is_refused(default_gguf, other_vocab_gguf, cli) -> None:
    from localrun.backends import load_backend

    with pytest.raises(UserError, match="Token (192|384) is .* in the draft model swapped-vocab.gguf"):
        load_backend(default_gguf, LoadOptions(n_threads=1, n_ctx=256, draft=str(other_vocab_gguf)))
    result = cli("chat", str(default_gguf), "--draft", str(other_vocab_gguf), "-p", "Hi", "--n-ctx", "256")
    assert result.returncode == 2 and "share the target's tokenizer" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_chat_with_lookup_shows_acceptance(default_gguf, cli) -> None:
    args = ("chat", str(default_gguf), "--lookup", "-p", COPY_PROMPT, "--temperature", "0", "--max-tokens", "24")
    result = cli(*args, "--n-ctx", "512", "--n-threads", "1")
    assert result.returncode == 0, result.stderr
    assert "draft accepted" in result.stderr and "apples" in result.stdout.lower()


def test_prompt_lookup_finds_the_continuation() -> None:
    d = PromptLookupDrafter(n_max=4)
    ids = [1, 2, 3, 4, 5, 6, 9, 2, 3]
    assert d.lookup(ids, 4) == [4, 5, 6, 9]
    assert d.lookup([*ids, 4, 5], 2) == [6, 9]  # incremental: the index grows with the text
    assert d.lookup([7, 8], 4) == []  # a new request: nothing earlier matches


def test_adaptive_schedule_picks_the_length_its_cost_model_says_is_fastest() -> None:
    s = DraftSchedule(n_max=16)
    assert [s.next_length() for _ in range(4)] == [0, 0, 0, 0]  # plain steps, timed, come first
    for _ in range(4):
        s.observe_plain(0.010)
    assert s.next_length() == 4
    # a cheap draft (1 ms a token), a verify batch of n tokens in 10 + n ms, and every drafted token accepted
    for _ in range(5):
        k = s.next_length()
        s.observe_round(k, k, 0.010 + 0.001 * (k + 1) + 0.001 * k, 0.001 * k)
    assert s.next_length() == 16 and s.expected_gain(16) > 2
    # the same costs with one drafted token in two accepted: a shorter length is best, still faster than plain
    for _ in range(30):
        k = s.next_length()
        s.observe_round(k, 1, 0.010 + 0.001 * (k + 1) + 0.001 * k, 0.001 * k)
    k = s.next_length()
    assert 1 <= k < 16 and s.expected_gain(k) > 1
    a, b = s.verify_line()
    assert abs(a - 0.010) < 1.5e-3 and abs(b - 0.001) < 3e-4  # the line through the plain step and the rounds


def test_calibration_learns_how_often_unsure_drafts_are_right() -> None:
    close, rough = Calibration(), Calibration()
    assert close.rate(0.3) == rough.rate(0.3) == 0.3  # before any round: the draft's own probability
    for _ in range(100):
        close.observe([0.95, 0.3, 0.3], accepted=3)  # a draft close to its target: right even where unsure
        rough.observe([0.95, 0.3, 0.3], accepted=1)  # a rough one: wrong where unsure
    assert close.rate(0.3) > 0.9 and rough.rate(0.3) < 0.1 and rough.rate(0.95) > 0.9


def test_a_round_stops_where_one_more_drafted_token_does_not_pay() -> None:
    drafter = ModelDrafter(backend=None)
    early = drafter._stop_rule()  # nothing measured yet: draft the whole length, whatever the probabilities
    assert early is not None and early(0.0) and early(0.0)
    assert ModelDrafter(backend=None, mode="fixed")._stop_rule() is None  # fixed: no probabilities asked for
    s = drafter.schedule
    for _ in range(4):
        s.next_length(), s.observe_plain(0.030)  # a plain step: 30 ms
    s.observe_round(4, 4, 0.030 + 0.003 * 5 + 0.012 * 4, 0.012 * 4, draft_decodes=4)  # 12 ms a draft step
    cost = s.extra_token_cost()
    assert cost is not None and 0.4 < cost < 0.6  # (d + b) / t: (12 + ~3) / 30
    go_on = drafter._stop_rule()
    assert go_on(0.95) and go_on(0.95)  # sure tokens: 0.95 x 0.95 of a plain step saved > half a step spent
    assert not go_on(0.3)  # an unsure one (a 30 % chance, by the prior) after them does not pay
    for _ in range(200):
        drafter.calibration.observe([0.3, 0.3], accepted=2)  # ... unless this draft is right where unsure
    go_on = drafter._stop_rule()
    assert go_on(0.95) and go_on(0.3)


def test_adaptive_schedule_pauses_when_drafting_loses_and_remembers_it() -> None:
    lookup, model = DraftSchedule(n_max=16), DraftSchedule(n_max=16, carry_pause=True)
    for s in (lookup, model):
        for _ in range(4):
            s.next_length(), s.observe_plain(0.010)
        for _ in range(DraftSchedule.JUDGE_AFTER):  # nothing accepted: plain decoding is clearly faster
            k = s.next_length()
            s.observe_round(k, 0, 0.012 + 0.004 * k, 0.004 * k, draft_decodes=k)
        assert s.next_length() == 0  # paused, probing again later
        s.begin()
    assert lookup.next_length() > 0  # prompt lookup probes for free: each request starts drafting
    assert model.next_length() == 0 and model.pause > 0  # a draft model's pause goes on into the next request
    slow = DraftSchedule(n_max=16)
    for _ in range(4):
        slow.next_length(), slow.observe_plain(0.010)
    k = slow.next_length()
    slow.observe_round(k, k, 0.011 + 0.010 * k, 0.010 * k, draft_decodes=k)  # all accepted, but as slow as the target
    assert slow.pause == DraftSchedule.BACKOFF_MAX  # it never pays: the longest pause at once
    marginal = DraftSchedule(n_max=16)
    for _ in range(4):
        marginal.next_length(), marginal.observe_plain(0.010)
    for _ in range(10):  # rounds about as fast as plain decoding: drafting goes on (it often pays later)
        k = marginal.next_length()
        marginal.observe_round(k, 1, 0.021, 0.005, draft_decodes=2)
        assert k > 0
    fixed = DraftSchedule(n_max=8, mode="fixed")
    fixed.observe_round(8, 0, 1.0)
    assert fixed.next_length() == 8


def test_a_drafting_backend_declares_what_its_drafter_calls(self_drafting) -> None:
    """Drafting is part of the protocol, not duck typing: the llama.cpp backend (and the draft model it
    loaded for itself) are DraftingBackends, and the remote backend, which cannot verify, is not."""
    from localrun.backends.base import DraftingBackend
    from localrun.backends.remote import RemoteBackend

    assert isinstance(self_drafting, DraftingBackend) and isinstance(self_drafting.drafter.backend, DraftingBackend)
    assert not RemoteBackend.supports_draft and not hasattr(RemoteBackend, "propose_tokens")
