"""A bounded GGUF header parser: the key/value metadata and the tensor table, never the weights.

Every count and length the file claims is checked against the bytes that are left before anything is
allocated or looped over, so time and memory follow the file's real size, not what its header says.
Any malformed structure raises `CorruptHeader` with a short reason; `gguf_info` turns it into a `UserError`.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp's limit on a tensor name, terminating NUL included
_MAX_KEY_BYTES = 1024
_MAX_ARRAY_DEPTH = 2  # an array of arrays at most
_MAX_KEPT_ITEMS = 1024  # longer numeric arrays (token types, scores) are skipped and described
_MAX_KEPT_STRINGS = 64  # longer string arrays (token lists, merges) are skipped and described
_INT64_MAX = 2**63 - 1
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY, _BOOL = 8, 9, 7
# GGUF value types: struct format and name (the spec's numbering).
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("B", "uint8"),
    1: ("b", "int8"),
    2: ("H", "uint16"),
    3: ("h", "int16"),
    4: ("I", "uint32"),
    5: ("i", "int32"),
    6: ("f", "float32"),
    7: ("B", "bool"),
    10: ("Q", "uint64"),
    11: ("q", "int64"),
    12: ("d", "float64"),
}
_TYPE_NAMES = {**{code: name for code, (_, name) in _SCALARS.items()}, _STRING: "string", _ARRAY: "array"}
_BLOCK_NAME = re.compile(r"blk\.(\d{1,9})\.[^.]\S*")


class CorruptHeader(Exception):
    """The header cannot be what a GGUF writer produced; the message is a short reason."""


class Truncated(CorruptHeader):
    """The tensor table points past the end of the file."""

    def __init__(self, tensor: str, end: int, size: int) -> None:
        super().__init__(f"tensor {tensor} ends at byte {end:,} but the file has only {size:,} bytes")
        self.tensor, self.end, self.size = tensor, end, size


class UnsupportedVersion(CorruptHeader):
    """A GGUF version this parser does not read."""

    def __init__(self, version: int) -> None:
        super().__init__(f"version {version}")
        self.version = version


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int  # from the start of the file
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    fields: dict[str, Any]  # scalars, short arrays as lists; long arrays as their description
    array_descriptions: dict[str, str]  # "<array of N type>" for every array key
    array_lengths: dict[str, int]
    tensors: tuple[TensorEntry, ...]
    alignment: int
    data_offset: int


def gguf_constants():
    """The gguf package's constants module (type sizes, file types), without the package's __init__, which
    imports its reader, writer, numpy helpers and yaml: ~60 ms of every `localrun chat` start. The module has
    no imports of its own package, and is registered under its own name, so a later `import gguf` reuses it."""
    import sys

    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    import importlib.util
    from pathlib import Path

    package = importlib.util.find_spec("gguf")
    spec = importlib.util.spec_from_file_location(
        "gguf.constants", Path(package.submodule_search_locations[0]) / "constants.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["gguf.constants"] = module
    spec.loader.exec_module(module)
    return module


def _quant_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, values per block, bytes per block), from the gguf package."""
    sizes = gguf_constants().GGML_QUANT_SIZES
    return {int(t): (t.name, block, size) for t, (block, size) in sizes.items()}


def _printable(raw: str) -> str:
    """A name safe to put in a one-line message."""
    text = raw if raw.isprintable() else raw.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 80 else text[:77] + "..."


class _Cursor:
    """Reads little- or big-endian values from a buffer, refusing every read past its end."""

    def __init__(self, buf: Any, size: int, endian: str) -> None:
        self.buf, self.size, self.endian, self.pos = buf, size, endian, 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n_bytes: int, what: str) -> int:
        if n_bytes > self.size - self.pos:
            raise CorruptHeader(f"{what} runs past the end of the file")
        start = self.pos
        self.pos += n_bytes
        return start

    def scalar(self, code: int, what: str) -> Any:
        fmt = self.endian + _SCALARS[code][0]
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def raw_string(self, what: str, *, limit: int | None = None) -> bytes:
        length = self.scalar(10, f"the length of {what}")
        if limit is not None and length > limit:
            raise CorruptHeader(f"{what} is {length:,} bytes long (at most {limit:,})")
        start = self.take(length, what)
        return bytes(self.buf[start : start + length])

    def text(self, what: str, *, limit: int | None = None) -> str:
        try:
            return self.raw_string(what, limit=limit).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptHeader(f"{what} is not valid UTF-8 text") from None


def _check_number(value: Any, what: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CorruptHeader(f"{what} is {value}, not a finite number")


def _value(cur: _Cursor, vtype: int, depth: int, what: str) -> Any:
    """One metadata value; arrays nest at most _MAX_ARRAY_DEPTH deep."""
    if vtype in _SCALARS:
        value = cur.scalar(vtype, what)
        if vtype == _BOOL:
            if value > 1:
                raise CorruptHeader(f"{what} is a boolean stored as {value}")
            return bool(value)
        _check_number(value, what)
        return value
    if vtype == _STRING:
        return cur.text(what)
    if vtype == _ARRAY:
        if depth + 1 > _MAX_ARRAY_DEPTH:
            raise CorruptHeader(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        item_type = cur.scalar(4, f"the item type of {what}")
        count = cur.scalar(10, f"the length of {what}")
        return _array(cur, item_type, count, depth + 1, what)
    raise CorruptHeader(f"{what} has unknown value type {vtype}")


def _array(cur: _Cursor, item_type: int, count: int, depth: int, what: str) -> tuple[int, str, list | None]:
    """(length, item type name, items); items is None for a long array, which is skipped, not kept."""
    if item_type in _SCALARS:
        fmt = _SCALARS[item_type][0]
        start = cur.take(count * struct.calcsize(fmt), what)
        if count > _MAX_KEPT_ITEMS:
            return count, _TYPE_NAMES[item_type], None
        values = list(struct.unpack_from(f"{cur.endian}{count}{fmt}", cur.buf, start))
        if item_type == _BOOL:
            if any(v > 1 for v in values):
                raise CorruptHeader(f"{what} holds a boolean that is neither 0 nor 1")
            return count, "bool", [bool(v) for v in values]
        for v in values:
            _check_number(v, what)
        return count, _TYPE_NAMES[item_type], values
    if item_type == _STRING:
        if count * 8 > cur.left():  # every string has at least its 8-byte length
            raise CorruptHeader(f"{what} claims {count:,} strings, more than the file can hold")
        if count > _MAX_KEPT_STRINGS:
            _skip_strings(cur, count, what)
            return count, "string", None
        return count, "string", [cur.text(what) for _ in range(count)]
    if item_type == _ARRAY:
        if depth + 1 > _MAX_ARRAY_DEPTH:
            raise CorruptHeader(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        if count * 12 > cur.left():  # every inner array has at least its type and length
            raise CorruptHeader(f"{what} claims {count:,} arrays, more than the file can hold")
        inner = [_value(cur, _ARRAY, depth, what) for _ in range(count)]
        if count > _MAX_KEPT_ITEMS:
            return count, "array", None
        return count, "array", [items if items is not None else f"<array of {n} {kind}>" for n, kind, items in inner]
    raise CorruptHeader(f"{what} has unknown item type {item_type}")


def _skip_strings(cur: _Cursor, count: int, what: str) -> None:
    """Step over count strings without decoding them (a 49k-token vocabulary in a few tens of ms)."""
    unpack = struct.Struct(cur.endian + "Q").unpack_from
    buf, size, pos = cur.buf, cur.size, cur.pos
    for _ in range(count):
        if pos + 8 > size:
            raise CorruptHeader(f"{what} runs past the end of the file")
        pos += 8 + unpack(buf, pos)[0]
    if pos > size:
        raise CorruptHeader(f"{what} runs past the end of the file")
    cur.pos = pos


def _read_kv(cur: _Cursor, kv_count: int) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
    if kv_count * 13 > cur.left():  # key length, value type and at least one byte of value
        raise CorruptHeader(f"it claims {kv_count:,} metadata keys, more than the file can hold")
    fields: dict[str, Any] = {}
    described: dict[str, str] = {}
    lengths: dict[str, int] = {}
    for index in range(kv_count):
        key = cur.text(f"metadata key {index}", limit=_MAX_KEY_BYTES)
        what = f"metadata key {_printable(key)}"
        if key in fields:
            raise CorruptHeader(f"{what} appears twice")
        vtype = cur.scalar(4, f"the type of {what}")
        value = _value(cur, vtype, 0, what)
        if vtype == _ARRAY:
            count, kind, items = value
            described[key], lengths[key] = f"<array of {count} {kind}>", count
            value = items if items is not None else described[key]
        fields[key] = value
    return fields, described, lengths


def _alignment(fields: dict[str, Any]) -> int:
    value = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1) or value > 1 << 30:
        raise CorruptHeader(f"general.alignment is {value!r}, not a power of two")
    return value


def _read_tensor(cur: _Cursor, index: int, alignment: int, sizes: dict[int, tuple[str, int, int]]) -> TensorEntry:
    raw_name = cur.text(f"the name of tensor {index}", limit=GGML_MAX_NAME - 1)
    name = _printable(raw_name)
    n_dims = cur.scalar(4, f"the dimension count of tensor {name}")
    if n_dims > GGML_MAX_DIMS:
        raise CorruptHeader(f"tensor {name} has {n_dims:,} dimensions (ggml allows at most {GGML_MAX_DIMS})")
    shape = tuple(cur.scalar(10, f"the shape of tensor {name}") for _ in range(n_dims))
    n_elements = math.prod(shape)
    if any(d > _INT64_MAX for d in shape) or n_elements > _INT64_MAX:
        raise CorruptHeader(f"tensor {name}'s dimensions {list(shape)} overflow a 64-bit element count")
    raw_type = cur.scalar(4, f"the type of tensor {name}")
    if raw_type not in sizes:
        raise CorruptHeader(f"tensor {name} has unknown ggml type {raw_type}")
    type_name, block, type_size = sizes[raw_type]
    row = shape[0] if shape else 1
    if row % block:
        raise CorruptHeader(
            f"tensor {name} has rows of {row:,} values, not a multiple of {type_name}'s block of {block}"
        )
    offset = cur.scalar(10, f"the data offset of tensor {name}")
    if offset % alignment:
        raise CorruptHeader(f"tensor {name}'s data offset {offset:,} is not a multiple of the alignment {alignment}")
    if raw_name.startswith("blk.") and not _BLOCK_NAME.fullmatch(raw_name):
        raise CorruptHeader(f"tensor name {name} does not parse as blk.N.NAME")
    return TensorEntry(raw_name, shape, type_name, offset, n_elements, n_elements // block * type_size)


def _place_tensors(entries: list[TensorEntry], data_offset: int, size: int) -> tuple[TensorEntry, ...]:
    """Absolute offsets; refuse tensors past the end of the file or overlapping each other."""
    placed = tuple(
        TensorEntry(t.name, t.shape, t.type_name, data_offset + t.offset, t.n_elements, t.n_bytes) for t in entries
    )
    for t in placed:
        if t.offset + t.n_bytes > size:
            raise Truncated(_printable(t.name), t.offset + t.n_bytes, size)
    ordered = sorted(placed, key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.offset < before.offset + before.n_bytes:
            raise CorruptHeader(f"the data of tensors {_printable(before.name)} and {_printable(after.name)} overlap")
    return placed


def _parse(buf: Any, size: int) -> Header:
    version = struct.unpack_from("<I", buf, 4)[0] if size >= 8 else None
    if version is None:
        raise CorruptHeader("the header ends after the magic bytes")
    endian = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine
        endian, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise UnsupportedVersion(version)
    cur = _Cursor(buf, size, endian)
    cur.pos = 8
    tensor_count = cur.scalar(10, "the tensor count")
    kv_count = cur.scalar(10, "the metadata key count")
    fields, described, lengths = _read_kv(cur, kv_count)
    alignment = _alignment(fields)
    if tensor_count * 24 > cur.left():  # name length, dimension count, type and offset at the least
        raise CorruptHeader(f"it claims {tensor_count:,} tensors, more than the file can hold")
    sizes = _quant_sizes()
    entries, names = [], set()
    for index in range(tensor_count):
        entry = _read_tensor(cur, index, alignment, sizes)
        if entry.name in names:
            raise CorruptHeader(f"tensor {_printable(entry.name)} appears twice")
        names.add(entry.name)
        entries.append(entry)
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(entries, data_offset, size)
    return Header(version, fields, described, lengths, tensors, alignment, data_offset)


def require_regular_file(path: Path) -> None:
    """UserError for a path that is a FIFO, a device or a socket: opening one for reading can block forever."""
    import stat

    from localrun.errors import UserError

    try:
        mode = path.stat().st_mode
    except OSError:
        return  # a missing file: the caller's open names it
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise UserError(f"{path.name} is not a regular file (a pipe or a device?): pass a model file.")


def read_header(path: Path) -> Header:
    """Parse path's GGUF header and tensor table (the file is memory-mapped; weights are never touched)."""
    require_regular_file(path)
    with path.open("rb") as handle:
        size = path.stat().st_size
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, size)
