"""Settings in one place: these records (localrun.records) feed the CLI flags, the REPL's /set, the UI
controls and the catalog's checks."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from localrun.errors import UserError
from localrun.records import Record, RecordError, as_dict, build, fields, setting

BackendName = Literal["auto", "llamacpp", "hf", "remote"]
DeviceName = Literal["auto", "cuda", "mps", "cpu"]
KvType = Literal["f16", "q8_0", "q4_0"]
# More threads than logical CPUs only slow llama.cpp down, and 100000 of them crash it.
MACHINE_THREADS = os.cpu_count() or 1
# The context when nothing better is known: no memory budget to choose within (`models fit` with no --n-ctx), or
# a transformers config without the numbers a KV cache is sized from. A load with no --n-ctx chooses from memory
# (localrun.engine.plan.choose_context).
DEFAULT_CTX_CAP = 8192


@dataclass(frozen=True, slots=True)
class Meta:
    """How a setting presents itself; the CLI flags, the REPL's /set, the UI controls and the catalog's
    checks are all derived from it, so adding a setting means writing one field.

    backend: "llamacpp" or "hf" for an option only that backend reads (the UI hides it for the other).
    group: settings of one group share a row in the UI. slider: (min, max, step) of a slider.
    choices: (label, value) pairs for a dropdown. recommend: a catalog manifest may recommend a value.
    ui: False keeps it out of the web UI (options that run foreign code). flag: False keeps it off the command
    line too (a value the engine sets, not the user)."""

    label: str
    group: str = ""
    backend: str | None = None
    slider: tuple[float, float, float] | None = None
    choices: tuple[tuple[str, str], ...] | None = None
    recommend: bool = False
    ui: bool = True
    flag: bool = True


def meta(model: type, name: str) -> Meta:
    """A field's Meta (a plain one labelled with its name when the field has none)."""
    return fields(model)[name].check.meta or Meta(label=name)


def ui_fields(model: type) -> tuple[str, ...]:
    """The fields the web UI shows, in declaration order."""
    return tuple(name for name in fields(model) if meta(model, name).ui)


def recommendable(model: type | None = None) -> tuple[str, ...]:
    """The sampling fields a catalog manifest may recommend a value for."""
    model = model or SamplingParams
    return tuple(name for name in fields(model) if meta(model, name).recommend)


class Settings(Record):
    """A settings record: a bad value is a UserError with one sentence."""

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed, checked (raises UserError on a bad value)."""
        return validated(type(self), {**as_dict(self), **changes})


class SamplingParams(Settings):
    """How to pick tokens; shared by the CLI, the UI, the bench and both backends."""

    temperature: float = setting(
        0.7,
        ge=0.0,
        le=5.0,
        help="Sampling temperature; 0 is greedy.",
        meta=Meta("Temperature", "sampling", slider=(0.0, 2.0, 0.05), recommend=True),
    )
    top_p: float = setting(
        0.95,
        gt=0.0,
        le=1.0,
        help="Nucleus sampling: keep the smallest set of tokens with this total probability.",
        meta=Meta("Top-p", "sampling", slider=(0.05, 1.0, 0.01), recommend=True),
    )
    top_k: int = setting(
        40, ge=0, help="Keep only the k most likely tokens (0 = off).", meta=Meta("Top-k", "sampling", recommend=True)
    )
    min_p: float = setting(
        0.05,
        ge=0.0,
        le=1.0,
        help="Drop tokens less likely than min_p times the top token.",
        meta=Meta("Min-p", "sampling", slider=(0.0, 1.0, 0.01), recommend=True),
    )
    repeat_penalty: float = setting(
        1.0,
        gt=0.0,
        le=5.0,
        help="Penalty for repeating recent tokens (1 = off).",
        meta=Meta("Repeat penalty", "sampling", slider=(0.8, 2.0, 0.01), recommend=True),
    )
    presence_penalty: float = setting(
        0.0,
        ge=-2.0,
        le=2.0,
        help="Subtract this from a token's logit once it appears in the last 64 tokens (OpenAI's presence_penalty; 0 = off).",
        meta=Meta("Presence penalty", "penalties", slider=(-2.0, 2.0, 0.05), recommend=True),
    )
    frequency_penalty: float = setting(
        0.0,
        ge=-2.0,
        le=2.0,
        help="Subtract this times a token's count in the last 64 tokens from its logit (OpenAI's frequency_penalty; 0 = off).",
        meta=Meta("Frequency penalty", "penalties", slider=(-2.0, 2.0, 0.05), recommend=True),
    )
    dry_multiplier: float = setting(
        0.0,
        ge=0.0,
        le=5.0,
        help="DRY (don't repeat yourself): penalty strength for a token that would extend a repeated span (0 = off; 0.8 is typical).",
        meta=Meta("DRY multiplier", "dry", slider=(0.0, 2.0, 0.05), recommend=True),
    )
    dry_base: float = setting(
        1.75,
        ge=1.0,
        le=4.0,
        help="DRY: the penalty grows by this factor for each token the repeat is longer than the allowed length.",
        meta=Meta("DRY base", "dry", slider=(1.0, 3.0, 0.05), recommend=True),
    )
    dry_allowed_length: int = setting(
        2,
        ge=1,
        le=64,
        help="DRY: repeated spans up to this many tokens go unpenalised.",
        meta=Meta("DRY allowed length", "dry", recommend=True),
    )
    dry_penalty_last_n: int = setting(
        1024,
        ge=1,
        le=1 << 16,
        help="DRY: how many recent tokens (prompt included) are searched for repeats.",
        meta=Meta("DRY window (tokens)", "dry", recommend=True),
    )
    loop_guard: bool = setting(
        True,
        help="Stop a reply that keeps repeating one span (finish reason 'repetition'; off with --ignore-eos).",
        meta=Meta("Stop a looping reply", "output"),
    )
    max_tokens: int = setting(
        512, ge=1, le=1 << 20, help="Most tokens to generate in one reply.", meta=Meta("Max new tokens", "output")
    )
    seed: int | None = setting(
        None,
        ge=0,
        le=2**31 - 1,
        help="Random seed; unset means a fresh one each request.",
        meta=Meta("Seed", "output"),
    )
    stop: tuple[str, ...] = setting(
        (),
        help="Stop strings: generation ends before any of them.",
        meta=Meta("Stop strings (one per line)", "output"),
    )
    ignore_eos: bool = setting(
        False,
        help="Keep generating past the end-of-sequence token (for benchmarks).",
        meta=Meta("Ignore end-of-sequence", "output"),
    )
    think: Literal["auto", "on", "off", "low", "medium", "high"] = setting(
        "auto",
        help="Thinking models (a <think> block or gpt-oss's analysis channel): off answers without thinking where the template can, "
        "low/medium/high set gpt-oss's reasoning effort, auto is the model's own default.",
        meta=Meta(
            "Thinking",
            "thinking",
            choices=(
                ("model default", "auto"),
                ("on", "on"),
                ("off", "off"),
                ("low effort", "low"),
                ("medium effort", "medium"),
                ("high effort", "high"),
            ),
        ),
    )
    think_budget: int | None = setting(
        None,
        ge=0,
        le=1 << 20,
        help="Thinking models: most tokens of thinking; then the block is closed with the model's own end marker and the answer follows (unset: no limit).",
        meta=Meta("Thinking budget (tokens)", "thinking"),
    )
    grammar: str | None = setting(
        None,
        help="llama.cpp: a GBNF grammar the reply must follow (e.g. JSON from a schema).",
        meta=Meta("Grammar (GBNF)", "output", backend="llamacpp", ui=False),
    )


_LLAMA, _HF = "llamacpp", "hf"


class LoadOptions(Settings):
    """How to load a model; fields that do not apply to a backend are ignored by it."""

    backend: BackendName = setting(
        "auto",
        help="Inference backend: llamacpp for GGUF, hf for transformers, remote for an engine elsewhere (--url); auto picks by the model.",
        meta=Meta(
            "Backend",
            "load",
            choices=(("auto", "auto"), ("llama.cpp", "llamacpp"), ("transformers", "hf"), ("remote engine", "remote")),
        ),
    )
    url: str | None = setting(
        None,
        help="remote: the OpenAI API address of the engine (vLLM, TGI, llama-server, Ollama, localrun), e.g. http://gpu-box:8000/v1; the model argument is then its model's name (default: the first it serves).",
        meta=Meta("Remote engine URL", "remote", "remote"),
    )
    remote_api_key_file: str | None = setting(
        None,
        help="remote: a file holding the engine's API key (it is never printed or logged).",
        meta=Meta("API key file", "remote", "remote"),
    )
    device: DeviceName = setting(
        "auto",
        help="Where to run: cuda, mps (Metal), cpu; auto picks the best available.",
        meta=Meta("Device", "load", choices=(("auto", "auto"), ("CUDA", "cuda"), ("Metal", "mps"), ("CPU", "cpu"))),
    )
    n_ctx: int | None = setting(
        None,
        ge=16,
        le=1 << 24,
        help="Context length in tokens (default: the largest up to the model's trained length that fits the memory budget).",
        meta=Meta("Context size", "load"),
    )
    n_threads: int | None = setting(
        None,
        ge=1,
        le=MACHINE_THREADS,
        help=f"CPU threads (default: physical cores; at most this machine's {MACHINE_THREADS} logical CPUs).",
        meta=Meta("CPU threads", "load"),
    )
    parallel: int | None = setting(
        None,
        ge=0,
        le=64,
        help="llama.cpp: requests decoded together (continuous batching), each with its own --n-ctx of KV cache; 0 = as many as fit in memory, up to 4 (the default of serve, ui and bench --clients; 1 elsewhere).",
        meta=Meta("Parallel requests (slots)", _LLAMA, _LLAMA),
    )
    prompt_cache_mb: int | None = setting(
        None,
        ge=0,
        le=1 << 20,
        help="llama.cpp with several slots: host RAM (MB) for the KV state of prompts pushed out of their slots, put back when a request continues them; 0 = off (default: as much as one slot's KV cache, at most 512 MB, within the memory budget).",
        meta=Meta("Prompt cache (MB)", _LLAMA, _LLAMA),
    )
    n_gpu_layers: int | None = setting(
        None,
        ge=-1,
        help="llama.cpp: layers on the GPU (-1 = all; default: all when they fit, else 0).",
        meta=Meta("GPU layers", _LLAMA, _LLAMA),
    )
    flash_attn: Literal["auto", "on", "off"] = setting(
        "auto",
        help="llama.cpp: flash attention (auto: on wherever the device supports it, as in llama.cpp).",
        meta=Meta("Flash attention", _LLAMA, _LLAMA),
    )
    kv_type: KvType = setting(
        "f16",
        help="llama.cpp: KV-cache type (q8_0/q4_0 need flash attention: not off).",
        meta=Meta("KV-cache type", _LLAMA, _LLAMA),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = setting(
        "auto",
        help="transformers: weight dtype (auto: bf16/fp16 on GPU, fp32 on CPU).",
        meta=Meta("Weight dtype", _HF, _HF),
    )
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = setting(
        "auto", help="transformers: attention implementation.", meta=Meta("Attention implementation", _HF, _HF)
    )
    static_cache: bool = setting(
        False, help="transformers: pre-allocated static KV cache.", meta=Meta("Static KV cache", _HF, _HF)
    )
    compile: bool = setting(
        False,
        help="transformers: torch.compile the decode step (needs the static cache).",
        meta=Meta("torch.compile", _HF, _HF),
    )
    quant: Literal["none", "nf4", "int8"] = setting(
        "none",
        help="transformers: load quantized with bitsandbytes.",
        meta=Meta(
            "Quantize on load (NF4 / INT8)",
            _HF,
            _HF,
            choices=(("none", "none"), ("NF4 (4-bit)", "nf4"), ("INT8", "int8")),
        ),
    )
    allow_pickle: bool = setting(
        False,
        help="transformers: allow .bin/.pt pickle weights (they can run code).",
        meta=Meta("Allow pickle weights", _HF, _HF, ui=False),
    )
    trust_remote_code: bool = setting(
        False,
        help="transformers: run the model repository's own Python code.",
        meta=Meta("Trust remote code", _HF, _HF, ui=False),
    )
    draft: str | None = setting(
        None,
        help="Speculative decoding: a smaller model sharing the target's vocabulary (.gguf, directory or catalog name).",
        meta=Meta("Draft model", "draft"),
    )
    draft_max: int = setting(
        16,
        ge=1,
        le=64,
        help="Speculative decoding: most tokens drafted per round.",
        meta=Meta("Most drafted tokens per round", "draft"),
    )
    draft_mode: Literal["adaptive", "fixed"] = setting(
        "adaptive",
        help="Speculative decoding: adaptive grows and shrinks the draft length and pauses drafting when it does not pay; fixed always drafts draft_max.",
        meta=Meta("Draft length", "draft"),
    )
    lookup: bool = setting(
        False,
        help="Speculative decoding: draft by n-gram lookup in the prompt and the reply so far (no draft model).",
        meta=Meta("Prompt lookup drafting", "draft"),
    )
    memory_budget_bytes: int | None = setting(
        None,
        ge=1,
        help="The memory the context is chosen within when --n-ctx is not given (set by the model pool from --memory-budget; default: 0.8 of the free RAM and VRAM).",
        meta=Meta("Memory budget", "load", ui=False, flag=False),
    )


def effective_n_ctx(requested: int | None, trained: int | None) -> int:
    """The context without a memory budget to choose within: the one asked for, else the trained length capped at
    DEFAULT_CTX_CAP. A load chooses from memory instead (localrun.engine.plan.choose_context)."""
    if requested:
        return requested
    return min(trained or DEFAULT_CTX_CAP, DEFAULT_CTX_CAP)


def validated(model: type, values: dict[str, Any]) -> Any:
    """Build a settings record, turning a bad value into one clear sentence."""
    try:
        return build(model, values)
    except RecordError as exc:
        raise UserError(f"Invalid {exc.loc}: {exc.msg}.") from None


def is_list(model: type, name: str) -> bool:
    """A field that holds several values (stop strings): a repeated flag, one per line in the UI."""
    return fields(model)[name].is_list


def add_flags(parser: Any, model: type, *, only: tuple[str, ...] | None = None, show_default: bool = False) -> None:
    """Add one --flag per field of a settings model, with its help text (and its default, if show_default)."""
    for name, spec in fields(model).items():
        if only is not None and name not in only or not meta(model, name).flag:
            continue
        flag, kind = "--" + name.replace("_", "-"), spec.kind
        help_text = f"{spec.check.help.rstrip('.')} (default {spec.default})." if show_default else spec.check.help
        common: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif spec.is_list:
            parser.add_argument(flag, action="append", **common)
        elif get_origin(kind) is Literal:
            parser.add_argument(flag, choices=get_args(kind), **common)
        else:
            parser.add_argument(flag, type=kind if kind in (int, float) else str, **common)


def from_args(model: type, args: argparse.Namespace, **base: Any) -> Any:
    """Build a settings model from parsed flags (unset flags keep the model's defaults)."""
    values = dict(base)
    for name in fields(model):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if is_list(model, name) else value
    return validated(model, values)


def set_value(settings: Record, name: str, text: str) -> Any:
    """A copy of settings with one field set from what the user typed (the REPL's /set), parsed and
    checked. "none" unsets an optional field; a list field takes the text as its one value."""
    specs = fields(type(settings))
    if name not in specs:
        raise UserError(f"Usage: /set NAME VALUE, with NAME one of {', '.join(specs)}.")
    text = text.strip()
    value: Any = text
    if specs[name].optional and text.lower() in ("none", "random", "auto", ""):
        value = None
    elif is_list(type(settings), name):
        value = (text,) if text else ()
    return validated(type(settings), {**as_dict(settings), name: value})
