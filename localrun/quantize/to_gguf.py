"""Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3, Gemma 3) -> GGUF (F32, F16 or BF16), written with
gguf's GGUFWriter, with the metadata and tensors llama.cpp's own convert_hf_to_gguf.py writes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localrun.errors import UserError
from localrun.quantize import atomic_output, check_disk_space
from localrun.quantize.hf_vocab import (
    HF_PRE_TOKENIZERS,
    KNOWN_PRE_TOKENIZERS,
    detect_pre_tokenizer,
    read_json,
    restore_pre_tokenizer,
    write_bpe_tokenizer,
    write_spm_tokenizer,
)

__all__ = ["KNOWN_PRE_TOKENIZERS", "convert_hf_to_gguf", "detect_pre_tokenizer", "iter_convert"]
__all__ += ["gguf_to_hf_dir", "restore_pre_tokenizer"]

# HF class name -> GGUF architecture; Mistral's dense models are llama to llama.cpp.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # its text part; the vision tower is llama.cpp's mmproj
}
OUT_TYPES = ("F32", "F16", "BF16")
# Tensors of a multimodal checkpoint that are not the language model.
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "vision_model.", "visual.")


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


def hf_architecture(config: dict[str, Any]) -> tuple[str, str]:
    """(HF class name, GGUF arch) for a config.json, or a UserError naming the supported ones."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    supported = ", ".join(ARCHITECTURES)
    raise UserError(f"Unsupported architecture {', '.join(names) or 'unknown'}: the converter handles {supported}.")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: a multimodal config's text_config over its top level."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def write_tokenizer(writer: Any, model_dir: Path, arch: str, vocab_size: int, *, pre_tokenizer: str | None) -> str:
    """Add the tokenizer llama.cpp's converter would for `arch`; returns tokenizer.ggml.pre."""
    if arch != "gemma3":
        pre = write_bpe_tokenizer(writer, model_dir, vocab_size, pre_tokenizer=pre_tokenizer)
        if arch == "llama" and vocab_size == 49152:  # llama.cpp's rule for Granite/SmolLM-sized vocabularies
            writer.add_add_bos_token(False)
        return pre
    if not (model_dir / "tokenizer.model").is_file():
        raise UserError(f"{model_dir} has no tokenizer.model: Gemma 3 converts with its SentencePiece model.")
    write_spm_tokenizer(writer, model_dir, vocab_size)
    writer.add_add_space_prefix(False)
    return "default"


def _rope_settings(config: dict[str, Any]) -> tuple[dict[str, Any], float | None, float | None]:
    """(global RoPE parameters, theta, sliding-window theta) from the old (rope_theta, rope_scaling,
    rope_local_base_freq) or the new (rope_parameters, per layer type) config layout."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" not in params and "sliding_attention" not in params:
        local = next((config[k] for k in ("local_rope_theta", "rope_local_base_freq") if k in config), None)
        if local is not None:
            params["sliding_attention"] = {"rope_theta": local}
        params.setdefault("rope_theta", config.get("rope_theta"))
        if "type" in params:
            params.setdefault("rope_type", params["type"])
    full = params.get("full_attention", params)
    return full, full.get("rope_theta"), params.get("sliding_attention", {}).get("rope_theta")


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> Any:
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


def _write_rope_scaling(writer: Any, rope: dict[str, Any]) -> None:
    import gguf

    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind in (None, "default", "llama3"):  # llama3 travels as the rope_freqs tensor
        return
    if kind not in ("linear", "yarn") or factor is None:
        raise UserError(f"RoPE scaling type {kind!r} is not supported by the converter (linear, yarn, llama3 are).")
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(factor))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        extras = {"extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor}
        extras |= {"attention_factor": writer.add_rope_scaling_yarn_attn_factor}
        extras |= {
            "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
            "beta_slow": writer.add_rope_scaling_yarn_beta_slow,
        }
        for key, adder in extras.items():
            value = rope.get(key, rope.get("attn_factor") if key == "attention_factor" else None)
            if value is not None:
                adder(value)


def _check_gemma3(config: dict[str, Any]) -> None:
    """Refuse what llama.cpp's gemma3 graph cannot run as transformers does (it fixes these by convention)."""
    if config.get("attn_logit_softcapping") is not None:
        raise UserError("This Gemma 3 config sets attn_logit_softcapping, which llama.cpp's gemma3 does not apply.")
    n_layer, head_dim = config["num_hidden_layers"], config.get("head_dim", 256)
    scale = config["hidden_size"] // config["num_attention_heads"] if n_layer == 62 else head_dim
    if config.get("query_pre_attn_scalar", scale) != scale:
        raise UserError(f"query_pre_attn_scalar must be {scale} for llama.cpp's gemma3 attention scale.")
    layer_types = config.get("layer_types")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)]
    if layer_types is not None and list(layer_types) != expected:
        raise UserError("llama.cpp's gemma3 needs every 6th layer global (5 sliding, 1 full); this config differs.")
    if config.get("sliding_window_pattern") != 1 and not config.get("sliding_window"):
        raise UserError("This Gemma 3 config has no sliding_window: it is not a complete Gemma 3 config.")


def write_hparams(writer: Any, config: dict[str, Any], arch: str, *, file_type: int) -> dict[str, Any] | None:
    """Add the hyperparameters in llama.cpp's converter's order; returns the llama3 RoPE parameters when a
    rope_freqs tensor is needed."""
    gemma = arch == "gemma3"
    if gemma:
        _check_gemma3(config)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 131072 if gemma else 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    if "num_key_value_heads" in config:
        writer.add_head_count_kv(config["num_key_value_heads"])
    rope, theta, swa_theta = _rope_settings(config)
    _write_rope_scaling(writer, rope)
    if theta is not None or gemma:
        writer.add_rope_freq_base(theta if theta is not None else 1_000_000.0)
    if swa_theta is not None:
        writer.add_rope_freq_base_swa(swa_theta)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    if "head_dim" in config or gemma:
        writer.add_key_length(config.get("head_dim", 256))
        writer.add_value_length(config.get("head_dim", 256))
    writer.add_file_type(file_type)
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(
            config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        )
    if gemma:
        if softcap := config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(softcap)
        if config.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(config["sliding_window"])
        if "num_key_value_heads" not in config:
            writer.add_head_count_kv(4)
    return rope if rope.get("rope_type") == "llama3" else None


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
    n_head_permute: int = 0  # 0 = no RoPE reordering
    shift: float = 0.0  # added to the weights (Gemma's norms store weight - 1)
    rows: int | None = None  # keep only the first rows (Gemma's embedding beyond the vocabulary)


_GGUF_ARCH = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "gemma3": "GEMMA3"}


def plan_tensors(model_dir: Path, config: dict[str, Any], arch: str, *, n_vocab: int | None = None) -> list[_Plan]:
    """Map every checkpoint tensor to its GGUF name, skipping what llama.cpp does not load."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.TensorNameMap(getattr(gguf.MODEL_ARCH, _GGUF_ARCH[arch]), config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    tied = bool(config.get("tie_word_embeddings", False))
    plans = []
    for hf_name, file in sorted(_tensor_files(model_dir).items()):
        name = hf_name.replace("language_model.", "")
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        if any(part in name for part in _NOT_TEXT):
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"Tensor {hf_name} has no GGUF equivalent: this checkpoint is not a plain {arch} model.")
        with safe_open(file, framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        permute, shift, rows = 0, 0.0, None
        if arch == "llama" and ".q_proj." in name:
            permute = n_head
        elif arch == "llama" and ".k_proj." in name:
            permute = n_kv
        if arch == "gemma3" and name.endswith("norm.weight"):
            shift = 1.0
        if arch == "gemma3" and "embed_tokens.weight" in name and n_vocab is not None and n_vocab < shape[0]:
            rows, shape = n_vocab, (n_vocab, *shape[1:])
        plans.append(_Plan(hf_name, gguf_name, file, shape, permute, shift, rows))
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
        data = f.get_tensor(plan.hf_name)
    # like llama.cpp: BF16 sources go to F32 first, and the Gemma norm shift is added in the source precision
    if data.dtype not in (torch.float16, torch.float32):
        data = data.to(torch.float32)
    if plan.shift:
        data = data + plan.shift
    if plan.rows is not None:
        data = data[: plan.rows]
    data = data.to(torch.float32).numpy()
    if plan.n_head_permute:
        data = rope_interleave(data, plan.n_head_permute)
    dtype, ggml_type = _out_dtype(plan.shape, out_type)
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.quantize(np.ascontiguousarray(data), ggml_type).view(np.uint16)
    return np.ascontiguousarray(data.astype(dtype, copy=False))


def _file_type(out_type: str) -> int:
    from gguf import LlamaFileType

    return {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16}[out_type]


def _write_general(writer: Any, model_dir: Path) -> None:
    """general.type, name, size label and whatever the model card says, as gguf's Metadata reads them."""
    import gguf

    total, shared, expert, n_expert = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    metadata.name = metadata.name or model_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)


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
    config = text_config(read_json(model_dir / "config.json"))
    _, arch = hf_architecture(config)
    plans = plan_tensors(model_dir, config, arch, n_vocab=config["vocab_size"])
    n_params = sum(math.prod(p.shape) for p in plans)
    est_bytes = sum(math.prod(p.shape) * _out_dtype(p.shape, out_type)[0].itemsize for p in plans)
    check_disk_space(out_path.parent, est_bytes + (64 << 20))
    yield ConvertStep(0.0, f"converting {model_dir.name} ({arch}, {n_params / 1e6:.1f}M params) to {out_type}")
    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        rope, theta, _ = _rope_settings(config)
        factors = None
        if rope.get("rope_type") == "llama3":
            head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            factors = llama3_rope_factors(head_dim, theta or 10000.0, rope)
            writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
        for p in plans:
            dtype, ggml_type = _out_dtype(p.shape, out_type)
            nbytes = math.prod(p.shape) * dtype.itemsize
            writer.add_tensor_info(p.gguf_name, p.shape, dtype, nbytes, raw_dtype=ggml_type)
        # metadata in llama.cpp's converter's order: general, hyperparameters, quantization version, tokenizer
        _write_general(writer, model_dir)
        write_hparams(writer, config, arch, file_type=_file_type(out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        pre = write_tokenizer(writer, model_dir, arch, config["vocab_size"], pre_tokenizer=pre_tokenizer)
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
