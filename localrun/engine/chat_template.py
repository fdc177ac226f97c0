"""Chat templates from model metadata, rendered in a sandboxed Jinja environment."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

from localrun.errors import UserError

# Used when a model ships no template: plain labels that any instruct model copes with.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _raise(message: str) -> None:
    raise UserError(f"The model's chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: Sequence[dict[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: Sequence[dict] | None = None,
    variables: dict | None = None,
) -> str:
    """Render messages to prompt text with the model's template (or a plain fallback).

    tools (OpenAI function schemas) are passed only when given: templates test `tools is defined`.
    variables: more the template reads (enable_thinking, reasoning_effort)."""
    from jinja2 import TemplateError

    extra = {**(variables or {}), **({"tools": list(tools)} if tools else {})}
    try:
        return _compile(template or FALLBACK_TEMPLATE).render(
            messages=list(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except TemplateError as exc:
        raise UserError(f"The model's chat template could not be rendered: {exc}.") from None
