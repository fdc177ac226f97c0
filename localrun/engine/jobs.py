"""A GenerateRequest run on a loaded backend: the one place that builds the prompt and applies its rules.

The REPL runs it in its own process, the worker runs it for the UI, the API and bench; the edges only translate
their formats into a GenerateRequest. It lives with the engine: the model process never imports localrun.server.

What needs the loaded model (the prompt's length against the context, grammar support) is checked here, before
the first token, as a UserError.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from localrun.engine.events import GenerationEvent
from localrun.engine.generate import check_prompt_fits, check_prompt_text, stream_generate
from localrun.engine.messages import GenerateRequest
from localrun.engine.reasoning import ReasoningPlan
from localrun.errors import UserError

# The fallback template writes "User: ..." turns: a model without its own template would go on to write
# the user's next turn too, so replies under it end where one begins.
FALLBACK_STOP = "\nUser:"


def has_chat_template(backend: Any) -> bool:
    """False for a model that ships no chat template (base models): a chat then uses the plain fallback."""
    report = getattr(backend, "report", None)
    return bool(getattr(report, "chat_template", True))


def run(backend: Any, request: GenerateRequest, cancel: Any = None) -> Iterator[GenerationEvent]:
    """Build the prompt, check it against the model and stream the reply; cancel has is_set()."""
    params = request.params
    if params.grammar and not getattr(backend, "supports_grammar", False):
        raise UserError(
            f"response_format and forced tool calls need grammar-constrained sampling, which the {backend.name} backend does not have: use a GGUF model."
        )
    if request.messages is not None and not has_chat_template(backend) and FALLBACK_STOP not in params.stop:
        params = params.replace(stop=(*params.stop, FALLBACK_STOP))
    prompt = build_prompt(backend, request)
    if getattr(backend, "server_side", False):  # a remote engine checks its context and ends its block itself
        yield from stream_generate(
            backend,
            prompt.ids,
            params.replace(max_tokens=request.max_tokens or params.max_tokens),
            cancel=cancel,
            reasoning=prompt.reasoning,
        )
        return
    ids, plan = prompt.ids, prompt.reasoning
    if plan is not None and plan.grammar_after is not None:
        params = params.replace(grammar=None)  # the grammar applies once the thinking block ends
    n_ctx = backend.report.n_ctx
    room = n_ctx - len(ids)
    if request.max_tokens is not None and request.max_tokens > room and not request.trim_history:
        raise UserError(
            f"The prompt is {len(ids)} tokens and max_tokens {request.max_tokens}, more than the model's context of {n_ctx} tokens: lower max_tokens to {room} or less."
        )
    events = stream_generate(
        backend, ids, params.replace(max_tokens=request.max_tokens or room), cancel=cancel, reasoning=plan
    )
    for event in events:
        if event.summary is not None and prompt.dropped:
            event = replace(event, summary=replace(event.summary, dropped_messages=prompt.dropped))
        yield event


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prompt as the model takes it: its ids, how its reply's thinking is split (None: the model
    does not think in a block), and how many of the oldest messages were dropped to make room."""

    ids: list[int]
    reasoning: ReasoningPlan | None = None
    dropped: int = 0


def build_prompt(backend: Any, request: GenerateRequest) -> Prompt:
    """The text as it is, or the chat rendered (tools included), its oldest turns dropped when trim_history
    asks for room for the reply; for a thinking model, the template is told whether to think, and the plan
    says where its block is."""
    from localrun.engine import reasoning

    params = request.params
    server_side = getattr(backend, "server_side", False)
    # a remote engine renders the chat and bounds the thinking itself; its block comes apart in its own tags
    fmt = None if server_side else reasoning.detect(reasoning.template_source(backend))

    def plan(text: str) -> ReasoningPlan | None:
        if server_side:
            remote = getattr(backend, "reasoning_format", None)
            return ReasoningPlan(remote, False) if remote is not None else None
        return _plan(fmt, text, params)

    if request.prompt is not None:
        check_prompt_text(request.prompt, hint=request.empty_hint)
        text = _thinking_suffix(fmt, request.prompt, params)
        ids = backend.tokenize(text)
        check_prompt_fits(len(ids), backend.report.n_ctx, advice=request.overflow_advice)
        return Prompt(ids, plan(text))
    if not request.messages:
        raise UserError("There is no message to answer: send one first.")
    n_ctx = backend.report.n_ctx
    history = list(request.messages)
    want = request.max_tokens if request.max_tokens is not None else params.max_tokens
    room = n_ctx - min(want, n_ctx // 2)
    variables = reasoning.template_vars(fmt, params.think)
    while True:
        text = _thinking_suffix(fmt, _render(backend, request, history, variables), params)
        ids = backend.tokenize(text)
        if not request.trim_history or not n_ctx or len(ids) <= room or len(history) <= 1:
            break
        history = history[2:] if len(history) > 2 else history[1:]
    check_prompt_fits(len(ids), n_ctx, advice=request.overflow_advice)
    return Prompt(ids, plan(text), len(request.messages) - len(history))


def _thinking_suffix(fmt: Any, text: str, params: Any) -> str:
    """The prompt with the block closed for "off" where the template has no switch of its own (an empty block,
    as Qwen3's own template writes), or opened where a grammar waits for the thinking to end."""
    from localrun.engine.reasoning import opens_block

    if fmt is None:
        return text
    if params.think == "off" and not fmt.toggle and fmt.empty_block:
        return text + (fmt.close + "\n\n" if opens_block(fmt, text) else fmt.empty_block)
    if params.grammar and params.think != "off" and not opens_block(fmt, text) and not _closed_at_end(fmt, text):
        return text + fmt.opening()
    return text


def _closed_at_end(fmt: Any, text: str) -> bool:
    """The template ended the prompt with an empty block (thinking off by its own switch)."""
    return text.rstrip().endswith(fmt.close)


def _plan(fmt: Any, text: str, params: Any) -> ReasoningPlan | None:
    from localrun.engine.reasoning import opens_block

    if fmt is None:
        return None
    starts_open = opens_block(fmt, text)
    grammar_after = params.grammar if params.grammar and starts_open else None
    return ReasoningPlan(fmt, starts_open, params.think_budget, grammar_after)


def _render(backend: Any, request: GenerateRequest, history: list[dict[str, Any]], variables: dict[str, Any]) -> str:
    from localrun.engine.tools import render_tool_chat

    if request.system and not (history and history[0]["role"] in ("system", "developer")):
        history = [{"role": "system", "content": request.system}, *history]
    return render_tool_chat(backend, history, request.tools, variables)
