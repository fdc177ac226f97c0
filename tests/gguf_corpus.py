"""A corpus of corrupt GGUF files, generated (never checked in): crafted headers written byte by byte, and
damaged copies of the real default model's header (truncations, bit flips in its structure, huge counts).

`python tests/gguf_corpus.py DIR` writes every case into DIR; the tests import `write_corpus`.
Each case is one class of damage the validator must refuse with one sentence.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Callable
from pathlib import Path

# GGUF value types and ggml tensor types used below (the spec's numbering).
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "B", U64: "Q", I64: "q", F64: "d"}
T_F32, T_F16, T_Q4_0 = 0, 1, 2
_TYPE_BYTES = {T_F32: (1, 4), T_F16: (1, 2), T_Q4_0: (32, 18)}
HEADER_BYTES = 2_000_000  # the default model's header and tensor table fit in its first 2 MB


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value: object) -> bytes:
    if vtype == STR:
        return _str(value)  # type: ignore[arg-type]
    if vtype == ARR:
        item_type, items = value  # type: ignore[misc]
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_value(item_type, v) for v in items)
    return struct.pack("<" + _FMT[vtype], value)


def build(
    kvs: list[tuple[str | bytes, int, object]],
    tensors: list[tuple[str, tuple[int, ...], int, int | None]],
    *,
    version: int = 3,
    alignment: int = 32,
    counts: tuple[int, int] | None = None,
    data: bool = True,
) -> bytes:
    """A GGUF file: kvs are (key, type, value); tensors are (name, shape, ggml type, offset or None = next)."""
    body = b"".join(_str(k) + struct.pack("<I", t) + _value(t, v) for k, t, v in kvs)
    infos, next_offset, end = [], 0, 0
    for name, shape, ggml_type, offset in tensors:
        block, size = _TYPE_BYTES.get(ggml_type, (1, 4))
        n_bytes = math.prod(shape) // block * size
        n_bytes = n_bytes if n_bytes < 1 << 24 else 0  # a lying shape: write no data for it
        offset = next_offset if offset is None else offset
        infos.append(_str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape))
        infos[-1] += struct.pack("<IQ", ggml_type, offset)
        end = max(end, offset + n_bytes)
        next_offset = -(-(offset + n_bytes) // alignment) * alignment
    n_tensors, n_kvs = counts or (len(tensors), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kvs) + body + b"".join(infos)
    if not data:
        return head
    start = -(-len(head) // alignment) * alignment
    return head + bytes(start - len(head)) + bytes(end)


def tiny_kvs(**override: tuple[int, object] | None) -> list[tuple[str | bytes, int, object]]:
    """Metadata of a valid two-layer llama; override={'llama.context_length': (F32, nan)} etc., None drops."""
    kvs: dict[str | bytes, tuple[int, object] | None] = {
        "general.architecture": (STR, "llama"),
        "llama.block_count": (U32, 2),
        "llama.context_length": (U32, 4096),
        "llama.embedding_length": (U32, 64),
        "llama.attention.head_count": (U32, 4),
        "llama.attention.head_count_kv": (U32, 2),
        "general.file_type": (U32, 0),
    }
    kvs.update(override)
    return [(k, *v) for k, v in kvs.items() if v is not None]  # type: ignore[misc]


def tiny_tensors(*extra: tuple[str, tuple[int, ...], int, int | None]) -> list:
    return [
        ("token_embd.weight", (64, 32), T_F32, None),
        ("blk.0.attn_q.weight", (64, 64), T_F32, None),
        ("blk.1.attn_q.weight", (64, 64), T_F32, None),
        *extra,
    ]


def _crafted() -> dict[str, bytes]:
    nan, inf = float("nan"), float("inf")
    cases = {
        # non-finite or out-of-range numbers
        "nan-context-length": build(tiny_kvs(**{"llama.context_length": (F32, nan)}), tiny_tensors()),
        "inf-rope-base": build(tiny_kvs(**{"llama.rope.freq_base": (F32, inf)}), tiny_tensors()),
        "negative-context-length": build(tiny_kvs(**{"llama.context_length": (I32, -1)}), tiny_tensors()),
        "huge-embedding-length": build(tiny_kvs(**{"llama.embedding_length": (U64, 2**40)}), tiny_tensors()),
        "text-head-count": build(tiny_kvs(**{"llama.attention.head_count": (STR, "four")}), tiny_tensors()),
        "float-head-counts": build(
            tiny_kvs(**{"llama.attention.head_count": (ARR, (F32, [4.0, nan]))}), tiny_tensors()
        ),
        "number-architecture": build(tiny_kvs(**{"general.architecture": (U32, 7)}), tiny_tensors()),
        "multi-line-architecture": build(tiny_kvs(**{"general.architecture": (STR, "llama\nok")}), tiny_tensors()),
        "bool-stored-as-7": build(tiny_kvs(**{"tokenizer.ggml.add_bos_token": (BOOL, 7)}), tiny_tensors()),
        # tensor names that do not parse
        "block-name-x": build(tiny_kvs(), tiny_tensors(("blk.x.weight", (64,), T_F32, None))),
        "block-name-no-suffix": build(tiny_kvs(), tiny_tensors(("blk.1", (64,), T_F32, None))),
        "long-tensor-name": build(tiny_kvs(), tiny_tensors(("t" * 100, (64,), T_F32, None))),
        "duplicate-tensor": build(tiny_kvs(), tiny_tensors(("blk.0.attn_q.weight", (64,), T_F32, None))),
        "non-utf8-key": build(tiny_kvs() + [(b"general.\xff\xfe", U32, 1)], tiny_tensors()),
        # metadata array nesting deeper than 2
        "nested-arrays-3": build(tiny_kvs(**{"x.nested": (ARR, (ARR, [(ARR, [(U32, [1])])]))}), tiny_tensors()),
        "nested-arrays-64": build(tiny_kvs(**{"x.nested": (ARR, (ARR, [(ARR, [(ARR, [(U8, [])])])]))}), tiny_tensors()),
        # overlapping or misaligned tensor data
        "overlapping-tensors": build(tiny_kvs(), tiny_tensors(("output.weight", (64, 32), T_F32, 0))),
        "misaligned-offset": build(tiny_kvs(), [("token_embd.weight", (64, 32), T_F32, 16)]),
        "alignment-not-power-of-two": build(tiny_kvs(**{"general.alignment": (U32, 24)}), tiny_tensors()),
        # shapes and types
        "five-dimensions": build(tiny_kvs(), tiny_tensors(("output.weight", (2, 2, 2, 2, 2), T_F32, None))),
        "unknown-ggml-type": build(tiny_kvs(), tiny_tensors(("output.weight", (64,), 99, None))),
        "removed-ggml-type-q4_2": build(tiny_kvs(), tiny_tensors(("output.weight", (64,), 4, None))),
        "row-not-block-multiple": build(tiny_kvs(), tiny_tensors(("output.weight", (33, 2), T_Q4_0, None))),
        "dimension-overflow": build(tiny_kvs(), tiny_tensors(("output.weight", (2**32, 2**32, 2**32), T_F32, 0))),
        "dimension-above-int64": build(tiny_kvs(), tiny_tensors(("output.weight", (2**63 + 1,), T_F32, 0))),
        # counts that do not match the file
        "header-only-2^32-1-layers": build(tiny_kvs(**{"llama.block_count": (U32, 2**32 - 1)}), []),
        "50-million-layers": build(tiny_kvs(**{"llama.block_count": (U32, 50_000_000)}), tiny_tensors()),
        "tensor-beyond-block-count": build(tiny_kvs(), tiny_tensors(("blk.7.attn_k.weight", (64,), T_F32, None))),
        "huge-tensor-count": build(tiny_kvs(), [], counts=(2**63, 7), data=False),
        "huge-kv-count": build(tiny_kvs(), [], counts=(0, 2**62), data=False),
        "duplicate-key": build(tiny_kvs() + [("llama.context_length", U32, 8)], tiny_tensors()),
        "version-1": build(tiny_kvs(), tiny_tensors(), version=1),
        "version-99": build(tiny_kvs(), tiny_tensors(), version=99),
        "truncated-tensor-data": build(tiny_kvs(), tiny_tensors())[:-100],
        "magic-only": b"GGUF",
    }
    # Lies that the builder cannot express: patch the bytes it wrote.
    strings = _value(ARR, (STR, ["a", "b"]))
    tokens = build(tiny_kvs(**{"tokenizer.ggml.tokens": (ARR, (STR, ["a", "b"]))}), tiny_tensors())
    cases["huge-string-array"] = tokens.replace(strings, strings[:4] + struct.pack("<Q", 2**60) + strings[12:])
    odd = _str("x.odd") + struct.pack("<I", U32)
    typed = build(tiny_kvs(**{"x.odd": (U32, 0)}), tiny_tensors())
    cases["unknown-value-type"] = typed.replace(odd, odd[:-4] + struct.pack("<I", 13))
    return cases


def _default_header() -> tuple[bytes, int]:
    from localrun.models.catalog import default_model_path

    path = default_model_path()
    with path.open("rb") as handle:
        return handle.read(HEADER_BYTES), path.stat().st_size


def _patched(header: bytes, where: int, new: bytes) -> bytes:
    return header[:where] + new + header[where + len(new) :]


def _from_default_model() -> dict[str, tuple[bytes, int]]:
    """(bytes, full size) cases from the real header; the rest of the file is sparse zeros."""
    header, size = _default_header()
    first = header.index(_str("token_embd.weight"))  # this tensor's record in the tensor table
    dims_at = first + len(_str("token_embd.weight"))
    n_dims = struct.unpack_from("<I", header, dims_at)[0]
    type_at = dims_at + 4 + 8 * n_dims
    flip = bytearray(header)
    flip[dims_at + 4 + 7] ^= 0x80  # the top bit of the first dimension
    context = header.index(_str("llama.context_length")) + len(_str("llama.context_length"))
    return {
        "real-truncated-at-10": (header[:10], 10),
        "real-truncated-at-30": (header[:30], 30),
        "real-truncated-in-vocab": (header[:200_000], 200_000),
        "real-truncated-in-tensor-table": (header[: first + 20], first + 20),
        "real-truncated-tensor-data": (header, size - 4096),
        "real-flip-tensor-count": (_patched(header, 8 + 7, b"\x80"), size),
        "real-flip-kv-count": (_patched(header, 16 + 6, b"\x7f"), size),
        "real-flip-first-key-length": (_patched(header, 24 + 5, b"\x01"), size),
        "real-flip-first-value-type": (_patched(header, 24 + 8 + header[24], b"\x0d"), size),
        "real-flip-n-dims": (_patched(header, dims_at, b"\xc8"), size),
        "real-flip-dimension": (bytes(flip), size),
        "real-flip-tensor-type": (_patched(header, type_at, b"\x63"), size),
        "real-flip-tensor-offset": (_patched(header, type_at + 4 + 7, b"\x40"), size),
        "real-flip-offset-misaligned": (_patched(header, type_at + 4, bytes([header[type_at + 4] | 0x03])), size),
        "real-nan-context-length": (_patched(header, context, struct.pack("<If", F32, float("nan"))), size),
        "real-huge-block-count": (_patched(header, _block_count_at(header), struct.pack("<I", 2**32 - 1)), size),
    }


def _block_count_at(header: bytes) -> int:
    return header.index(_str("llama.block_count")) + len(_str("llama.block_count")) + 4


def cases() -> dict[str, Callable[[Path], None]]:
    """Case name -> a function that writes the case to a path."""

    def whole(data: bytes) -> Callable[[Path], None]:
        return lambda path: path.write_bytes(data)

    def sparse(data: bytes, size: int) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            with path.open("wb") as handle:
                handle.write(data[:size])
                handle.truncate(size)

        return write

    out = {name: whole(data) for name, data in _crafted().items()}
    out.update({name: sparse(data, size) for name, (data, size) in _from_default_model().items()})
    return out


def write_corpus(directory: Path) -> list[Path]:
    """Write every case as DIR/NAME.gguf; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, write in cases().items():
        path = directory / f"{name}.gguf"
        write(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "gguf-corpus")):
        print(written)
