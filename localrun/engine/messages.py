"""Typed requests to the model worker and its typed replies: frozen dataclasses that travel through the pipe.

There are two request kinds, a load and a generation, each one dataclass here and one handler in
`localrun.engine.worker_child.HANDLERS`. `stoppable` says whether Stop applies to it (a load cannot be interrupted
half-way; a generation can).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from localrun.backends.base import LoadReport
from localrun.engine.events import GenerationEvent
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
class GenerateRequest:
    """One generation, from every edge (the REPL, the UI, the API, bench): each translates its own format once.

    Exactly one of `messages` (a chat, rendered by the model's template; tool calls and results may be in it)
    and `prompt` (text as it is, no template). `system` opens a chat that has no system message of its own.
    `max_tokens` None is the rest of the context (the OpenAI API's meaning). `trim_history` drops the oldest
    turns (the system prompt kept) so the reply has room, as a chat UI does; without it an overlong prompt is
    refused. `empty_hint` and `overflow_advice` end the sentences of those refusals with what this edge's user
    can do. `load` is loaded first when another model (or none) is loaded."""

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    max_tokens: int | None = None
    trim_history: bool = False
    empty_hint: str = "there is nothing to answer"
    overflow_advice: str = "shorten it, or load the model with a larger --n-ctx"
    load: LoadRequest | None = None
    stoppable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerateRequest takes messages or a prompt, one of the two")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(self.messages))
        object.__setattr__(self, "system", self.system or None)

    @classmethod
    def chat(
        cls, messages: Sequence[dict[str, Any]], params: SamplingParams, *, system: str | None = None, **more: Any
    ) -> GenerateRequest:
        """A chat UI's turn: role and content only, the oldest turns dropped if the context runs short, and
        params.max_tokens as the reply's limit."""
        return cls(
            messages=clean_messages(messages),
            params=params,
            system=system,
            max_tokens=params.max_tokens,
            trim_history=True,
            **more,
        )


Request = LoadRequest | GenerateRequest


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
class EngineStatus:
    """The batching engine's figures (Scheduler.status: slots busy, waiting, the last step's batch, decode steps
    and sequences so far), sent with request id 0 whenever they change, at most once a heartbeat period."""

    figures: dict[str, int]


@dataclass(frozen=True, slots=True)
class Done:
    """The last reply to every request."""


# What a caller of WorkerClient.submit() sees; Heartbeat, Unloaded and Done stay inside the client.
Update = Progress | Loaded | Failed | GenerationEvent
Reply = Update | Unloaded | Heartbeat | EngineStatus | Done
