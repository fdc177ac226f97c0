"""Speculative decoding on the transformers backend, with tiny random llamas sharing SmolLM2's tokenizer:
greedy output is the plain (model.generate) output, a model drafting for itself accepts everything,
speculative sampling keeps the target's distribution, and a draft with another vocabulary is refused."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cached_build

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from localrun.backends import load_backend  # noqa: E402
from localrun.engine.generate import stream_generate  # noqa: E402
from localrun.errors import UserError  # noqa: E402
from localrun.settings import LoadOptions, SamplingParams  # noqa: E402

COPY_PROMPT = "Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons, limes, melons."


def _config(tok, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,  # wide weights: varied tokens rather than one repeated id
    )


def _build_family(root: Path) -> None:
    """target: 2 layers; small: its first layer only (a smaller draft); noisy: the target with its
    layers perturbed (a draft that often, but not always, agrees); all with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from localrun.models.catalog import default_model_path

    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    target = LlamaForCausalLM(_config(tok, 2))
    small = LlamaForCausalLM(_config(tok, 1))
    small.load_state_dict(target.state_dict(), strict=False)
    noisy = LlamaForCausalLM(_config(tok, 2))
    noisy.load_state_dict(target.state_dict())
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if "embed" not in name:
                p.add_(torch.randn_like(p) * 0.02)
    for name, model in (("target", target), ("small", small), ("noisy", noisy)):
        model.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_build(tmp_path_factory, "hf-spec-family", _build_family)


@pytest.fixture(scope="module")
def drafted(family: Path):
    """The target with the smaller model as its draft (fixed length: every round drafts)."""
    opts = LoadOptions(n_ctx=256, draft=str(family / "small"), draft_max=4, draft_mode="fixed")
    backend = load_backend(family / "target", opts)
    yield backend
    backend.close()


def _run(backend, ids, params, *, draft: bool) -> tuple[list[int], list[bool], object]:
    saved = backend.drafter
    backend.drafter = saved if draft else None
    try:
        events = list(stream_generate(backend, ids, params))
    finally:
        backend.drafter = saved
    return [t for e in events for t in e.token_ids], [f for e in events for f in e.from_draft], events[-1].summary


def _assert_same_or_near_tie(backend, ids: list[int], plain: list[int], spec: list[int], penalty: float) -> None:
    """Token-for-token equal, except where the batched verify and the plain path's single-token decode
    may disagree: a near-tie, the target's top two scores within 1e-3 at the first differing position."""
    diff = next((i for i, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b), None)
    if diff is None:
        assert len(plain) == len(spec)
        return
    from transformers import RepetitionPenaltyLogitsProcessor

    context = torch.tensor([ids + plain[:diff]], device=backend.model.device)
    with torch.inference_mode():
        scores = backend.model(context).logits[:, -1].float()
        if penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(penalty)(context, scores)
    top2 = torch.topk(scores[0], 2).values
    assert float(top2[0] - top2[1]) < 1e-3, f"outputs differ at token {diff} without a near-tie"


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_draft_model_gives_the_plain_output(drafted, penalty: float) -> None:
    ids = drafted.tokenize("The quick brown fox jumps over the lazy dog.")
    params = SamplingParams(temperature=0.0, max_tokens=40, repeat_penalty=penalty, ignore_eos=True)
    plain, _, _ = _run(drafted, ids, params, draft=False)
    spec, flags, summary = _run(drafted, ids, params, draft=True)
    assert len(set(plain)) > 5  # a varied reply, not one repeated id
    _assert_same_or_near_tie(drafted, ids, plain, spec, penalty)
    assert summary.draft_tokens >= 20 and set(summary.draft_lengths[:8]) == {4}  # the last ones fit max_tokens
    assert sum(flags) == summary.accepted_tokens
    assert summary.draft_s > 0 and summary.verify_s > 0
    assert "draft small" in drafted.report.describe()
    again, _, summary = _run(drafted, ids, params, draft=True)
    assert again == spec and summary.prefill_tokens == 1  # the cached prompt is reused, all but its last token


def test_closing_mid_reply_leaves_the_model_ready(drafted) -> None:
    ids = drafted.tokenize("A stream that is closed halfway through")
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    steps = drafted.generate_tokens(ids, params, drafted.drafter)
    first = [next(steps).token_id for _ in range(7)]
    steps.close()  # possibly mid-round: the cache is already cropped to what was accepted
    assert drafted._busy.acquire(timeout=0)
    drafted._busy.release()
    plain, _, _ = _run(drafted, ids, params, draft=False)
    spec, _, _ = _run(drafted, ids, params, draft=True)
    assert spec[:7] == first
    _assert_same_or_near_tie(drafted, ids, plain, spec, 1.0)


def test_self_draft_accepts_everything(family: Path) -> None:
    opts = LoadOptions(n_ctx=256, draft=str(family / "target"), draft_max=4, draft_mode="fixed")
    b = load_backend(family / "target", opts)
    try:
        ids = b.tokenize("Once upon a time, in a land far away,")
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        plain, _, _ = _run(b, ids, params, draft=False)
        spec, flags, summary = _run(b, ids, params, draft=True)
        _assert_same_or_near_tie(b, ids, plain, spec, 1.0)
        assert summary.draft_tokens >= 20 and summary.acceptance_rate >= 0.99
        assert sum(flags) == summary.accepted_tokens and summary.mean_accepted_length > 2
        # sampled, p = q: min(1, p/q) accepts all but what the batched rows move across a filter's edge
        for extra in ({}, {"dry_multiplier": 1.5, "dry_allowed_length": 1, "presence_penalty": 0.5}):
            sampled = SamplingParams(temperature=1.0, max_tokens=24, seed=3, ignore_eos=True, **extra)
            tokens, _, summary = _run(b, ids, sampled, draft=True)
            assert len(tokens) == 24 and summary.acceptance_rate >= 0.8
            assert _run(b, ids, sampled, draft=True)[0] == tokens  # seeded
    finally:
        b.close()


def test_prompt_lookup_gives_the_plain_output() -> None:
    """SmolLM2-135M (the default GGUF, dequantized) copying a list: lookup drafts are accepted."""
    b = load_backend(None, LoadOptions(backend="hf", n_ctx=512, lookup=True))
    try:
        ids = b.tokenize(b.render_chat([{"role": "user", "content": COPY_PROMPT}]))
        params = SamplingParams(temperature=0.0, max_tokens=24)
        plain, _, _ = _run(b, ids, params, draft=False)
        spec, flags, summary = _run(b, ids, params, draft=True)
        _assert_same_or_near_tie(b, ids, plain, spec, 1.0)
        assert any(flags) and summary.accepted_tokens == sum(flags) and summary.draft_tokens >= sum(flags)
        assert "apples" in b.detokenize(spec).lower() and "draft prompt lookup" in b.report.describe()
    finally:
        b.close()


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (Wilson-Hilferty; no scipy here)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _top_k_probs(model, seq: list[int], k: int) -> tuple[dict[int, float], float]:
    """The target's temperature-1 top-k distribution after seq, from a plain forward; and the gap
    between its k-th and (k+1)-th logits (the filter's edge)."""
    with torch.inference_mode():
        logits = model(torch.tensor([seq])).logits[0, -1].double()
    values, idx = torch.topk(logits, k + 1)
    probs = torch.softmax(values[:k], dim=-1)
    return dict(zip(idx[:k].tolist(), probs.tolist(), strict=True)), float(values[k - 1] - values[k])


RUNS = 300


def test_speculative_sampling_follows_the_target(family: Path) -> None:
    """The first two tokens at temperature 1, top-k 2, with the noisy copy drafting one token: over
    many seeds the pair (t0, t1) follows the target's p(t0) p(t1 | t0) (chi-square), while the same
    counts reject the draft's own p(t0) q(t1 | t0)."""
    opts = LoadOptions(n_ctx=128, draft=str(family / "noisy"), draft_max=1, draft_mode="fixed")
    b = load_backend(family / "target", opts)
    try:
        ids = b.tokenize("Pick a word:")
        params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, max_tokens=3, ignore_eos=True)
        p0, edge = _top_k_probs(b.model, ids, 2)
        p1 = {t: _top_k_probs(b.model, [*ids, t], 2) for t in p0}
        q1 = {t: _top_k_probs(b.drafter.backend.model, [*ids, t], 2)[0] for t in p0}
        assert min(edge, *(e for _, e in p1.values())) > 1e-3  # no near-tie at a filter's edge
        counts: dict[tuple[int, int], int] = {}
        outcomes = set()
        for seed in range(RUNS):
            steps = b.generate_tokens(ids, params.replace(seed=seed), b.drafter)
            t0, t1 = itertools.islice(steps, 2)
            steps.close()
            assert t1.drafted == 1  # every run verified one drafted token
            outcomes.add(t1.from_draft)
            counts[t0.token_id, t1.token_id] = counts.get((t0.token_id, t1.token_id), 0) + 1
        assert outcomes == {True, False}  # both the accept and the resample branch ran
        cells = [(a, c) for a in p0 for c in p1[a][0]]
        assert sum(counts.get(cell, 0) for cell in cells) == RUNS, "a pair outside the target's support came out"
        observed = np.array([counts.get(cell, 0) for cell in cells])
        expected = RUNS * np.array([p0[a] * p1[a][0][c] for a, c in cells])
        assert ((observed - expected) ** 2 / expected).sum() < _chi_square_critical(len(cells) - 1)
        as_draft = RUNS * np.array([p0[a] * q1[a].get(c, 0.0) for a, c in cells]) + 1e-9
        assert ((observed - as_draft) ** 2 / as_draft).sum() > _chi_square_critical(len(cells) - 1)
    finally:
        b.close()


def _swapped_tokenizer_copy(src: Path, dst: Path) -> None:
    """A copy of a model whose tokenizer has two tokens swapped: same size, another vocabulary."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[192]], vocab[by_id[384]] = 384, 192
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_draft_with_another_vocabulary_is_refused(family: Path, tmp_path: Path) -> None:
    _swapped_tokenizer_copy(family / "small", tmp_path / "swapped")
    with pytest.raises(UserError, match=r"Token (192|384) is .* in the draft model swapped") as info:
        load_backend(family / "target", LoadOptions(n_ctx=128, draft=str(tmp_path / "swapped")))
    assert "\n" not in str(info.value) and "share the target's tokenizer" in str(info.value)


def test_draft_with_a_static_cache_is_refused(family: Path) -> None:
    with pytest.raises(UserError, match="drop --compile and --static-cache"):
        load_backend(family / "target", LoadOptions(n_ctx=128, lookup=True, static_cache=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("drafting", ["self", "lookup"])
def test_cuda_drafting_gives_the_plain_output(default_gguf: Path, drafting: str) -> None:
    """SmolLM2 on CUDA, in float32 (in half precision a batched verify and a single-token step disagree at
    near-ties more often): drafting for itself, or prompt lookup, answers as plain decoding does."""
    extra = (
        {"draft": str(default_gguf), "draft_max": 4, "draft_mode": "fixed"} if drafting == "self" else {"lookup": True}
    )
    b = load_backend(None, LoadOptions(backend="hf", device="cuda", dtype="float32", n_ctx=512, **extra))
    try:
        assert b.report.device == "cuda"
        ids = b.tokenize(b.render_chat([{"role": "user", "content": COPY_PROMPT}]))
        params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        plain, _, _ = _run(b, ids, params, draft=False)
        spec, flags, summary = _run(b, ids, params, draft=True)
        _assert_same_or_near_tie(b, ids, plain, spec, 1.0)
        assert any(flags) and summary.accepted_tokens == sum(flags)
        if drafting == "self":
            assert b.drafter.backend.report.device == "cuda" and summary.acceptance_rate >= 0.99
    finally:
        b.close()
