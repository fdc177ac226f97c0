"""Hugging Face model -> bitsandbytes NF4 (double quant) or INT8, saved as a directory that reloads."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from localrun.errors import UserError
from localrun.quantize import atomic_output, check_disk_space

MODES = ("nf4", "int8")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass(frozen=True, slots=True)
class BnbResult:
    """A saved bitsandbytes model: directory size on disk and in-memory footprint after loading."""

    path: Path
    mode: str
    size_bytes: int
    footprint_bytes: int
    n_weights: int
    bits_per_weight: float


def bnb_config(mode: str, *, compute_dtype: str = "bfloat16") -> object:
    """The BitsAndBytesConfig for `mode` (nf4: double quantization on, the given compute dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    if mode not in MODES:
        raise UserError(f"Unknown bitsandbytes mode {mode!r}: choose one of {', '.join(MODES)}.")
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"Unknown compute dtype {compute_dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}.")
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _count_weights(model: object) -> int:
    """Original (unpacked) weight count: bitsandbytes packs 4-bit params two per byte."""
    total = 0
    for param in model.parameters():  # type: ignore[attr-defined]
        shape = getattr(param, "quant_state", None)
        total += int(shape.shape.numel()) if shape is not None else param.numel()
    return total


def quantize_bnb(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    mode: str = "nf4",
    compute_dtype: str = "bfloat16",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> BnbResult:
    """Load `model_dir` quantized by bitsandbytes and save_pretrained it to `out_dir` (atomically).

    The same checks as chat: pickle weights only with allow_pickle, repository code only with trust_remote_code."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model directory (no config.json).")
    config = bnb_config(mode, compute_dtype=compute_dtype)
    from localrun.backends.hf_load import check_remote_code, check_weights, quiet_bitsandbytes

    check_remote_code(model_dir, trust_remote_code=trust_remote_code)
    safetensors = check_weights(model_dir, allow_pickle=allow_pickle)
    check_disk_space(out_dir.parent, dir_size(model_dir) // 2 + (64 << 20))
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries our own progress lines
    quiet_bitsandbytes()
    # unquantized parts (embeddings, norms) are kept in the compute dtype rather than the checkpoint's F32
    dtype = getattr(torch, compute_dtype) if mode == "nf4" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=config,
        device_map="cpu",
        dtype=dtype,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        use_safetensors=safetensors,
    )
    footprint = int(model.get_memory_footprint())
    n_weights = _count_weights(model)
    with atomic_output(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        for name in _TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
    size = dir_size(out_dir)
    weights_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return BnbResult(out_dir, mode, size, footprint, n_weights, 8.0 * weights_bytes / max(n_weights, 1))


def load_bnb(path: str | Path) -> object:
    """Reload a saved bitsandbytes directory (its quantization config travels in config.json)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(path), device_map="cpu")
