"""UI controls built from the engine's settings models: labels and help come from their Field descriptions."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from localrun.errors import UserError
from localrun.settings import LoadOptions, SamplingParams, validated

# Fields of LoadOptions the UI shows (allow_pickle and trust_remote_code stay off: they run foreign code).
LOAD_FIELDS = (
    "backend",
    "device",
    "n_ctx",
    "n_threads",
    "n_gpu_layers",
    "flash_attn",
    "kv_type",
    "dtype",
    "attn",
    "static_cache",
    "compile",
    "quant",
)
# Sampling fields a catalog model may recommend a value for.
RECOMMENDABLE = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "max_tokens",
    "seed",
    "stop",
    "ignore_eos",
)

LABELS = {
    "backend": "Backend",
    "device": "Device",
    "n_ctx": "Context size",
    "n_threads": "CPU threads",
    "n_gpu_layers": "GPU layers",
    "flash_attn": "Flash attention",
    "kv_type": "KV-cache type",
    "dtype": "Weight dtype",
    "attn": "Attention implementation",
    "static_cache": "Static KV cache",
    "compile": "torch.compile",
    "quant": "Quantize on load (NF4 / INT8)",
    "temperature": "Temperature",
    "top_p": "Top-p",
    "top_k": "Top-k",
    "min_p": "Min-p",
    "repeat_penalty": "Repeat penalty",
    "max_tokens": "Max new tokens",
    "seed": "Seed",
    "stop": "Stop strings (one per line)",
    "ignore_eos": "Ignore end-of-sequence",
}
CHOICE_LABELS = {
    "backend": [("auto", "auto"), ("llama.cpp", "llamacpp"), ("transformers", "hf")],
    "device": [("auto", "auto"), ("CUDA", "cuda"), ("Metal", "mps"), ("CPU", "cpu")],
    "quant": [("none", "none"), ("NF4 (4-bit)", "nf4"), ("INT8", "int8")],
}
# Slider ranges for the sampling floats (the models allow more; these are the useful ranges).
SLIDERS = {
    "temperature": (0.0, 2.0, 0.05),
    "top_p": (0.05, 1.0, 0.01),
    "min_p": (0.0, 1.0, 0.01),
    "repeat_penalty": (0.8, 2.0, 0.01),
}


def recommended_values(recommended: Any | None) -> tuple[str, dict[str, Any]]:
    """The system prompt and the sampling values a model starts with: its catalog recommendation
    where it has one, the SamplingParams defaults elsewhere (so switching models resets them)."""
    wanted = recommended.sampling() if recommended is not None else {}
    values = {name: wanted.get(name, SamplingParams.model_fields[name].default) for name in RECOMMENDABLE}
    return (recommended.system or "") if recommended is not None else "", values


def applies_to(name: str) -> str | None:
    """ "llamacpp" or "hf" for a backend-specific LoadOptions field (from its description), else None."""
    description = LoadOptions.model_fields[name].description or ""
    if description.startswith("llama.cpp:"):
        return "llamacpp"
    if description.startswith("transformers:"):
        return "hf"
    return None


def effective_backend(backend: str, model_kind: str | None) -> str | None:
    """The backend a load will use: the chosen one, or the one auto picks for the model kind (None: unknown)."""
    if backend != "auto":
        return backend
    if model_kind is None:
        return None
    return "llamacpp" if model_kind == "gguf" else "hf"


def visible_fields(backend: str, model_kind: str | None) -> dict[str, bool]:
    """Which load controls to show: backend-specific ones only for their backend."""
    chosen = effective_backend(backend, model_kind)
    return {name: chosen is None or applies_to(name) in (None, chosen) for name in LOAD_FIELDS}


def _info(model: Any, name: str) -> str:
    # Kept whole: the "llama.cpp:" / "transformers:" prefix says which backend an option is for.
    return model.model_fields[name].description or ""


def make_control(model: type, name: str, *, value: Any = None) -> Any:
    """One Gradio control for a settings field, labelled from its description, with elem_id set-NAME.

    value replaces the field's default as the initial value (a model's recommended setting)."""
    import gradio as gr

    field = model.model_fields[name]
    default = field.default if value is None else value
    common: dict[str, Any] = {"label": LABELS.get(name, name), "info": _info(model, name), "elem_id": f"set-{name}"}
    annotation = field.annotation
    if name in CHOICE_LABELS or get_origin(annotation) is Literal:
        options = CHOICE_LABELS.get(name) or [(c, c) for c in get_args(annotation)]
        return gr.Dropdown(choices=options, value=default, **common)
    if annotation is bool:
        return gr.Checkbox(value=default, **common)
    if name in SLIDERS:
        lo, hi, step = SLIDERS[name]
        return gr.Slider(lo, hi, value=default, step=step, **common)
    if name == "stop":
        return gr.Textbox(value="", lines=2, **common)
    if field.default is None:
        # A blank gr.Number reads as 0 in the browser, and 0 means something (no GPU layers): use text.
        return gr.Textbox(value="" if default is None else str(default), placeholder="auto", **common)
    minimum = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
    return gr.Number(value=default, precision=0, minimum=minimum, **common)


def parse_int(label: str, value: Any) -> int | None:
    """A whole number from a form field; blank is None; anything else is a UserError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a whole number or blank, not {value!r}.") from None
    if not number.is_integer():
        raise UserError(f"{label} must be a whole number, not {value!r}.")
    return int(number)


def _clean(model: type, values: dict[str, Any]) -> dict[str, Any]:
    """Form values to settings values: blank numbers are unset, whole floats become ints."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in model.model_fields:
            continue
        if value is None or (isinstance(value, str) and not value.strip() and name != "stop"):
            continue
        if name == "stop":
            value = tuple(s for s in str(value).splitlines() if s)
        elif model.model_fields[name].annotation in (int, int | None):
            value = parse_int(LABELS.get(name, name), value)
        out[name] = value
    return out


def load_options(values: dict[str, Any]) -> LoadOptions:
    """LoadOptions from the form; raises UserError with one sentence on a bad value."""
    return validated(LoadOptions, _clean(LoadOptions, values))


def sampling_params(values: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the form; raises UserError with one sentence on a bad value."""
    return validated(SamplingParams, _clean(SamplingParams, values))
