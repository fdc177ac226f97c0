"""The transformers backend on a CUDA GPU: skipped without one (they run on a lent GPU machine)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from localrun.backends import load_backend  # noqa: E402
from localrun.backends.hf import HFBackend  # noqa: E402
from localrun.engine.generate import generate, stream_generate  # noqa: E402
from localrun.settings import LoadOptions, SamplingParams  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _tokens(backend: HFBackend, ids: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return [step.token_id for step in backend.generate_tokens(ids, params)]


@pytest.fixture(scope="module")
def gpu() -> HFBackend:
    backend = load_backend(None, LoadOptions(backend="hf"))
    yield backend
    backend.close()


def test_defaults_pick_cuda_half_precision_and_fast_attention(gpu: HFBackend) -> None:
    import importlib.util

    report = gpu.report
    assert report.device == "cuda"
    assert report.dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert report.attn == ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")
    ids = gpu.tokenize(gpu.render_chat(QUESTION))
    summary = generate(gpu, ids, SamplingParams(temperature=0.0, max_tokens=16))
    assert "Paris" in summary.text
    assert summary.peak_vram_bytes and summary.peak_vram_bytes > 0


def test_static_compiled_decode_matches_dynamic_in_fp32() -> None:
    dynamic = load_backend(None, LoadOptions(backend="hf", dtype="float32", attn="sdpa", n_ctx=512))
    compiled = load_backend(None, LoadOptions(backend="hf", dtype="float32", attn="sdpa", n_ctx=512, compile=True))
    try:
        assert compiled.report.kv_cache == "static" and compiled.report.details["compile"] == "reduce-overhead"
        assert compiled.report.warmup_s > 0
        ids = dynamic.tokenize("The three primary colours are")
        expected = _tokens(dynamic, ids)
        assert _tokens(compiled, ids) == expected
        assert _tokens(compiled, ids) == expected  # a second request replays the same graphs
    finally:
        dynamic.close()
        compiled.close()


def test_nf4_and_int8_on_cuda_are_smaller() -> None:
    sizes = {}
    for quant in ("none", "nf4", "int8"):
        backend = load_backend(None, LoadOptions(backend="hf", dtype="float16", quant=quant))
        try:
            sizes[quant] = backend.report.weights_bytes
            ids = backend.tokenize(backend.render_chat(QUESTION))
            assert "Paris" in generate(backend, ids, SamplingParams(temperature=0.0, max_tokens=16)).text
        finally:
            backend.close()
    assert sizes["nf4"] < sizes["int8"] < sizes["none"]


def test_cancel_on_cuda_frees_the_model(gpu: HFBackend) -> None:
    ids = gpu.tokenize("Count from one to one thousand:")
    cancel = threading.Event()
    events = []
    for event in stream_generate(
        gpu, ids, SamplingParams(temperature=0.0, max_tokens=8000, ignore_eos=True), cancel=cancel
    ):
        events.append(event)
        if len(events) == 3:
            cancel.set()
    assert events[-1].finish_reason == "cancelled"
    assert not [t for t in threading.enumerate() if t.name == "localrun-hf-generate" and t.is_alive()]
    assert len(_tokens(gpu, ids)) == GREEDY.max_tokens
