"""Settings in one place: these pydantic models feed both the CLI flags and the UI controls."""

from __future__ import annotations

import argparse
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localrun.errors import UserError

BackendName = Literal["auto", "llamacpp", "hf"]
DeviceName = Literal["auto", "cuda", "mps", "cpu"]
KvType = Literal["f16", "q8_0", "q4_0"]


class SamplingParams(BaseModel):
    """How to pick tokens; shared by the CLI, the UI, the bench and both backends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0.0, le=5.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens with this total probability.",
    )
    top_k: int = Field(40, ge=0, description="Keep only the k most likely tokens (0 = off).")
    min_p: float = Field(0.05, ge=0.0, le=1.0, description="Drop tokens less likely than min_p times the top token.")
    repeat_penalty: float = Field(1.0, gt=0.0, le=5.0, description="Penalty for repeating recent tokens (1 = off).")
    max_tokens: int = Field(512, ge=1, description="Most tokens to generate in one reply.")
    seed: int | None = Field(None, description="Random seed; unset means a fresh one each request.")
    stop: tuple[str, ...] = Field((), description="Stop strings: generation ends before any of them.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token (for benchmarks).")
    grammar: str | None = Field(None, description="GBNF grammar that constrains sampling (llama.cpp backend).")

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed, validated (raises UserError on a bad value)."""
        return validated(SamplingParams, {**self.model_dump(), **changes})


class LoadOptions(BaseModel):
    """How to load a model; fields that do not apply to a backend are ignored by it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: BackendName = Field(
        "auto", description="Inference backend: llamacpp for GGUF, hf for transformers; auto picks by the model."
    )
    device: DeviceName = Field(
        "auto", description="Where to run: cuda, mps (Metal), cpu; auto picks the best available."
    )
    n_ctx: int | None = Field(
        None, ge=16, description="Context length in tokens (default: the model's, capped at 8192)."
    )
    n_threads: int | None = Field(None, ge=1, description="CPU threads (default: physical cores).")
    n_gpu_layers: int | None = Field(
        None, ge=-1, description="llama.cpp: layers on the GPU (-1 = all; default: all when they fit, else 0)."
    )
    flash_attn: bool = Field(False, description="llama.cpp: use flash attention.")
    kv_type: KvType = Field("f16", description="llama.cpp: KV-cache type (q8_0/q4_0 need flash attention).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="transformers: weight dtype (auto: bf16/fp16 on GPU, fp32 on CPU)."
    )
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="transformers: attention implementation."
    )
    static_cache: bool = Field(False, description="transformers: pre-allocated static KV cache.")
    compile: bool = Field(False, description="transformers: torch.compile the decode step (needs the static cache).")
    quant: Literal["none", "nf4", "int8"] = Field("none", description="transformers: load quantized with bitsandbytes.")
    allow_pickle: bool = Field(False, description="transformers: allow .bin/.pt pickle weights (they can run code).")
    trust_remote_code: bool = Field(False, description="transformers: run the model repository's own Python code.")


def validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """Build a settings model, turning pydantic's report into one clear sentence."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "value"
        raise UserError(f"Invalid {name}: {err['msg']}.") from None


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *, only: tuple[str, ...] | None = None) -> None:
    """Add one --flag per field of a settings model, with its description as help."""
    for name, info in model.model_fields.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        ann = info.annotation
        if ann is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=info.description
            )
        elif name == "stop":
            parser.add_argument(flag, dest=name, action="append", default=None, help=info.description)
        else:
            choices = getattr(ann, "__args__", None) if getattr(ann, "__origin__", None) is Literal else None
            kind = {int: int, float: float}.get(ann, None)
            if kind is None and ann in (int | None, float | None):
                kind = int if ann == (int | None) else float
            parser.add_argument(flag, dest=name, type=kind or str, choices=choices, default=None, help=info.description)


def from_args(model: type[BaseModel], args: argparse.Namespace, **base: Any) -> Any:
    """Build a settings model from parsed flags (unset flags keep the model's defaults)."""
    values = dict(base)
    for name in model.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if name == "stop" else value
    return validated(model, values)
