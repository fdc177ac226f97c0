"""UI controls derived from the engine's settings models: label, widget, range and backend from each field's Meta."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from localrun.backends import backend_for
from localrun.errors import UserError
from localrun.records import fields
from localrun.settings import LoadOptions, SamplingParams, is_list, meta, recommendable, ui_fields, validated


def rows(model: type) -> tuple[tuple[str, ...], ...]:
    """The UI's fields of a settings model in rows: one row per Meta group, in declaration order."""
    groups: dict[str, list[str]] = {}
    for name in ui_fields(model):
        groups.setdefault(meta(model, name).group, []).append(name)
    return tuple(tuple(names) for names in groups.values())


def recommended_values(recommended: Any | None, model: type = SamplingParams) -> tuple[str, dict[str, Any]]:
    """The system prompt and the sampling values a model starts with: its catalog recommendation
    where it has one, the SamplingParams defaults elsewhere (so switching models resets them)."""
    wanted = recommended.sampling() if recommended is not None else {}
    values = {name: wanted.get(name, fields(model)[name].default) for name in recommendable(model)}
    return (recommended.system or "") if recommended is not None else "", values


def visible_fields(backend: str, model_kind: str | None, model: type = LoadOptions) -> dict[str, bool]:
    """Which load controls to show: backend-specific ones only for the backend the load will use
    (all of them while the model is unknown)."""
    if backend == "remote":  # the engine elsewhere loads its own model: only its address and key apply
        return {name: name == "backend" or meta(model, name).backend == "remote" for name in ui_fields(model)}
    chosen = None if model_kind is None else backend_for(model_kind, backend)
    return {name: chosen is None or meta(model, name).backend in (None, chosen) for name in ui_fields(model)}


def is_remote(options: LoadOptions) -> bool:
    """Whether a load drives an engine elsewhere (as localrun.backends.resolve_for decides)."""
    return options.backend == "remote" or bool(options.url)


def form_load_options(values: dict[str, Any], model_kind: str | None) -> LoadOptions:
    """LoadOptions from the form as the load uses them: the remote engine's address and key count only while
    they are shown (a hidden URL left from an earlier remote load would turn a local load into a remote one)."""
    options = load_options(values)
    if not visible_fields(options.backend, model_kind)["url"] and (options.url or options.remote_api_key_file):
        options = options.replace(url=None, remote_api_key_file=None)
    return options


def make_control(model: type, name: str, *, value: Any = None) -> Any:
    """One Gradio control for a settings field, from its Meta and description, with elem_id set-NAME.

    value replaces the field's default as the initial value (a model's recommended setting)."""
    import gradio as gr

    field, about = fields(model)[name], meta(model, name)
    default = field.default if value is None else value
    # The whole help text: its "llama.cpp:" / "transformers:" prefix says which backend an option is for.
    common: dict[str, Any] = {"label": about.label, "info": field.check.help, "elem_id": f"set-{name}"}
    annotation = field.kind
    if model is LoadOptions and name == "draft":  # a picker of local models, like the chat's own
        from ui.store import draft_choices

        return gr.Dropdown(choices=draft_choices(), value=default or "", allow_custom_value=True, **common)
    if about.choices or get_origin(annotation) is Literal:
        options = list(about.choices or [(c, c) for c in get_args(annotation)])
        return gr.Dropdown(choices=options, value=default, **common)
    if annotation is bool and not field.optional:
        return gr.Checkbox(value=default, **common)
    if about.slider is not None:
        lo, hi, step = about.slider
        return gr.Slider(lo, hi, value=default, step=step, **common)
    if is_list(model, name):
        return gr.Textbox(value="", lines=2, **common)
    if field.default is None:
        # A blank gr.Number reads as 0 in the browser, and 0 means something (no GPU layers): use text.
        return gr.Textbox(value="" if default is None else str(default), placeholder="auto", **common)
    return gr.Number(value=default, precision=0, minimum=field.check.ge, **common)


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
        if name not in fields(model):
            continue
        if value is None or (isinstance(value, str) and not value.strip() and not is_list(model, name)):
            continue
        if is_list(model, name):
            value = tuple(s for s in str(value).splitlines() if s)
        elif fields(model)[name].kind is int:
            value = parse_int(meta(model, name).label, value)
        out[name] = value
    return out


def load_options(values: dict[str, Any], model: type = LoadOptions) -> Any:
    """LoadOptions from the form; raises UserError with one sentence on a bad value. Left empty, the slots
    (parallel) are chosen from memory (0): the UI's chats and `ui --api` clients share them."""
    clean = _clean(model, values)
    if model is LoadOptions and clean.get("parallel") is None:
        clean["parallel"] = 0
    return validated(model, clean)


def sampling_params(values: dict[str, Any], model: type = SamplingParams) -> Any:
    """SamplingParams from the form; raises UserError with one sentence on a bad value."""
    return validated(model, _clean(model, values))
