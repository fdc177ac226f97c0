"""Typed requests to the model worker and its typed replies: frozen dataclasses that travel through the pipe.

A request kind is one dataclass here and one handler in `localrun.worker_child.HANDLERS`. `stoppable` says
whether Stop applies to it (a load cannot be interrupted half-way; a chat or a job can).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from localrun.backends.base import LoadReport
from localrun.events import GenerationEvent
from localrun.settings import LoadOptions, SamplingParams

Message = dict[str, str]


def clean_messages(messages: Sequence[dict[str, Any]]) -> tuple[Message, ...]:
    """Role and content only (a UI's history may carry more, e.g. a stats line)."""
    return tuple({"role": str(m["role"]), "content": str(m["content"])} for m in messages)


# ---- requests ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """Load a model (unloading the current one), unless this same model and options are loaded already."""

    model: str | None = None  # what resolve_model takes: a path, a catalog name; None is the default model
    options: LoadOptions = field(default_factory=LoadOptions)
    stoppable: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """Answer the last user message of a conversation; `load` is loaded first when another model (or none) is."""

    messages: tuple[Message, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    load: LoadRequest | None = None
    stoppable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", clean_messages(self.messages))
        object.__setattr__(self, "system", self.system or None)


@dataclass(frozen=True, slots=True)
class ApiChatRequest:
    """An OpenAI-style chat (`localrun serve`): messages may carry tool calls and tool results, tools are
    OpenAI function schemas. max_tokens None means the rest of the context, as the OpenAI API does."""

    messages: tuple[dict[str, Any], ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    tools: tuple[dict[str, Any], ...] = ()
    load: LoadRequest | None = None
    stoppable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A plain completion (`localrun serve`'s /v1/completions): the prompt text as it is, no chat template."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    load: LoadRequest | None = None
    stoppable: ClassVar[bool] = True


Request = LoadRequest | ChatRequest | ApiChatRequest | CompletionRequest


# ---- replies ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """A line about what the worker is doing (starting, loading, waiting for earlier requests)."""

    text: str


@dataclass(frozen=True, slots=True)
class Loaded:
    """A model is loaded: the request that loaded it, its display name and the backend's report."""

    request: LoadRequest
    name: str
    report: LoadReport


@dataclass(frozen=True, slots=True)
class Unloaded:
    """The previous model was closed (its memory is free)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """A request ended in an error: kind is "user" (fixable), "crash" (the worker died or was killed) or
    "internal" (a bug)."""

    message: str
    kind: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent while a long step (loading, prefill, a job) runs, so the watchdog knows the worker is alive."""


@dataclass(frozen=True, slots=True)
class Done:
    """The last reply to every request."""


# What a caller of WorkerClient.submit() sees; Heartbeat, Unloaded and Done stay inside the client.
Update = Progress | Loaded | Failed | GenerationEvent
Reply = Update | Unloaded | Heartbeat | Done
