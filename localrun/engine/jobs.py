"""What the API's request kinds do where the model is (the worker process): prompt, checks, generation.

It lives with the engine, not in localrun.server: the model process never imports the HTTP server's package.

The server has already checked the request's shape; what needs the loaded model (the prompt's length
against the context, grammar support) is checked here, before the first token, as a UserError.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from localrun.errors import UserError
from localrun.events import GenerationEvent
from localrun.requests import ApiChatRequest, CompletionRequest
from localrun.settings import SamplingParams


def run_api(backend: Any, request: ApiChatRequest | CompletionRequest, cancel: Any) -> Iterator[GenerationEvent]:
    """Render (chat) or take (completion) the prompt and stream the reply; cancel has is_set()."""
    if isinstance(request, ApiChatRequest):
        from localrun.tools import render_tool_chat

        ids = backend.tokenize(render_tool_chat(backend, request.messages, request.tools))
    else:
        from localrun.generate import check_prompt_text

        check_prompt_text(request.prompt, hint="send some text to complete")
        ids = backend.tokenize(request.prompt)
    yield from _generate(backend, ids, request.params, request.max_tokens, cancel)


def _generate(
    backend: Any, ids: Sequence[int], params: SamplingParams, max_tokens: int | None, cancel: Any
) -> Iterator[GenerationEvent]:
    from localrun.generate import check_prompt_fits, stream_generate

    if params.grammar and not getattr(backend, "supports_grammar", False):
        raise UserError(
            f"response_format and forced tool calls need grammar-constrained sampling, which the {backend.name} backend does not have: use a GGUF model."
        )
    if getattr(backend, "server_side", False):  # a remote engine checks its context itself
        yield from stream_generate(
            backend, ids, params.replace(max_tokens=max_tokens or params.max_tokens), cancel=cancel
        )
        return
    n_ctx = backend.report.n_ctx
    check_prompt_fits(len(ids), n_ctx, advice="shorten it, or ask for a model loaded with a larger context")
    room = n_ctx - len(ids)
    if max_tokens is not None and max_tokens > room:
        raise UserError(
            f"The prompt is {len(ids)} tokens and max_tokens {max_tokens}, more than the model's context of {n_ctx} tokens: lower max_tokens to {room} or less."
        )
    params = params.replace(max_tokens=max_tokens or room)
    yield from stream_generate(backend, ids, params, cancel=cancel)
