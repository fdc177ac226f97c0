"""GGUF metadata and validation: read a file's header without loading its weights.

`inspect_gguf` is called before a file is handed to llama.cpp, which can crash on a corrupt file,
so every failure becomes a one-sentence `UserError`.
"""

from __future__ import annotations

import functools
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun.errors import UserError

GGUF_MAGIC_BYTES = b"GGUF"
# String arrays longer than this (token lists, merges) are skipped, not parsed: GGUFReader makes one
# numpy view per string, which takes ~2 s on a 49k-token vocabulary.
_MAX_PARSED_STRINGS = 64


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What a GGUF file says about itself; sizes in bytes, counts as integers."""

    path: Path
    file_bytes: int
    version: int
    architecture: str
    name: str | None
    parameter_count: int
    tensor_count: int
    tensor_data_bytes: int
    context_length: int | None
    n_layers: int | None
    n_heads: int | None
    n_kv_heads: int | None
    embedding_length: int | None
    head_dim: int | None
    key_length: int | None
    value_length: int | None
    feed_forward_length: int | None
    vocab_size: int | None
    expert_count: int | None
    sliding_window: int | None
    swa_layers: int
    chat_template: str | None
    tokenizer_model: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool | None
    file_type: str | None
    quant_histogram: dict[str, int]
    kv_heads_per_layer: tuple[int, ...] = ()
    layer_tensor_bytes: tuple[int, ...] = ()
    output_tensor_bytes: int = 0
    token_embd_bytes: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def quant_type(self) -> str:
        """The file type name (Q4_K_M, ...), or the most common tensor type when the file does not say."""
        if self.file_type:
            return self.file_type
        return max(self.quant_histogram, key=self.quant_histogram.__getitem__) if self.quant_histogram else "?"


class _Truncated(Exception):
    """The tensor table points past the end of the file."""

    def __init__(self, tensor: str, end: int, size: int) -> None:
        super().__init__(tensor)
        self.tensor, self.end, self.size = tensor, end, size


@functools.cache
def _reader_class() -> type:
    """GGUFReader with fast array parsing and a tensor-extent check (built lazily: gguf imports numpy)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType

    class _FastReader(GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            itype, count = GGUFValueType(int(raw_itype[0])), int(alen[0])
            offs = orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                # One numpy view for the whole array instead of one per element.
                values = self._get(offs, nptype, count)
                if len(values) != count:
                    raise ValueError("array runs past the end of the file")
                return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
            if itype == GGUFValueType.STRING and count > _MAX_PARSED_STRINGS:
                end = self._skip_strings(offs, count)
                return end - orig_offs, [raw_itype, alen], [], [GGUFValueType.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)

        def _skip_strings(self, offs: int, count: int) -> int:
            view, size = memoryview(self.data), len(self.data)
            fmt = ">Q" if (self.byte_order == "S") == (np.little_endian) else "<Q"
            unpack = struct.Struct(fmt).unpack_from
            for _ in range(count):
                if offs + 8 > size:
                    raise ValueError("string array runs past the end of the file")
                offs += 8 + unpack(view, offs)[0]
            if offs > size:
                raise ValueError("string array runs past the end of the file")
            return offs

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            for fld in fields:
                _len, name, _ndims, dims, raw_dtype, offset = fld.parts
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                n_elements = int(np.prod(dims.astype(np.int64)))
                end = start_offs + int(offset[0]) + n_elements * type_size // block
                if end > size:
                    raise _Truncated(bytes(name).decode("utf-8", "replace"), end, size)
            super()._build_tensors(start_offs, fields)

    return _FastReader


def _open_reader(path: Path) -> Any:
    """Run the reader, turning every parse failure into one sentence."""
    try:
        return _reader_class()(path)
    except _Truncated as exc:
        raise UserError(
            f"{path} is truncated: tensor {exc.tensor} ends at byte {exc.end:,} but the file has only "
            f"{exc.size:,} bytes; download it again."
        ) from None
    except (ValueError, IndexError, KeyError, OverflowError, struct.error, UnicodeDecodeError) as exc:
        if "version" in str(exc):
            raise UserError(f"{path} uses a GGUF version this reader cannot handle ({exc}); update localrun.") from None
        raise UserError(
            f"{path} is truncated or corrupt: its GGUF header or tensor table cannot be read ({exc}); download it again."
        ) from None


def _check_path(path: Path) -> int:
    """Fail early on a missing file, a directory or a file without the GGUF magic; return the size."""
    if not path.exists():
        raise UserError(f"No such file: {path}.")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a GGUF file: pass the .gguf file inside it.")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror}.") from None
    if magic != GGUF_MAGIC_BYTES:
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
    return path.stat().st_size


def _field_value(fld: Any) -> Any:
    """A field as a Python value; long arrays come back as a short description."""
    from gguf import GGUFValueType

    if not fld.types:
        return None
    if fld.types[0] == GGUFValueType.ARRAY:
        count = int(fld.parts[-1][0])  # the length, for a skipped array
        if not fld.data:
            return f"<array of {count} {fld.types[-1].name.lower()}>"
        return fld.contents()
    return fld.contents()


def _metadata(reader: Any) -> dict[str, Any]:
    """Every key/value pair, with arrays elided to a description so the dict stays small."""
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = _field_value(fld)
        if isinstance(value, list):
            value = f"<array of {len(value)} {fld.types[-1].name.lower()}>"
        out[key] = value
    return out


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# Architectures whose llama.cpp loader applies a default sliding-window interleave when the file carries
# no pattern array: every n-th layer is global (phi3 reads the key but disables SWA, so it is absent).
_SWA_EVERY = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "olmo2": 4, "exaone4": 4, "gpt-oss": 2}


def _swa_layers(arch: str, raw: dict[str, Any], n_layers: int | None, window: int | None) -> int:
    """How many layers use the sliding window (their KV cache holds only about `window` tokens)."""
    if not window or not n_layers:
        return 0
    pattern = raw.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and pattern:
        return sum(1 for flag in pattern[:n_layers] if flag)
    every = pattern if isinstance(pattern, int) and pattern > 0 else _SWA_EVERY.get(arch)
    if every is None:
        return 0
    return sum(1 for il in range(n_layers) if il % every < every - 1)


def _file_type_name(value: Any) -> str | None:
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _raw_fields(reader: Any) -> dict[str, Any]:
    """Parsed values of every key, including the short arrays (per-layer head counts, SWA patterns)."""
    return {key: _field_value(fld) for key, fld in reader.fields.items()}


def _kv_heads(raw: dict[str, Any], arch: str, n_layers: int | None) -> tuple[int | None, tuple[int, ...]]:
    """KV head count, and the per-layer list when the file stores one (OpenELM, some hybrids)."""
    value = raw.get(f"{arch}.attention.head_count_kv", raw.get(f"{arch}.attention.head_count"))
    if isinstance(value, list):
        per_layer = tuple(int(v) for v in value[: n_layers or len(value)])
        return (max(per_layer) if per_layer else None), per_layer
    return _int_or_none(value), ()


def _tensor_bytes(reader: Any, n_layers: int | None) -> tuple[tuple[int, ...], int, int]:
    """Bytes of each block's tensors, of the output head (0 when tied to the embedding), and of the embedding."""
    per_layer = [0] * (n_layers or 0)
    output = embd = 0
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk."):
            index = int(name.split(".")[1])
            if index < len(per_layer):
                per_layer[index] += int(tensor.n_bytes)
        elif name.startswith("output."):
            output += int(tensor.n_bytes)
        elif name == "token_embd.weight":
            embd = int(tensor.n_bytes)
    return tuple(per_layer), output, embd


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read and validate a GGUF file's header and tensor table (weights are memory-mapped, not read)."""
    path = Path(path).expanduser()
    file_bytes = _check_path(path)
    reader = _open_reader(path)
    raw = _raw_fields(reader)
    arch = str(raw.get("general.architecture") or "unknown")

    def key(name: str) -> Any:
        return raw.get(f"{arch}.{name}")

    n_layers = _int_or_none(key("block_count"))
    n_heads = _int_or_none(key("attention.head_count"))
    if isinstance(key("attention.head_count"), list):
        n_heads = max(key("attention.head_count") or [0]) or None
    n_kv_heads, per_layer = _kv_heads(raw, arch, n_layers)
    embedding = _int_or_none(key("embedding_length"))
    key_length = _int_or_none(key("attention.key_length"))
    value_length = _int_or_none(key("attention.value_length"))
    head_dim = key_length or (embedding // n_heads if embedding and n_heads else None)
    window = _int_or_none(key("attention.sliding_window"))
    histogram = Counter(t.tensor_type.name for t in reader.tensors)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    add_bos = raw.get("tokenizer.ggml.add_bos_token")
    layer_bytes, output_bytes, embd_bytes = _tensor_bytes(reader, n_layers)
    return GGUFInfo(
        path=path,
        file_bytes=file_bytes,
        version=int(reader.fields["GGUF.version"].parts[0][0]),
        architecture=arch,
        name=raw.get("general.name"),
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        tensor_count=len(reader.tensors),
        tensor_data_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        context_length=_int_or_none(key("context_length")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        embedding_length=embedding,
        head_dim=head_dim,
        key_length=key_length,
        value_length=value_length,
        feed_forward_length=_int_or_none(key("feed_forward_length")),
        vocab_size=_int_or_none(key("vocab_size")) or (int(tokens.parts[-1][0]) if tokens else None),
        expert_count=_int_or_none(key("expert_count")),
        sliding_window=window,
        swa_layers=_swa_layers(arch, raw, n_layers, window),
        chat_template=raw.get("tokenizer.chat_template"),
        tokenizer_model=raw.get("tokenizer.ggml.model"),
        bos_token_id=_int_or_none(raw.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int_or_none(raw.get("tokenizer.ggml.eos_token_id")),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        file_type=_file_type_name(raw.get("general.file_type")),
        quant_histogram=dict(histogram.most_common()),
        kv_heads_per_layer=per_layer,
        layer_tensor_bytes=layer_bytes,
        output_tensor_bytes=output_bytes,
        token_embd_bytes=embd_bytes,
        metadata=_metadata(reader),
    )


# ---- what `localrun models info` and the UI's Models tab show -------------------------------------------------


def info_rows(info: GGUFInfo) -> list[tuple[str, str]]:
    """(field, value) rows describing a GGUF file: the same rows on the CLI and in the UI."""
    from localrun.format import fmt_bytes

    window = f"{info.sliding_window} on {info.swa_layers} layers" if info.sliding_window else "none"
    tokenizer = f"{info.tokenizer_model} ({info.vocab_size} tokens, bos {info.bos_token_id}, eos {info.eos_token_id})"
    return [
        ("path", str(info.path)),
        ("file size", f"{fmt_bytes(info.file_bytes)} ({info.file_bytes:,} bytes)"),
        ("architecture", info.architecture),
        ("name", info.name or "?"),
        ("parameters", f"{info.parameter_count:,} ({info.parameter_count / 1e9:.2f}B)"),
        ("quant type", info.quant_type),
        ("context length (trained)", str(info.context_length)),
        ("layers / heads / kv heads", f"{info.n_layers} / {info.n_heads} / {info.n_kv_heads}"),
        ("embedding / head dim", f"{info.embedding_length} / {info.head_dim}"),
        ("sliding window", window),
        ("tokenizer", tokenizer),
        ("chat template", "present" if info.chat_template else "absent"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in info.quant_histogram.items())),
    ]
