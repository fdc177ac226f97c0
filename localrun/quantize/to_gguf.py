"""Hugging Face llama-family checkpoint -> GGUF (F32, F16 or BF16), written with gguf's GGUFWriter."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localrun.errors import UserError
from localrun.quantize import atomic_output, check_disk_space

# HF class name -> GGUF architecture; Mistral's dense models are llama to llama.cpp.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
OUT_TYPES = ("F32", "F16", "BF16")

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


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What a conversion produced."""

    path: Path
    size_bytes: int
    n_params: int
    arch: str
    pre_tokenizer: str
    out_type: str


@dataclass(frozen=True, slots=True)
class ConvertStep:
    """Progress of one conversion; the last step carries the result."""

    fraction: float
    message: str
    result: ConvertResult | None = None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent} has no {path.name}: pass a complete Hugging Face model directory.") from None


def hf_architecture(config: dict[str, Any]) -> tuple[str, str]:
    """(HF class name, GGUF arch) for a config.json, or a UserError naming the supported ones."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    supported = ", ".join(ARCHITECTURES)
    raise UserError(f"Unsupported architecture {', '.join(names) or 'unknown'}: the converter handles {supported}.")


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


def _add_bos_default(tokenizer: dict[str, Any], bos: str | None) -> bool:
    """Whether the post-processor prepends BOS (used when tokenizer_config has no add_bos_token)."""
    post = tokenizer.get("post_processor") or {}
    processors = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing" and bos is not None:
            first = (proc.get("single") or [{}])[0]
            if first.get("SpecialToken", {}).get("id") == bos:
                return True
    return False


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> Any:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return tokenizer_config.get("chat_template")


def _vocab_lists(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types by id, padded to the model's vocab size."""
    from gguf import TokenType

    model_vocab: dict[str, int] = tokenizer["model"]["vocab"]
    by_id: dict[int, tuple[str, int]] = {i: (tok, TokenType.NORMAL) for tok, i in model_vocab.items()}
    for added in tokenizer.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        tok, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))
    return tokens, types


def write_tokenizer(writer: Any, model_dir: Path, vocab_size: int, *, pre_tokenizer: str | None) -> str:
    """Add the BPE vocabulary, merges, special tokens and chat template; returns the pre-tokenizer name."""
    tokenizer = read_json(model_dir / "tokenizer.json")
    config_path = model_dir / "tokenizer_config.json"
    tok_config = read_json(config_path) if config_path.is_file() else {}
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or not any(s[0] == "ByteLevel" for s in _pre_tokenizer_steps(tokenizer)):
        raise UserError("Only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2 style) can be converted so far.")
    pre = pre_tokenizer or detect_pre_tokenizer(tokenizer, tok_config)
    if pre is None:
        raise UserError(
            "Unknown pre-tokenizer in tokenizer.json: pass --pre-tokenizer NAME (one llama.cpp knows, e.g. "
            f"{', '.join(KNOWN_PRE_TOKENIZERS)}) if you know which one matches."
        )
    tokens, types = _vocab_lists(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {tok: i for i, tok in enumerate(tokens)}
    specials = {name: _token_content(tok_config.get(f"{name}_token")) for name in ("bos", "eos", "unk", "pad")}
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id}
    adders |= {"unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for name, content in specials.items():
        if content is not None and content in ids:
            adders[name](ids[content])
    add_bos = tok_config.get("add_bos_token")
    writer.add_add_bos_token(bool(add_bos) if add_bos is not None else _add_bos_default(tokenizer, specials["bos"]))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    template = _chat_template(model_dir, tok_config)
    if template:
        writer.add_chat_template(template)
    return pre


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling dict or None) from either the old (rope_theta/rope_scaling) or new (rope_parameters) layout."""
    params = config.get("rope_parameters") or {}
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") if scaling else None
    return theta, (scaling if kind not in (None, "default") else None)


def llama3_rope_factors(config: dict[str, Any], head_dim: int, theta: float, scaling: dict[str, Any]) -> Any:
    """Per-frequency divisors for llama3-style RoPE scaling (Meta's published formula)."""
    import numpy as np

    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / head_dim))
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_hparams(writer: Any, config: dict[str, Any], *, name: str, file_type: int) -> dict[str, Any] | None:
    """Add model hyperparameters; returns the llama3 RoPE scaling dict when a rope_freqs tensor is needed."""
    import gguf

    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    theta, scaling = _rope_settings(config)
    writer.add_rope_freq_base(theta)
    if scaling is None:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "llama3":
        return scaling
    if kind not in ("linear", "yarn"):
        raise UserError(f"RoPE scaling type {kind!r} is not supported by the converter (linear, yarn, llama3 are).")
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(scaling["factor"]))
    if "original_max_position_embeddings" in scaling:
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    return None


def rope_interleave(weight: Any, n_head: int) -> Any:
    """Reorder q/k rows from HF's rotate-half layout to the interleaved pairs llama.cpp's normal RoPE uses."""
    rows = weight.shape[0]
    per_head = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / v for k, v in read_json(index)["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{model_dir} has no model.safetensors: convert the checkpoint to safetensors first.")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


@dataclass(frozen=True, slots=True)
class _Plan:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]
    n_head_permute: int  # 0 = no RoPE reordering


def plan_tensors(model_dir: Path, config: dict[str, Any], arch: str) -> list[_Plan]:
    """Map every checkpoint tensor to its GGUF name, skipping what llama.cpp does not load."""
    import gguf
    from safetensors import safe_open

    gguf_arch = gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2
    name_map = gguf.TensorNameMap(gguf_arch, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    tied = bool(config.get("tie_word_embeddings", False))
    plans = []
    for hf_name, file in sorted(_tensor_files(model_dir).items()):
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"Tensor {hf_name} has no GGUF equivalent: this checkpoint is not a plain {arch} model.")
        with safe_open(file, framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        permute = 0
        if arch == "llama" and ".q_proj." in hf_name:
            permute = n_head
        elif arch == "llama" and ".k_proj." in hf_name:
            permute = n_kv
        plans.append(_Plan(hf_name, gguf_name, file, shape, permute))
    return plans


def _out_dtype(shape: tuple[int, ...], out_type: str) -> tuple[Any, Any]:
    """(numpy dtype written, GGML type) for one tensor; 1-D tensors (norms, biases) always stay F32."""
    import numpy as np
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or out_type == "F32":
        return np.dtype(np.float32), T.F32
    if out_type == "F16":
        return np.dtype(np.float16), T.F16
    return np.dtype(np.uint16), T.BF16


def _load_tensor(plan: _Plan, out_type: str) -> Any:
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(plan.file, framework="pt") as f:
        data = f.get_tensor(plan.hf_name).to(torch.float32).numpy()
    if plan.n_head_permute:
        data = rope_interleave(data, plan.n_head_permute)
    dtype, ggml_type = _out_dtype(plan.shape, out_type)
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.quantize(np.ascontiguousarray(data), ggml_type).view(np.uint16)
    return np.ascontiguousarray(data.astype(dtype, copy=False))


def _file_type(out_type: str) -> int:
    from gguf import LlamaFileType

    return {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16}[out_type]


def iter_convert(
    model_dir: str | Path, out_path: str | Path, *, out_type: str = "F16", pre_tokenizer: str | None = None
) -> Iterator[ConvertStep]:
    """Convert an HF model directory to one GGUF file, yielding progress; the source is only read."""
    import gguf
    import numpy as np

    model_dir, out_path = Path(model_dir), Path(out_path)
    out_type = out_type.upper()
    if out_type not in OUT_TYPES:
        raise UserError(f"Unknown conversion type {out_type!r}: choose one of {', '.join(OUT_TYPES)}.")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model directory (no config.json).")
    config = read_json(model_dir / "config.json")
    _, arch = hf_architecture(config)
    plans = plan_tensors(model_dir, config, arch)
    n_params = sum(math.prod(p.shape) for p in plans)
    est_bytes = sum(math.prod(p.shape) * _out_dtype(p.shape, out_type)[0].itemsize for p in plans)
    check_disk_space(out_path.parent, est_bytes + (64 << 20))
    yield ConvertStep(0.0, f"converting {model_dir.name} ({arch}, {n_params / 1e6:.1f}M params) to {out_type}")
    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        llama3 = write_hparams(writer, config, name=model_dir.name, file_type=_file_type(out_type))
        pre = write_tokenizer(writer, model_dir, config["vocab_size"], pre_tokenizer=pre_tokenizer)
        factors = None
        if llama3 is not None:
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            factors = llama3_rope_factors(config, head_dim, _rope_settings(config)[0], llama3)
            writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
        for p in plans:
            dtype, ggml_type = _out_dtype(p.shape, out_type)
            nbytes = math.prod(p.shape) * dtype.itemsize
            writer.add_tensor_info(p.gguf_name, p.shape, dtype, nbytes, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if factors is not None:
            writer.write_tensor_data(np.ascontiguousarray(factors))
        for i, p in enumerate(plans):
            writer.write_tensor_data(_load_tensor(p, out_type))
            yield ConvertStep((i + 1) / len(plans), f"{p.gguf_name} {list(p.shape)}")
        writer.close()
    result = ConvertResult(out_path, out_path.stat().st_size, n_params, arch, pre, out_type)
    yield ConvertStep(1.0, f"wrote {out_path.name}", result)


def convert_hf_to_gguf(
    model_dir: str | Path, out_path: str | Path, *, out_type: str = "F16", pre_tokenizer: str | None = None
) -> ConvertResult:
    """Convert without progress reporting; returns what was written."""
    result = None
    for step in iter_convert(model_dir, out_path, out_type=out_type, pre_tokenizer=pre_tokenizer):
        result = step.result or result
    assert result is not None
    return result


def _gguf_pre_tokenizer(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


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
    config = read_json(config_path) if config_path.is_file() else {}
    config["clean_up_tokenization_spaces"] = pre in ("starcoder", "gpt-2")
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF into a Hugging Face safetensors directory (F32) with transformers.

    Used for round trips and as a bitsandbytes source; the GGUF's pre-tokenizer is carried over.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"The source {gguf_path} does not exist: pass an existing .gguf file.")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers marks GGUF-loaded models as unsaveable; a plain model with the same weights is not
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    del loaded
    with atomic_output(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pre = _gguf_pre_tokenizer(gguf_path)
        if pre in HF_PRE_TOKENIZERS:
            restore_pre_tokenizer(tmp, pre)
    return out_dir
