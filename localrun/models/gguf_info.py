"""GGUF metadata and validation: read a file's header without loading its weights.

`inspect_gguf` is called before a file is handed to llama.cpp, which can crash on a corrupt file,
so every failure becomes a one-sentence `UserError`.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun.errors import UserError

GGUF_MAGIC_BYTES = b"GGUF"


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


def _open_header(path: Path) -> Any:
    """Parse the header, turning every failure into one sentence."""
    from localrun.models.gguf_header import CorruptHeader, Truncated, UnsupportedVersion, read_header

    try:
        return read_header(path)
    except Truncated as exc:
        raise UserError(f"{path} is truncated: {exc}; download it again.") from None
    except UnsupportedVersion as exc:
        if exc.version < 2:
            raise UserError(
                f"{path} uses GGUF version {exc.version}, which llama.cpp no longer reads; convert the model again."
            ) from None
        raise UserError(f"{path} uses a GGUF version this reader cannot handle ({exc}); update localrun.") from None
    except CorruptHeader as exc:
        raise UserError(f"{path} is truncated or corrupt: {exc}; download it again.") from None
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc.strerror or type(exc).__name__}.") from None
    except (ValueError, OverflowError, MemoryError, RecursionError, struct.error) as exc:  # a check we lack
        raise UserError(
            f"{path} is truncated or corrupt: its GGUF header cannot be read ({type(exc).__name__}); download it again."
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


def _metadata(header: Any) -> dict[str, Any]:
    """Every key/value pair, with arrays elided to a description so the dict stays small."""
    return {key: header.array_descriptions.get(key, value) for key, value in header.fields.items()}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    from localrun.models.gguf_header import gguf_constants

    try:
        name = gguf_constants().LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _kv_heads(raw: dict[str, Any], arch: str, n_layers: int | None) -> tuple[int | None, tuple[int, ...]]:
    """KV head count, and the per-layer list when the file stores one (OpenELM, some hybrids)."""
    value = raw.get(f"{arch}.attention.head_count_kv", raw.get(f"{arch}.attention.head_count"))
    if isinstance(value, list):
        per_layer = tuple(int(v) for v in value[: n_layers or len(value)])
        return (max(per_layer) if per_layer else None), per_layer
    return _int_or_none(value), ()


# Sizes the loader and the fit estimate compute with: whole numbers in a sane range, or per-layer lists of them.
_COUNT_KEYS = (
    "context_length",
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "vocab_size",
    "expert_count",
    "expert_used_count",
)
_PER_LAYER_KEYS = {"feed_forward_length", "attention.head_count", "attention.head_count_kv"}
_GLOBAL_COUNT_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "general.file_type")
_TEXT_KEYS = ("general.architecture", "general.name", "tokenizer.chat_template", "tokenizer.ggml.model")
_MAX_COUNT = 2**31 - 1


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _validate_fields(raw: dict[str, Any], arch: str) -> None:
    """Refuse values the loader would misread: NaN or negative sizes, text where a number belongs, and so on."""
    from localrun.models.gguf_header import CorruptHeader

    for key in _TEXT_KEYS:
        if key in raw and not isinstance(raw[key], str):
            raise CorruptHeader(f"metadata key {key} should be text but holds {_short(raw[key])}")
    if not (arch.isprintable() and len(arch) <= 64):
        raise CorruptHeader(f"general.architecture {_short(arch)} is not an architecture name")
    checks = [(f"{arch}.{name}", name in _PER_LAYER_KEYS) for name in _COUNT_KEYS]
    for key, per_layer in checks + [(k, False) for k in _GLOBAL_COUNT_KEYS]:
        value = raw.get(key)
        if value is None or _whole(value) or (per_layer and isinstance(value, list) and all(map(_whole, value))):
            continue
        raise CorruptHeader(f"metadata key {key} holds {_short(value)}, not a whole number from 0 to {_MAX_COUNT:,}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _block_indices(tensors: Any, n_layers: int | None) -> set[int]:
    """The N of every blk.N tensor; refuse a block_count the tensors do not back, before anything is sized by it."""
    from localrun.models.gguf_header import CorruptHeader

    blocks = {int(t.name.split(".", 2)[1]) for t in tensors if t.name.startswith("blk.")}
    if n_layers is None:
        return blocks
    if n_layers > len(blocks):
        raise CorruptHeader(f"block_count says {n_layers:,} layers but the file has tensors for only {len(blocks):,}")
    if blocks and max(blocks) >= n_layers:
        raise CorruptHeader(f"it has tensors for layer {max(blocks):,} but block_count says {n_layers:,} layers")
    return blocks


def _tensor_bytes(tensors: Any, n_layers: int | None) -> tuple[tuple[int, ...], int, int]:
    """Bytes of each block's tensors, of the output head (0 when tied to the embedding), and of the embedding."""
    per_layer = [0] * (n_layers or 0)
    output = embd = 0
    for tensor in tensors:
        name = tensor.name
        if name.startswith("blk."):
            index = int(name.split(".", 2)[1])
            if index < len(per_layer):
                per_layer[index] += tensor.n_bytes
        elif name.startswith("output."):
            output += tensor.n_bytes
        elif name == "token_embd.weight":
            embd = tensor.n_bytes
    return tuple(per_layer), output, embd


def _checked(path: Path) -> tuple[Any, str, int | None]:
    """The parsed header, its architecture and its layer count, after every consistency check."""
    from localrun.models.gguf_header import CorruptHeader

    header = _open_header(path)
    raw = header.fields
    try:
        arch = raw.get("general.architecture") or "unknown"
        _validate_fields(raw, arch)
        n_layers = raw.get(f"{arch}.block_count")
        _block_indices(header.tensors, n_layers)
    except CorruptHeader as exc:
        raise UserError(f"{path} is truncated or corrupt: {exc}; download it again.") from None
    return header, arch, n_layers


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read and validate a GGUF file's header and tensor table (weights are memory-mapped, not read)."""
    path = Path(path).expanduser()
    file_bytes = _check_path(path)
    header, arch, n_layers = _checked(path)
    raw = header.fields

    def key(name: str) -> Any:
        return raw.get(f"{arch}.{name}")

    n_heads = _int_or_none(key("attention.head_count"))
    if isinstance(key("attention.head_count"), list):
        n_heads = max(key("attention.head_count") or [0]) or None
    n_kv_heads, per_layer = _kv_heads(raw, arch, n_layers)
    embedding = _int_or_none(key("embedding_length"))
    key_length = _int_or_none(key("attention.key_length"))
    value_length = _int_or_none(key("attention.value_length"))
    head_dim = key_length or (embedding // n_heads if embedding and n_heads else None)
    window = _int_or_none(key("attention.sliding_window"))
    histogram = Counter(t.type_name for t in header.tensors)
    add_bos = raw.get("tokenizer.ggml.add_bos_token")
    layer_bytes, output_bytes, embd_bytes = _tensor_bytes(header.tensors, n_layers)
    return GGUFInfo(
        path=path,
        file_bytes=file_bytes,
        version=header.version,
        architecture=arch,
        name=raw.get("general.name"),
        parameter_count=sum(t.n_elements for t in header.tensors),
        tensor_count=len(header.tensors),
        tensor_data_bytes=sum(t.n_bytes for t in header.tensors),
        context_length=_int_or_none(key("context_length")),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        embedding_length=embedding,
        head_dim=head_dim,
        key_length=key_length,
        value_length=value_length,
        feed_forward_length=_int_or_none(key("feed_forward_length")),
        vocab_size=_int_or_none(key("vocab_size")) or header.array_lengths.get("tokenizer.ggml.tokens"),
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
        metadata=_metadata(header),
    )


# ---- what `localrun models info` and the UI's Models tab show -------------------------------------------------


def known_architecture(arch: str) -> bool:
    """Whether arch is an architecture llama.cpp's GGUF format defines (the gguf package's list of them)."""
    from gguf.constants import MODEL_ARCH_NAMES

    return arch in MODEL_ARCH_NAMES.values()


def require_weights(info: GGUFInfo) -> None:
    """Refuse a header with no tensors: there is nothing to load or to size."""
    if info.tensor_count == 0:
        raise UserError(
            f"{info.path} has a GGUF header but no tensors, so there are no weights to load: download the whole model file."
        )


def info_rows(info: GGUFInfo) -> list[tuple[str, str]]:
    """(field, value) rows describing a GGUF file: the same rows on the CLI and in the UI."""
    from localrun.format import fmt_bytes

    window = f"{info.sliding_window} on {info.swa_layers} layers" if info.sliding_window else "none"
    tokenizer = f"{info.tokenizer_model} ({info.vocab_size} tokens, bos {info.bos_token_id}, eos {info.eos_token_id})"
    return [
        ("path", str(info.path)),
        ("file size", f"{fmt_bytes(info.file_bytes)} ({info.file_bytes:,} bytes)"),
        (
            "architecture",
            info.architecture if known_architecture(info.architecture) else f"{info.architecture} (unknown)",
        ),
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
