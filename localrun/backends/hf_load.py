"""Loading for the transformers backend: device, dtype, attention, safety checks, quantization.

Imported only by hf.py, itself imported lazily by load_backend(), so torch stays out of GGUF chats.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from localrun.backends.base import ResolvedModel
from localrun.errors import UserError
from localrun.settings import LoadOptions

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True, slots=True)
class Loaded:
    """What load_model() hands back to HFBackend."""

    model: object
    tokenizer: object
    device: str
    dtype: torch.dtype
    attn: str
    source: str  # "gguf (dequantized)", "safetensors" or "pickle"


def pick_device(requested: str) -> str:
    """cuda, then mps, then cpu; an explicit --device that is missing is a clear error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise UserError(
            "--device cuda was asked for, but torch sees no CUDA GPU: install a CUDA build of torch, or use --device cpu."
        )
    if requested == "mps" and not mps:
        raise UserError("--device mps was asked for, but Metal (MPS) is not available here: use --device cpu.")
    return requested


def pick_dtype(device: str, requested: str) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on other GPUs, fp32 on the CPU, unless --dtype says otherwise."""
    if requested != "auto":
        return _DTYPES[requested]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def pick_attn(requested: str, device: str, dtype: torch.dtype) -> str | None:
    """flash_attention_2 where it can run, else None: transformers then picks sdpa, or eager without it."""
    fa2_ok = importlib.util.find_spec("flash_attn") is not None
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "flash_attention_2" and not (fa2_ok and device == "cuda" and half):
        why = "flash-attn is not installed" if not fa2_ok else "it needs a CUDA GPU and --dtype float16 or bfloat16"
        raise UserError(f"--attn flash_attention_2 cannot be used: {why}. Use --attn sdpa instead.")
    if requested != "auto":
        return requested
    return "flash_attention_2" if fa2_ok and device == "cuda" and half else None


def model_dir(model: ResolvedModel) -> Path:
    """The local directory of a hf_dir or an already-cached hub id (never a download)."""
    if model.kind == "hf_dir" and model.path is not None:
        return Path(model.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model.hub_id or model.name, local_files_only=True))
    except Exception:  # not in the cache: say so instead of huggingface_hub's long report
        raise UserError(
            f"{model.hub_id or model.name} is not in the local Hugging Face cache: run `localrun pull {model.hub_id or model.name}` first."
        ) from None


def check_weights(directory: Path, *, allow_pickle: bool) -> bool:
    """True for safetensors weights; pickles only with allow_pickle (they can run code when loaded)."""
    names = [p.name for p in directory.iterdir()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return True
    pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
    if not pickles:
        raise UserError(
            f"{directory} has no model weights (no .safetensors file): check the directory or pull it again."
        )
    if not allow_pickle:
        raise UserError(
            f"{directory.name} has only pickle weights ({pickles[0]}), which can run code when loaded: "
            "use a safetensors copy of the model, or pass --allow-pickle if you trust its source."
        )
    return False


def check_remote_code(directory: Path, *, trust_remote_code: bool) -> None:
    """Refuse a config whose architecture exists only as the repository's own Python code."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{directory} has no readable config.json ({exc}): it is not a Hugging Face model.") from None
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING or trust_remote_code:
        return
    if config.get("auto_map"):
        raise UserError(
            f"{directory.name} needs its own Python code to run (model type {model_type!r}): "
            "pass --trust-remote-code only if you trust its source."
        )
    raise UserError(
        f"This transformers version does not know the model type {model_type!r}: upgrade transformers, or use a GGUF."
    )


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes' CPU int8 matmul logs "inputs will be cast to float16" on every call, onto the
    stderr that carries our status lines (and, with 2>&1, through the answer itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_bitsandbytes() -> None:
    """Install the filter once on bitsandbytes' matmul logger."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastNotice())


def quant_config(quant: str, dtype: torch.dtype):
    """BitsAndBytesConfig for NF4 (double quant, compute in the chosen dtype) or INT8; None for none."""
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    quiet_bitsandbytes()
    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def saved_quant(directory: Path) -> str | None:
    """nf4 or int8 for a directory saved by bitsandbytes (its config carries the quantization), else None."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    quant = config.get("quantization_config") or {}
    if not isinstance(quant, dict) or quant.get("quant_method") != "bitsandbytes":
        return None
    return "nf4" if quant.get("load_in_4bit") else "int8" if quant.get("load_in_8bit") else None


def load_model(model: ResolvedModel, options: LoadOptions) -> Loaded:
    """Load weights and tokenizer from a GGUF (dequantized), a model directory, or a cached hub id."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries our own status and stats lines, which pipes rely on
    device = pick_device(options.device)
    dtype = pick_dtype(device, options.dtype)
    if options.quant != "none" and device == "mps":
        raise UserError("bitsandbytes NF4/INT8 does not run on Metal: use --quant none, or --device cpu.")
    attn = pick_attn(options.attn, device, dtype)
    if model.kind == "gguf":
        return _load_gguf(Path(model.path), options, device=device, dtype=dtype, attn=attn)
    directory = model_dir(model)
    check_remote_code(directory, trust_remote_code=options.trust_remote_code)
    safetensors = check_weights(directory, allow_pickle=options.allow_pickle)
    tokenizer = _tokenizer(directory, trust_remote_code=options.trust_remote_code)
    saved = saved_quant(directory)
    if saved is not None and options.quant not in ("none", saved):
        raise UserError(
            f"{directory.name} is already quantized with bitsandbytes {saved.upper()}: load it without --quant."
        )
    if saved is not None:
        quiet_bitsandbytes()
    hf_model = _from_pretrained(
        directory,
        options,
        device=device,
        # a saved NF4/INT8 model keeps the dtype it was saved with, as plain from_pretrained does
        dtype="auto" if saved is not None and options.dtype == "auto" else dtype,
        attn=attn,
        quantization=None if saved is not None else quant_config(options.quant, dtype),
        use_safetensors=safetensors,
    )
    source = ("safetensors" if safetensors else "pickle") + (f", saved {saved.upper()}" if saved else "")
    return Loaded(hf_model, tokenizer, device, hf_model.dtype, hf_model.config._attn_implementation, source)


def load_tokenizer(model: ResolvedModel, options: LoadOptions):
    """The tokenizer alone (no weights): what a draft's compatibility check reads."""
    if model.kind == "gguf":
        path = Path(model.path)
        if not path.is_file():
            raise UserError(f"{path} does not exist: check the path, or run `localrun models list`.")
        return _tokenizer(path.parent, trust_remote_code=False, gguf_file=path.name)
    directory = model_dir(model)
    check_remote_code(directory, trust_remote_code=options.trust_remote_code)
    return _tokenizer(directory, trust_remote_code=options.trust_remote_code)


def _tokenizer(directory: Path, *, trust_remote_code: bool, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            directory, gguf_file=gguf_file, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"{directory.name}'s tokenizer needs its own Python code: pass --trust-remote-code only if you trust its source."
            ) from None
        raise UserError(f"transformers could not load the tokenizer of {directory.name}: {exc}") from None


def _from_pretrained(
    source: Path, options: LoadOptions, *, device: str, dtype, attn: str | None, quantization, **extra
):
    """AutoModelForCausalLM.from_pretrained, offline, with load errors turned into one sentence."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        dtype=dtype,
        device_map={"": device},
        local_files_only=True,
        trust_remote_code=options.trust_remote_code,
        **extra,
    )
    # Only when there is one: an explicit quantization_config=None reaches AutoConfig as an override and
    # erases the config's own, so a saved NF4/INT8 model would load as plain (mis-sized or garbage) weights.
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        return AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn, **kwargs)
    except ValueError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in message:
            raise UserError(
                f"{source.name} needs its own Python code to run: pass --trust-remote-code only if you trust its source."
            ) from None
        if attn is not None and options.attn == "auto":  # flash-attn is installed but this model has no FA2 path
            return AutoModelForCausalLM.from_pretrained(source, attn_implementation=None, **kwargs)
        raise UserError(f"transformers could not load {source.name}: {message}") from None


def _load_gguf(path: Path, options: LoadOptions, *, device: str, dtype, attn: str | None) -> Loaded:
    """A GGUF through transformers' gguf_file= loader, dequantized; NF4/INT8 re-quantize via a temp copy."""
    from transformers import GgufConfig

    if not path.is_file():
        raise UserError(f"{path} does not exist: check the path, or run `localrun models list`.")
    tokenizer = _tokenizer(path.parent, trust_remote_code=False, gguf_file=path.name)
    target = "cpu" if options.quant != "none" else device
    # transformers' GGUF loader draws a bare tqdm bar that its logging switch does not reach; stderr
    # must stay clean for pipes (failures still arrive as exceptions).
    with contextlib.redirect_stderr(io.StringIO()):
        model = _from_pretrained(
            path.parent,
            options,
            device=target,
            dtype=dtype,
            attn=attn,
            quantization=GgufConfig(dequantize=True),
            gguf_file=path.name,
        )
    if options.quant != "none":
        model = _requantize(model, options, device=device, dtype=dtype, attn=attn)
    return Loaded(model, tokenizer, device, dtype, model.config._attn_implementation, "gguf (dequantized)")


def _requantize(model, options: LoadOptions, *, device: str, dtype, attn: str | None):
    """transformers cannot stack bitsandbytes on its GGUF loader: save the dequantized weights as
    safetensors in a temporary directory and load that with the bitsandbytes config."""
    # The dequantized model still carries the GGUF quantizer, which blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(prefix="localrun-gguf-") as tmp:
        model.save_pretrained(tmp)
        del model
        return _from_pretrained(
            Path(tmp), options, device=device, dtype=dtype, attn=attn, quantization=quant_config(options.quant, dtype)
        )
