"""inspect_gguf on the real default model, on small generated files, and on broken files."""

from __future__ import annotations

from pathlib import Path

import pytest

from localrun.errors import UserError
from localrun.models.catalog import default_model_path
from localrun.models.gguf_info import inspect_gguf


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    return default_model_path()


def write_tiny_gguf(path: Path, *, arch: str = "llama", n_layers: int = 2, extra: dict | None = None) -> Path:
    """A small valid GGUF with a real tensor table, written with the gguf package."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(n_layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_feed_forward_length(128)
    writer.add_file_type(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}".encode() for i in range(300)])
    for key, value in (extra or {}).items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    writer.add_tensor("token_embd.weight", np.ones((300, 64), dtype=np.float16))
    for il in range(n_layers):
        writer.add_tensor(f"blk.{il}.attn_q.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_default_model_metadata(default_gguf: Path) -> None:
    info = inspect_gguf(default_gguf)
    assert info.architecture == "llama"
    assert info.file_bytes == default_gguf.stat().st_size
    # SmolLM2-135M: 30 layers, 9 query heads sharing 3 KV heads (GQA), 576 wide, 8k context.
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.embedding_length) == (30, 9, 3, 576)
    assert info.head_dim == 64
    assert info.context_length == 8192
    assert 130_000_000 < info.parameter_count < 140_000_000
    assert info.file_type == "Q4_1" and info.quant_type == "Q4_1"
    assert info.quant_histogram["Q4_1"] > 200 and sum(info.quant_histogram.values()) == info.tensor_count
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.tokenizer_model == "gpt2" and info.vocab_size == 49152
    assert (info.bos_token_id, info.eos_token_id, info.add_bos_token) == (1, 2, False)
    assert info.sliding_window is None and info.swa_layers == 0
    assert info.tensor_data_bytes <= info.file_bytes
    # Arrays are elided, not copied into the metadata dict.
    assert info.metadata["tokenizer.ggml.tokens"] == "<array of 49152 string>"
    assert info.metadata["llama.block_count"] == 30


def test_default_model_long_arrays_are_described_not_kept(default_gguf: Path) -> None:
    # The vocabulary and merges are stepped over (bench/gguf_header.py times this); short arrays are kept.
    info = inspect_gguf(default_gguf)
    assert info.metadata["tokenizer.ggml.merges"] == "<array of 48900 string>"
    assert info.metadata["tokenizer.ggml.token_type"] == "<array of 49152 int32>"
    assert info.layer_tensor_bytes and len(info.layer_tensor_bytes) == info.n_layers == 30
    assert sum(info.layer_tensor_bytes) + info.token_embd_bytes + info.output_tensor_bytes <= info.tensor_data_bytes


def test_tiny_generated_file(tmp_path: Path) -> None:
    info = inspect_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert info.parameter_count == 300 * 64 + 2 * 64 * 64
    assert info.quant_histogram == {"F32": 2, "F16": 1}
    assert info.file_type == "F16" and info.vocab_size == 300 and info.chat_template is None


def test_sliding_window_layers(tmp_path: Path) -> None:
    gemma = write_tiny_gguf(
        tmp_path / "g.gguf", arch="gemma2", n_layers=6, extra={"gemma2.attention.sliding_window": 1024}
    )
    info = inspect_gguf(gemma)
    assert info.sliding_window == 1024 and info.swa_layers == 3  # every other layer is local
    pattern = [True, True, False, True, True, False]
    explicit = write_tiny_gguf(
        tmp_path / "p.gguf",
        arch="gemma3",
        n_layers=6,
        extra={"gemma3.attention.sliding_window": 512, "gemma3.attention.sliding_window_pattern": pattern},
    )
    assert inspect_gguf(explicit).swa_layers == 4


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^No such file: .*nope\.gguf\.$"):
        inspect_gguf(tmp_path / "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a directory"):
        inspect_gguf(tmp_path)


def test_not_a_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    with pytest.raises(UserError, match="is not a GGUF file"):
        inspect_gguf(bogus)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="is not a GGUF file"):
        inspect_gguf(empty)


def test_truncated_header(tmp_path: Path, default_gguf: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with default_gguf.open("rb") as src:
        cut.write_bytes(src.read(200_000))  # inside the token list
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        inspect_gguf(cut)
    assert "\n" not in str(err.value)


def test_truncated_tensor_data(tmp_path: Path, default_gguf: Path) -> None:
    info = inspect_gguf(default_gguf)
    header_bytes = 2_000_000  # the whole header and tensor table fit in the first 2 MB
    cut = tmp_path / "cut.gguf"
    with default_gguf.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(header_bytes))
        dst.truncate(info.file_bytes - 4096)  # sparse: the size is what matters
    with pytest.raises(UserError, match=r"is truncated: tensor .* ends at byte .* download it again"):
        inspect_gguf(cut)


def test_corrupt_tensor_table(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "bad.gguf")
    data = bytearray(path.read_bytes())
    where = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    data[where : where + 4] = (200).to_bytes(4, "little")  # absurd number of dimensions
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="truncated or corrupt"):
        inspect_gguf(path)
