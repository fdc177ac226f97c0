"""Tokenizers of Hugging Face checkpoints -> GGUF tokenizer metadata, as llama.cpp's own converter writes it.

Byte-level BPE (tokenizer.json) becomes tokenizer model "gpt2"; a SentencePiece tokenizer.model becomes "llama",
read with a small protobuf reader so that sentencepiece need not be installed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from localrun.errors import UserError

# Pre-tokenizers as tokenizer.json spells them, keyed by the name llama.cpp knows them by (tokenizer.ggml.pre).
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _sequence(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


_DIGITS = {"type": "Digits", "individual_digits": True}
HF_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "llama-bpe": _sequence(_split(_LLAMA3_REGEX), _BYTE_LEVEL_NO_REGEX),
    "qwen2": _sequence(_split(_QWEN2_REGEX), _BYTE_LEVEL_NO_REGEX),
    # smollm and starcoder split alike; llama.cpp's smollm entry only skips cleaning spaces on decode
    "smollm": _sequence(_DIGITS, _BYTE_LEVEL),
    "starcoder": _sequence(_DIGITS, _BYTE_LEVEL),
    "gpt-2": _BYTE_LEVEL,
}
KNOWN_PRE_TOKENIZERS = tuple(HF_PRE_TOKENIZERS)
# Special-token kinds in the order llama.cpp's converter looks them up (and so writes them).
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_SPACE = "\u2581"  # SentencePiece's visible space


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent} has no {path.name}: pass a complete Hugging Face model directory.") from None


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def _pre_tokenizer_steps(tokenizer: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The pre-tokenizer as a comparable list of (kind, settings) steps."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out: list[tuple[Any, ...]] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            out.append(("Split", pattern.get("Regex", pattern.get("String"))))
        elif kind == "Digits":
            out.append(("Digits", bool(step.get("individual_digits"))))
        elif kind == "ByteLevel":
            out.append(("ByteLevel", bool(step.get("use_regex", True))))
        else:
            out.append((kind,))
    return out


def detect_pre_tokenizer(tokenizer: dict[str, Any], tokenizer_config: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name (tokenizer.ggml.pre) matching tokenizer.json, or None if unknown.

    llama.cpp picks its split regex from this name, so only exact structural matches are accepted.
    """
    steps = _pre_tokenizer_steps(tokenizer)
    matches = [n for n, pre in HF_PRE_TOKENIZERS.items() if _pre_tokenizer_steps({"pre_tokenizer": pre}) == steps]
    if set(matches) == {"smollm", "starcoder"}:
        return "starcoder" if tokenizer_config.get("clean_up_tokenization_spaces") else "smollm"
    return matches[0] if matches else None


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def looks_special(token: str) -> bool:
    """Added tokens that some models forget to mark special but that are control tokens all the same."""
    if token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    pairs = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))
    return any(token.startswith(a) and token.endswith(b) for a, b in pairs)


class _Specials:
    """Special token ids, add-BOS/EOS flags and the chat template, looked up the way llama.cpp's converter does:
    tokenizer.json's post-processor first, then tokenizer_config.json, then config.json's *_token_id."""

    def __init__(self, model_dir: Path, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.chat_template: Any = None
        self.normalizer: dict[str, bool] = {}
        tokenizer = _optional_json(model_dir / "tokenizer.json")
        config = _optional_json(model_dir / "tokenizer_config.json")
        names = {t: _token_content(config.get(f"{t}_token")) for t in SPECIAL_TYPES} if config else {}
        if tokenizer is not None:
            self._read_normalizer(tokenizer.get("normalizer") or {})
            if config is not None:
                names["bos"] = names["bos"] or names["cls"]
                names["eos"] = names["eos"] or names["sep"]
            self._read_post_processor(tokenizer.get("post_processor") or {}, names, config is not None)
        if config is not None:
            self._read_config(model_dir, config, names, (tokenizer or {}).get("added_tokens", []))
        model_config = _optional_json(model_dir / "config.json") or {}
        for kind in SPECIAL_TYPES:
            token_id = model_config.get(f"{kind}_token_id")
            if token_id is None:
                token_id = (model_config.get("text_config") or {}).get(f"{kind}_token_id")
            self._set(kind, token_id)

    def _set(self, kind: str, token_id: Any) -> None:
        if isinstance(token_id, int) and 0 <= token_id < self.n_vocab and kind not in self.ids:
            self.ids[kind] = token_id

    def _read_normalizer(self, normalizer: dict[str, Any]) -> None:
        kind = normalizer.get("type")
        if kind == "Lowercase":
            self.normalizer["lowercase"] = True
        elif kind == "StripAccents":
            self.normalizer["strip_accents"] = True
        elif kind == "BertNormalizer":
            for key, name in (("lowercase", "lowercase"), ("strip_accents", "strip_accents")):
                if key in normalizer:
                    self.normalizer[name] = normalizer[key]
        elif kind == "Sequence":
            for step in normalizer.get("normalizers", []):
                self._read_normalizer(step)

    def _read_post_processor(self, post: dict[str, Any], names: dict[str, str | None], has_config: bool) -> None:
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add |= {"bos": True, "eos": True, "sep": True}
            elif kind == "TemplateProcessing" and len(proc.get("single", [])) > 1:
                single = proc["single"]
                first = single[0].get("SpecialToken", {}).get("id")
                if first:
                    if not has_config:
                        names["bos"] = first
                    elif first not in (names.get("bos"), names.get("cls")):
                        names["bos"] = names.get("bos") or first
                        names["cls"] = names.get("cls") or first
                    self.add["bos"] = first in (names.get("bos"), names.get("cls"))
                last = single[-1].get("SpecialToken", {}).get("id")
                if last:
                    if not has_config:
                        names["eos"] = last
                    self.add["eos"] = last == names.get("eos")

    def _read_config(
        self, model_dir: Path, config: dict[str, Any], names: dict[str, str | None], added: list[dict[str, Any]]
    ) -> None:
        self.chat_template = config.get("chat_template", _template_files(model_dir))
        if not isinstance(self.chat_template, str | list):
            self.chat_template = None
        for kind in SPECIAL_TYPES:
            flag = config.get(f"add_{kind}_token")
            if isinstance(flag, bool):
                self.add.setdefault(kind, flag)
            content = names.get(kind)
            if content is not None:
                self._set(kind, next((t.get("id") for t in added if t.get("content") == content), None))

    def write(self, writer: Any) -> None:
        for kind, token_id in self.ids.items():
            if (adder := getattr(writer, f"add_{kind}_token_id", None)) is not None:
                adder(token_id)
        for kind, flag in self.add.items():
            if (adder := getattr(writer, f"add_add_{kind}_token", None)) is not None:
                adder(flag)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)
        for name, flag in self.normalizer.items():
            writer.add_bool(f"tokenizer.ggml.normalizer.{name}", flag)


def _template_files(model_dir: Path) -> Any:
    """The chat template from chat_template.jinja (with any additional_chat_templates) or chat_template.json."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        template: Any = jinja.read_text(encoding="utf-8")
        extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            template = [{"name": "default", "template": template}]
            template += [{"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        return template
    as_json = model_dir / "chat_template.json"
    return read_json(as_json).get("chat_template") if as_json.is_file() else None


def _bpe_vocab(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types by id, padded to the model's vocab size."""
    from gguf import TokenType

    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        token = added["content"]
        if added.get("special") or looks_special(token):
            by_id[added["id"]] = (token, TokenType.CONTROL)
        else:
            by_id[added["id"]] = (token.replace(_SPACE, " "), TokenType.USER_DEFINED)
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        token, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def write_bpe_tokenizer(writer: Any, model_dir: Path, vocab_size: int, *, pre_tokenizer: str | None) -> str:
    """Add a byte-level BPE vocabulary, merges, special tokens and chat template; returns the pre-tokenizer."""
    tokenizer = read_json(model_dir / "tokenizer.json")
    tok_config = _optional_json(model_dir / "tokenizer_config.json") or {}
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or not any(s[0] == "ByteLevel" for s in _pre_tokenizer_steps(tokenizer)):
        raise UserError("Only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2 style) can be converted so far.")
    pre = pre_tokenizer or detect_pre_tokenizer(tokenizer, tok_config)
    if pre is None:
        raise UserError(
            "Unknown pre-tokenizer in tokenizer.json: pass --pre-tokenizer NAME (one llama.cpp knows, e.g. "
            f"{', '.join(KNOWN_PRE_TOKENIZERS)}) if you know which one matches."
        )
    tokens, types = _bpe_vocab(tokenizer, vocab_size)
    # merges with spaces inside a part (transformers >= 4.45's list form) keep them visible as U+0120
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _Specials(model_dir, len(tokens)).write(writer)
    return pre


def _protobuf_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: ints for varints, bytes for everything else."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < len(buf):
        key = varint()
        wire = key & 7
        if wire == 0:
            yield key >> 3, varint()
            continue
        size = {1: 8, 5: 4}.get(wire) if wire != 2 else varint()
        if size is None:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, buf[pos : pos + size]
        pos += size


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece in a SentencePiece tokenizer.model (types as sentencepiece numbers
    them: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    pieces = []
    try:
        for field, value in _protobuf_fields(path.read_bytes()):
            if field != 1:
                continue
            piece, score, kind = "", 0.0, 1
            for sub, sub_value in _protobuf_fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    kind = sub_value
            pieces.append((piece, score, kind))
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        raise UserError(f"{path} is not a SentencePiece model: replace it with the checkpoint's own.") from None
    if not pieces:
        raise UserError(f"{path} holds no tokens: replace it with the checkpoint's own tokenizer.model.")
    return pieces


def write_spm_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> int:
    """Add a SentencePiece vocabulary (tokenizer.model) with scores and special tokens; returns its size."""
    from gguf import TokenType

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    # llama.cpp keeps unknown, control, unused and byte pieces; user-defined ones read as normal
    keep = {2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 5: TokenType.UNUSED, 6: TokenType.BYTE}
    for i, (piece, score, kind) in enumerate(read_sentencepiece(model_dir / "tokenizer.model")[:vocab_size]):
        tokens[i], scores[i], types[i] = piece, score, int(keep.get(kind, TokenType.NORMAL))
    added = _optional_json(model_dir / "added_tokens.json") or {}
    for token, i in added.items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = token, -1000.0, int(TokenType.USER_DEFINED)
    decoder = (_optional_json(model_dir / "tokenizer_config.json") or {}).get("added_tokens_decoder", {})
    for key, entry in decoder.items():
        i, token = int(key), entry["content"]
        if i >= vocab_size:
            continue
        if entry.get("special") or looks_special(token):
            types[i] = int(TokenType.CONTROL)
        else:
            token, types[i] = token.replace(_SPACE, " "), int(TokenType.USER_DEFINED)
        tokens[i], scores[i] = token, -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _Specials(model_dir, len(tokens)).write(writer)
    return len(tokens)


def restore_pre_tokenizer(hf_dir: Path, pre: str) -> None:
    """Write llama.cpp pre-tokenizer `pre` back into tokenizer.json as its HF equivalent.

    transformers rebuilds a GGUF's tokenizer with a plain ByteLevel pre-tokenizer whatever tokenizer.ggml.pre says,
    which silently changes how digits and punctuation split.
    """
    path = hf_dir / "tokenizer.json"
    tokenizer = read_json(path)
    tokenizer["pre_tokenizer"] = HF_PRE_TOKENIZERS[pre]
    if pre == "llama-bpe":
        tokenizer["model"]["ignore_merges"] = True
    path.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config_path = hf_dir / "tokenizer_config.json"
    config = _optional_json(config_path) or {}
    config["clean_up_tokenization_spaces"] = pre in ("starcoder", "gpt-2")
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
