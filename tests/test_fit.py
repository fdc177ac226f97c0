"""The memory estimate against the sizes llama.cpp itself reports for the default model, and the verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from localrun.cli import main
from localrun.errors import UserError
from localrun.models import fit
from localrun.models.catalog import default_model_path
from localrun.models.gguf_info import inspect_gguf

MiB = 1024 * 1024


@dataclass
class Device:
    kind: str
    name: str
    total_bytes: int
    free_bytes: int


@pytest.fixture(scope="module")
def info():
    return inspect_gguf(default_model_path())


def cpu(free: int) -> Device:
    return Device("cpu", "cpu", free, free)


def gpu(free: int) -> Device:
    return Device("cuda", "gpu0", free, free)


# llama.cpp 0.3.x logs for SmolLM2-135M (30 layers, 3 KV heads x 64): "KV buffer size = 11.25 MiB" at 512
# and 180.00 MiB at 8192; "compute buffer size = 98.25 MiB" at 512 and 166.38 MiB at 8192.
def test_kv_cache_matches_llama_cpp(info) -> None:
    assert fit.kv_cache_bytes(info, n_ctx=512) == int(11.25 * MiB)
    assert fit.kv_cache_bytes(info, n_ctx=8192) == 180 * MiB
    assert fit.kv_cache_bytes(info, n_ctx=500) == int(11.25 * MiB)  # padded to 256 cells
    assert fit.kv_cache_bytes(info, n_ctx=8192, kv_type="q8_0") == int(180 * MiB * 34 / 64)
    assert fit.kv_cache_bytes(info, n_ctx=8192, kv_type="q4_0") == int(180 * MiB * 18 / 64)
    with pytest.raises(UserError, match="Unknown KV cache type"):
        fit.kv_cache_bytes(info, n_ctx=512, kv_type="q3")


def test_compute_buffer_close_to_llama_cpp(info) -> None:
    assert fit.compute_buffer_bytes(info, n_ctx=512) == int(98.25 * MiB)
    assert abs(fit.compute_buffer_bytes(info, n_ctx=8192) / (166.38 * MiB) - 1) < 0.02


def test_sliding_window_shrinks_the_cache(tmp_path: Path) -> None:
    from test_gguf_info import write_tiny_gguf

    plain = inspect_gguf(write_tiny_gguf(tmp_path / "a.gguf", arch="llama", n_layers=6))
    swa = inspect_gguf(
        write_tiny_gguf(tmp_path / "b.gguf", arch="gemma2", n_layers=6, extra={"gemma2.attention.sliding_window": 1024})
    )
    # 2 KV heads x (16 + 16) dims x 2 bytes = 128 bytes per cell and layer.
    assert fit.kv_cache_bytes(plain, n_ctx=32768) == 6 * 128 * 32768
    # llama-cpp-python keeps llama.cpp's swa_full default: sliding layers hold the whole context too
    # (its log says "creating SWA KV cache, size = 32768 cells"), which is what grows on Gemma at long context.
    assert fit.kv_cache_bytes(swa, n_ctx=32768) == 6 * 128 * 32768
    # Without it, three layers keep 1024 + 512 cells (padded to 1536), three keep the full context.
    assert fit.kv_cache_bytes(swa, n_ctx=32768, swa_full=False) == 3 * 128 * 32768 + 3 * 128 * 1536


def test_vocabulary_tables_follow_the_tokenizer(tmp_path: Path, info) -> None:
    from test_gguf_info import write_tiny_gguf

    no_merges = inspect_gguf(write_tiny_gguf(tmp_path / "bpe.gguf", arch="llama"))
    assert fit._merge_count(info) == 48900  # SmolLM2's BPE merges, read from the file
    assert fit._merge_count(no_merges) == 300  # a BPE file without the array: about one merge per token
    bpe_cost = fit.vocab_bytes(info) - fit.BPE_VOCAB_BASE_BYTES
    assert bpe_cost == 49152 * fit.BPE_BYTES_PER_TOKEN + 48900 * fit.BPE_BYTES_PER_MERGE
    # while SmolLM2 loads, its merge strings are alive, but its 8k KV cache outweighs them
    at_8k = fit.ram_resident_bytes(info, n_ctx=8192, n_tokens_used=96)
    at_512 = fit.ram_resident_bytes(info, n_ctx=512, n_tokens_used=96)
    assert at_8k - at_512 == fit.kv_cache_bytes(info, n_ctx=8192) - fit.kv_cache_bytes(info, n_ctx=512)


def test_draft_model_adds_its_own_memory(info) -> None:
    alone = fit.estimate(info, n_ctx=2048)
    both = fit.estimate(info, n_ctx=2048, draft=info)
    assert both.draft_bytes == alone.total_bytes
    assert both.total_bytes == 2 * alone.total_bytes


def test_choose_gpu_layers(info) -> None:
    assert fit.choose_gpu_layers(default_model_path(), n_ctx=2048, devices=[cpu(64 << 30)]) == 0
    assert fit.choose_gpu_layers(info, n_ctx=2048, devices=[gpu(80 << 30)]) == info.n_layers + 1
    budget = fit.GPU_CONTEXT_BYTES + fit.compute_buffer_bytes(info, n_ctx=2048) + 10 * 3_900_000
    partial = fit.choose_gpu_layers(info, n_ctx=2048, devices=[gpu(int(budget / 0.95))])
    assert 0 < partial < info.n_layers
    assert fit.choose_gpu_layers(info, n_ctx=2048, devices=[gpu(100 * MiB)]) == 0


def test_verdicts(info) -> None:
    assert fit.fit_report(info, n_ctx=2048, devices=[cpu(64 << 30), gpu(80 << 30)]).verdict == "fits on GPU"
    assert fit.fit_report(info, n_ctx=2048, devices=[cpu(64 << 30)]).verdict == "CPU only"
    small_gpu = int((fit.GPU_CONTEXT_BYTES + fit.compute_buffer_bytes(info, n_ctx=2048) + 40 * MiB) / 0.95)
    partial = fit.fit_report(info, n_ctx=2048, devices=[cpu(64 << 30), gpu(small_gpu)])
    assert partial.verdict.startswith("partial offload with ") and 0 < partial.gpu_layers < info.n_layers
    tight = fit.fit_report(info, n_ctx=8192, devices=[cpu(300 * MiB)])
    assert tight.verdict == "does not fit"
    assert tight.max_ctx is not None and tight.max_ctx < 8192
    assert fit.estimate(info, n_ctx=tight.max_ctx).total_bytes <= 300 * MiB
    assert fit.estimate(info, n_ctx=tight.max_ctx + 256).total_bytes > 300 * MiB
    assert fit.fit_report(info, n_ctx=512, devices=[cpu(50 * MiB)]).max_ctx is None


def test_ram_resident_is_below_the_allocation(info) -> None:
    resident = fit.ram_resident_bytes(info, n_ctx=8192, n_tokens_used=96)
    allocated = fit.estimate(info, n_ctx=8192).total_bytes
    assert info.tensor_data_bytes + fit.kv_cache_bytes(info, n_ctx=8192) < resident < allocated


def test_cli_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "fit", "smollm2-135m-instruct", "--ctx", "4096", "--kv-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "KV cache (4096 ctx, q8_0)" in out and "verdict: " in out and "largest context that fits" in out
    assert main(["models", "fit", "no-such-model"]) == 2
