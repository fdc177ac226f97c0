"""Perplexity and KL-divergence: llama-perplexity's windows, checked by hand; KLD of a model with itself is 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cached_build

from localrun.errors import UserError
from localrun.evaluate.quality import (
    EvalTokens,
    HFScorer,
    LlamaCppScorer,
    Reference,
    build_reference,
    bundled_text_path,
    check_vocabulary,
    evaluate,
    perplexity,
    read_text,
    tokenize_once,
)
from localrun.models.catalog import default_model_path

SHORT = bundled_text_path().read_text(encoding="utf-8")[:1200]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 64-wide mistral with SmolLM2's real tokenizer (vocab 49152)."""
    from test_to_gguf import build_tiny_model

    from localrun.quantize.to_gguf import restore_pre_tokenizer

    def tokenizer(path: Path) -> None:
        from transformers import AutoTokenizer

        gguf = default_model_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
        restore_pre_tokenizer(path, "smollm")

    tok = cached_build(tmp_path_factory, "smol-tokenizer", tokenizer)
    return cached_build(tmp_path_factory, "eval-tiny-hf", lambda p: build_tiny_model("mistral", tok, p))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Path) -> Path:
    from localrun.quantize.to_gguf import convert_hf_to_gguf

    return cached_build(
        tmp_path_factory, "eval-tiny-F32.gguf", lambda p: convert_hf_to_gguf(tiny_hf, p, out_type="F32")
    )


@pytest.fixture(scope="module")
def default_scorer():
    scorer = LlamaCppScorer(default_model_path(), n_ctx=64)
    yield scorer
    scorer.close()


def _hand_ppl(model_dir: Path, tokens: EvalTokens) -> float:
    """PPL written out from scratch: whole-window torch logits, numpy log-softmax, second half scored."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n, half, nll = tokens.n_ctx, tokens.n_ctx // 2, []
    for w in range(len(tokens.ids) // n):
        ids = [int(t) for t in tokens.ids[w * n : (w + 1) * n]]
        fed = [tokens.bos_id, *ids[1:]] if tokens.add_bos else ids
        with torch.no_grad():
            logits = model(torch.tensor([fed])).logits[0].double().numpy()
        for pos in range(half, n - 1):  # logits at pos predict the token at pos + 1
            row = logits[pos] - logits[pos].max()
            nll.append(-(row[ids[pos + 1]] - np.log(np.exp(row).sum())))
    return float(np.exp(np.mean(nll)))


def test_windows_follow_llama_perplexity() -> None:
    ids = np.arange(100, 100 + 70, dtype=np.int32)
    tokens = EvalTokens(ids, ids, n_ctx=32, bos_id=1, add_bos=True)
    windows = list(tokens.windows())
    assert tokens.n_windows == 2 and tokens.n_scored == 2 * 15  # 70 // 32 windows, positions 16..30 each
    (w0, t0), (w1, t1) = windows
    assert w0[0] == 1 and w1[0] == 1  # BOS replaces each window's first token
    assert list(w1[1:]) == list(range(133, 164))
    assert list(t0) == list(range(117, 132)) and list(t1) == list(range(149, 164))  # the last 15 of each window


class _Bigram:
    """A bigram language model over 4 tokens: the next token's distribution depends only on the current one."""

    n_vocab, add_bos, bos_id = 4, False, -1

    def __init__(self, table: list[list[float]]) -> None:
        self.logp = np.log(np.array(table))

    def window_logits(self, ids: np.ndarray, first: int) -> np.ndarray:
        return self.logp[np.asarray(ids)[first:-1]].astype(np.float32)


def test_tiny_case_matches_values_worked_out_by_hand() -> None:
    """Two 8-token windows of 0 1 2 3 0 1 2 3: positions 4-6 (tokens 0, 1, 2) are scored, predicting 1, 2, 3."""
    ref_table = [[1 / 4, 1 / 2, 1 / 8, 1 / 8], [1 / 8, 1 / 8, 1 / 4, 1 / 2], [1 / 2, 1 / 4, 1 / 8, 1 / 8], [1 / 4] * 4]
    ids = np.array([0, 1, 2, 3] * 4, dtype=np.int32)
    tokens = EvalTokens(ids, ids, n_ctx=8, bos_id=-1, add_bos=False)
    ref_model = _Bigram(ref_table)
    # p(target) = 1/2, 1/4, 1/8 in each window: PPL = exp(mean(ln 2, ln 4, ln 8)) = exp(2 ln 2) = 4
    assert perplexity(ref_model, tokens)[0] == pytest.approx(4.0, rel=1e-6)
    ref = build_reference(ref_model, tokens, top_k=3)  # top 3 of 4: the tail bucket holds one token
    # The variant swaps the first row's two most likely tokens: p(target) = 1/4, 1/4, 1/8 -> PPL 2^(7/3).
    variant = _Bigram([[1 / 2, 1 / 4, 1 / 8, 1 / 8], *ref_table[1:]])
    q = evaluate(variant, ref)
    assert q.ppl == pytest.approx(2 ** (7 / 3), rel=1e-6) and q.ref_ppl == pytest.approx(4.0, rel=1e-6)
    assert q.delta_ppl_pct == pytest.approx(100 * (2 ** (1 / 3) - 1), rel=1e-5)
    # KL on the first row: 1/2 ln(1/2 / 1/4) + 1/4 ln(1/4 / 1/2) = ln(2) / 4; the other rows agree: 0
    assert q.kld_max == pytest.approx(np.log(2) / 4, rel=1e-5) and q.kld_median == pytest.approx(0.0, abs=1e-7)
    assert q.kld_mean == pytest.approx(np.log(2) / 12, rel=1e-5)
    assert q.top1_agreement_pct == pytest.approx(200 / 3)  # the first row's argmax moved: 2 of 3 agree
    assert q.n_scored == 6


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_matches_hand_computation(tiny_hf: Path, tiny_gguf: Path, add_bos: bool) -> None:
    hf = HFScorer(tiny_hf)
    tokens = tokenize_once(hf, SHORT, n_ctx=32)
    if add_bos:  # SmolLM2 adds no BOS; force it to check the per-window BOS replacement too
        tokens = EvalTokens(np.concatenate([[1], tokens.text_ids]).astype(np.int32), tokens.text_ids, 32, 1, True)
    expected = _hand_ppl(tiny_hf, tokens)
    assert perplexity(hf, tokens)[0] == pytest.approx(expected, rel=1e-5)
    gguf = LlamaCppScorer(tiny_gguf, n_ctx=32)
    try:
        assert perplexity(gguf, tokens)[0] == pytest.approx(expected, rel=2e-3)  # F32 GGUF vs torch F32
    finally:
        gguf.close()


def test_kld_of_a_model_against_itself_is_zero(default_scorer: LlamaCppScorer, tmp_path: Path) -> None:
    tokens = tokenize_once(default_scorer, SHORT, n_ctx=64)
    ref = build_reference(default_scorer, tokens)
    ref = Reference.load(ref.save(tmp_path / "ref.npz"))  # the stored form is what variants compare against
    q = evaluate(default_scorer, ref)
    assert q.n_scored == tokens.n_scored > 0
    assert abs(q.kld_mean) < 1e-6 and abs(q.kld_max) < 1e-5
    assert q.top1_agreement_pct == 100.0 and q.delta_ppl_pct == pytest.approx(0.0, abs=1e-9)
    assert q.ppl == pytest.approx(ref.ppl) and 1.0 < q.ppl < 1000.0


def test_gguf_and_transformers_variants_share_one_reference(tiny_hf: Path, tiny_gguf: Path) -> None:
    """The same weights on llama.cpp (F32 GGUF) and on transformers agree: tiny KLD, same top-1."""
    gguf = LlamaCppScorer(tiny_gguf, n_ctx=32)
    try:
        ref = build_reference(gguf, tokenize_once(gguf, SHORT, n_ctx=32), top_k=64)
    finally:
        gguf.close()
    hf = HFScorer(tiny_hf)
    check_vocabulary(hf, ref, SHORT)
    q = evaluate(hf, ref)
    assert 0.0 <= q.kld_mean < 1e-3 and q.top1_agreement_pct > 95.0


def test_compact_kld_is_a_tight_lower_bound(default_scorer: LlamaCppScorer, tmp_path: Path) -> None:
    """top-k + tail mass never overstates KL, and stays close to the exact full-vocabulary value."""
    from localrun.evaluate.quality import _kld_rows, log_softmax
    from localrun.quantize.gguf_quant import quantize_gguf

    tokens = tokenize_once(default_scorer, SHORT, n_ctx=64)
    ref = build_reference(default_scorer, tokens)
    q4 = quantize_gguf(default_model_path(), tmp_path / "q4_0.gguf", "Q4_0", allow_requantize=True).path
    other = LlamaCppScorer(q4, n_ctx=64)
    try:
        exact, compact, pos = [], [], 0
        for window, _ in tokens.windows():
            p = log_softmax(default_scorer.window_logits(window, tokens.first))
            q = log_softmax(other.window_logits(window, tokens.first))
            rows = slice(pos, pos + len(p))
            exact.append((np.exp(p) * (p - q)).sum(axis=1))
            compact.append(_kld_rows(q, ref.top_ids[rows], ref.top_logprobs[rows]))
            pos += len(p)
    finally:
        other.close()
    exact_v, compact_v = np.concatenate(exact), np.concatenate(compact)
    assert np.all(compact_v <= exact_v + 1e-6)
    assert compact_v.mean() == pytest.approx(exact_v.mean(), rel=0.05)


def test_variant_with_another_vocabulary_is_refused(default_scorer: LlamaCppScorer, tmp_path: Path) -> None:
    import json
    import shutil

    from test_to_gguf import build_tiny_model

    ref = build_reference(default_scorer, tokenize_once(default_scorer, SHORT, n_ctx=64), top_k=8)
    tok = tmp_path / "tok"
    from transformers import AutoTokenizer

    gguf = default_model_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tok)
    data = json.loads((tok / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}  # splits words differently: other ids for the same text
    (tok / "tokenizer.json").write_text(json.dumps(data))
    model = build_tiny_model("mistral", tok, tmp_path / "other")
    with pytest.raises(UserError, match="tokenizes the text differently"):
        check_vocabulary(HFScorer(model), ref, SHORT)
    shutil.rmtree(model)


def test_short_or_missing_text_is_one_sentence(default_scorer: LlamaCppScorer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="fewer than two windows"):
        tokenize_once(default_scorer, "Too short.", n_ctx=64)
    with pytest.raises(UserError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_bundled_text_ships_with_its_source() -> None:
    text = read_text(None)
    notes = (bundled_text_path().parent / "README.md").read_text(encoding="utf-8")
    assert len(text.split()) > 3000 and "public domain" in notes and "Gutenberg" in notes
