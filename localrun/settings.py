"""Settings in one place: these pydantic models feed both the CLI flags and the UI controls."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localrun.errors import UserError

BackendName = Literal["auto", "llamacpp", "hf"]
DeviceName = Literal["auto", "cuda", "mps", "cpu"]
KvType = Literal["f16", "q8_0", "q4_0"]
# The context a model loads with when none is asked for: its trained length, capped here (memory grows with it).
DEFAULT_CTX_CAP = 8192


@dataclass(frozen=True, slots=True)
class Meta:
    """How a setting presents itself; the CLI flags, the REPL's /set, the UI controls and the catalog's
    checks are all derived from it, so adding a setting means writing one field.

    backend: "llamacpp" or "hf" for an option only that backend reads (the UI hides it for the other).
    group: settings of one group share a row in the UI. slider: (min, max, step) of a slider.
    choices: (label, value) pairs for a dropdown. recommend: a catalog manifest may recommend a value.
    ui: False keeps it out of the web UI (options that run foreign code)."""

    label: str
    group: str = ""
    backend: str | None = None
    slider: tuple[float, float, float] | None = None
    choices: tuple[tuple[str, str], ...] | None = None
    recommend: bool = False
    ui: bool = True


def meta(model: type[BaseModel], name: str) -> Meta:
    """A field's Meta (a plain one labelled with its name when the field has none)."""
    info = model.model_fields[name]
    return next((m for m in info.metadata if isinstance(m, Meta)), Meta(label=name))


def ui_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields the web UI shows, in declaration order."""
    return tuple(name for name in model.model_fields if meta(model, name).ui)


def recommendable(model: type[BaseModel] | None = None) -> tuple[str, ...]:
    """The sampling fields a catalog manifest may recommend a value for."""
    model = model or SamplingParams
    return tuple(name for name in model.model_fields if meta(model, name).recommend)


class SamplingParams(BaseModel):
    """How to pick tokens; shared by the CLI, the UI, the bench and both backends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Annotated[float, Meta("Temperature", "sampling", slider=(0.0, 2.0, 0.05), recommend=True)] = Field(
        0.7, ge=0.0, le=5.0, description="Sampling temperature; 0 is greedy."
    )
    top_p: Annotated[float, Meta("Top-p", "sampling", slider=(0.05, 1.0, 0.01), recommend=True)] = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens with this total probability.",
    )
    top_k: Annotated[int, Meta("Top-k", "sampling", recommend=True)] = Field(
        40, ge=0, description="Keep only the k most likely tokens (0 = off)."
    )
    min_p: Annotated[float, Meta("Min-p", "sampling", slider=(0.0, 1.0, 0.01), recommend=True)] = Field(
        0.05, ge=0.0, le=1.0, description="Drop tokens less likely than min_p times the top token."
    )
    repeat_penalty: Annotated[float, Meta("Repeat penalty", "sampling", slider=(0.8, 2.0, 0.01), recommend=True)] = (
        Field(1.0, gt=0.0, le=5.0, description="Penalty for repeating recent tokens (1 = off).")
    )
    max_tokens: Annotated[int, Meta("Max new tokens", "output")] = Field(
        512, ge=1, le=1 << 20, description="Most tokens to generate in one reply."
    )
    seed: Annotated[int | None, Meta("Seed", "output")] = Field(
        None, ge=0, le=2**31 - 1, description="Random seed; unset means a fresh one each request."
    )
    stop: Annotated[tuple[str, ...], Meta("Stop strings (one per line)", "output")] = Field(
        (), description="Stop strings: generation ends before any of them."
    )
    ignore_eos: Annotated[bool, Meta("Ignore end-of-sequence", "output")] = Field(
        False, description="Keep generating past the end-of-sequence token (for benchmarks)."
    )
    grammar: Annotated[str | None, Meta("Grammar (GBNF)", "output", backend="llamacpp", ui=False)] = Field(
        None, description="llama.cpp: a GBNF grammar the reply must follow (e.g. JSON from a schema)."
    )

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed, validated (raises UserError on a bad value)."""
        return validated(type(self), {**self.model_dump(), **changes})


_LLAMA, _HF = "llamacpp", "hf"


class LoadOptions(BaseModel):
    """How to load a model; fields that do not apply to a backend are ignored by it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Annotated[
        BackendName,
        Meta("Backend", "load", choices=(("auto", "auto"), ("llama.cpp", "llamacpp"), ("transformers", "hf"))),
    ] = Field("auto", description="Inference backend: llamacpp for GGUF, hf for transformers; auto picks by the model.")
    device: Annotated[
        DeviceName,
        Meta("Device", "load", choices=(("auto", "auto"), ("CUDA", "cuda"), ("Metal", "mps"), ("CPU", "cpu"))),
    ] = Field("auto", description="Where to run: cuda, mps (Metal), cpu; auto picks the best available.")
    n_ctx: Annotated[int | None, Meta("Context size", "load")] = Field(
        None,
        ge=16,
        le=1 << 24,
        description=f"Context length in tokens (default: the model's, capped at {DEFAULT_CTX_CAP}).",
    )
    n_threads: Annotated[int | None, Meta("CPU threads", "load")] = Field(
        None, ge=1, description="CPU threads (default: physical cores)."
    )
    n_gpu_layers: Annotated[int | None, Meta("GPU layers", _LLAMA, _LLAMA)] = Field(
        None, ge=-1, description="llama.cpp: layers on the GPU (-1 = all; default: all when they fit, else 0)."
    )
    flash_attn: Annotated[Literal["auto", "on", "off"], Meta("Flash attention", _LLAMA, _LLAMA)] = Field(
        "auto", description="llama.cpp: flash attention (auto: on wherever the device supports it, as in llama.cpp)."
    )
    kv_type: Annotated[KvType, Meta("KV-cache type", _LLAMA, _LLAMA)] = Field(
        "f16", description="llama.cpp: KV-cache type (q8_0/q4_0 need flash attention: not off)."
    )
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"], Meta("Weight dtype", _HF, _HF)] = Field(
        "auto", description="transformers: weight dtype (auto: bf16/fp16 on GPU, fp32 on CPU)."
    )
    attn: Annotated[
        Literal["auto", "flash_attention_2", "sdpa", "eager"], Meta("Attention implementation", _HF, _HF)
    ] = Field("auto", description="transformers: attention implementation.")
    static_cache: Annotated[bool, Meta("Static KV cache", _HF, _HF)] = Field(
        False, description="transformers: pre-allocated static KV cache."
    )
    compile: Annotated[bool, Meta("torch.compile", _HF, _HF)] = Field(
        False, description="transformers: torch.compile the decode step (needs the static cache)."
    )
    quant: Annotated[
        Literal["none", "nf4", "int8"],
        Meta(
            "Quantize on load (NF4 / INT8)",
            _HF,
            _HF,
            choices=(("none", "none"), ("NF4 (4-bit)", "nf4"), ("INT8", "int8")),
        ),
    ] = Field("none", description="transformers: load quantized with bitsandbytes.")
    allow_pickle: Annotated[bool, Meta("Allow pickle weights", _HF, _HF, ui=False)] = Field(
        False, description="transformers: allow .bin/.pt pickle weights (they can run code)."
    )
    trust_remote_code: Annotated[bool, Meta("Trust remote code", _HF, _HF, ui=False)] = Field(
        False, description="transformers: run the model repository's own Python code."
    )
    draft: Annotated[str | None, Meta("Draft model", "draft")] = Field(
        None,
        description="Speculative decoding: a smaller model sharing the target's vocabulary (.gguf, directory or catalog name).",
    )
    draft_max: Annotated[int, Meta("Most drafted tokens per round", "draft")] = Field(
        16, ge=1, le=64, description="Speculative decoding: most tokens drafted per round."
    )
    draft_mode: Annotated[Literal["adaptive", "fixed"], Meta("Draft length", "draft")] = Field(
        "adaptive",
        description="Speculative decoding: adaptive grows and shrinks the draft length and pauses drafting when it does not pay; fixed always drafts draft_max.",
    )
    lookup: Annotated[bool, Meta("Prompt lookup drafting", "draft")] = Field(
        False,
        description="Speculative decoding: draft by n-gram lookup in the prompt and the reply so far (no draft model).",
    )


def effective_n_ctx(requested: int | None, trained: int | None) -> int:
    """The context a model loads with: the one asked for, else its trained length capped at DEFAULT_CTX_CAP."""
    if requested:
        return requested
    return min(trained or DEFAULT_CTX_CAP, DEFAULT_CTX_CAP)


def validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """Build a settings model, turning pydantic's report into one clear sentence."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "value"
        raise UserError(f"Invalid {name}: {err['msg']}.") from None


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) for `X | None` or X."""
    args = get_args(annotation)
    if type(None) in args and get_origin(annotation) is not Literal:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def is_list(model: type[BaseModel], name: str) -> bool:
    """A field that holds several values (stop strings): a repeated flag, one per line in the UI."""
    return get_origin(_unwrap(model.model_fields[name].annotation)[0]) is tuple


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *, only: tuple[str, ...] | None = None) -> None:
    """Add one --flag per field of a settings model, with its description as help."""
    for name, info in model.model_fields.items():
        if only is not None and name not in only:
            continue
        flag, kind = "--" + name.replace("_", "-"), _unwrap(info.annotation)[0]
        common: dict[str, Any] = {"dest": name, "default": None, "help": info.description}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif is_list(model, name):
            parser.add_argument(flag, action="append", **common)
        elif get_origin(kind) is Literal:
            parser.add_argument(flag, choices=get_args(kind), **common)
        else:
            parser.add_argument(flag, type=kind if kind in (int, float) else str, **common)


def from_args(model: type[BaseModel], args: argparse.Namespace, **base: Any) -> Any:
    """Build a settings model from parsed flags (unset flags keep the model's defaults)."""
    values = dict(base)
    for name in model.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if is_list(model, name) else value
    return validated(model, values)


def set_value(settings: BaseModel, name: str, text: str) -> Any:
    """A copy of settings with one field set from what the user typed (the REPL's /set); pydantic parses and
    checks it. "none" unsets an optional field; a list field takes the text as its one value."""
    model = type(settings)
    if name not in model.model_fields:
        raise UserError(f"Usage: /set NAME VALUE, with NAME one of {', '.join(model.model_fields)}.")
    text = text.strip()
    value: Any = text
    if _unwrap(model.model_fields[name].annotation)[1] and text.lower() in ("none", "random", "auto", ""):
        value = None
    elif is_list(model, name):
        value = (text,) if text else ()
    return validated(model, {**settings.model_dump(), name: value})
