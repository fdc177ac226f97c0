"""The Backend protocol: small on purpose. Timing lives in generate.py, never here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from localrun.engine.events import TokenStep
from localrun.settings import SamplingParams

if TYPE_CHECKING:  # numpy stays out of `localrun --help`
    from collections.abc import Callable

    import numpy as np

    from localrun.engine.speculative import Draft, Drafter, VocabSummary
    from localrun.settings import LoadOptions


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model the backends can load (what localrun.models.catalog.resolve_model returns): kind is "gguf", "hf_dir",
    "hub_id" or "remote" (a model another engine serves at url); recommended is the catalog's Recommended settings for it, if any."""

    name: str
    path: Path | None
    kind: str
    hub_id: str | None = None
    recommended: Any = None
    url: str | None = None  # kind "remote": the engine's OpenAI API address
    api_key_file: str | None = None  # kind "remote": a saved endpoint's key file (--remote-api-key-file wins)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What load() did, shown by `localrun chat`, `/stats` and the UI."""

    backend: str
    device: str
    model_path: str
    n_ctx: int
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    attn: str | None = None
    dtype: str | None = None
    kv_cache: str | None = None
    load_s: float = 0.0
    warmup_s: float = 0.0
    weights_bytes: int | None = None
    details: dict[str, str] = field(default_factory=dict)
    chat_template: bool = True  # False: the model ships none, and chat uses the plain User:/Assistant: fallback
    parallel: int = 1  # sequences decoded together (slots); n_ctx is each one's context
    parallel_why: str = ""
    context_reason: str = ""  # how n_ctx was chosen (engine.plan.choose_context), e.g. "context 4096 (--n-ctx)"

    def describe(self) -> str:
        """One line, e.g. 'llamacpp on cpu · ctx 8192 · 2 threads · loaded in 0.21 s'."""
        parts = [f"{self.backend} on {self.device}", f"ctx {self.n_ctx}"]
        if self.parallel > 1:
            parts.append(f"{self.parallel} slots")
        if self.n_threads:
            parts.append(f"{self.n_threads} threads")
        if self.n_gpu_layers:
            parts.append(f"{self.n_gpu_layers} GPU layers")
        for label, value in (("attn", self.attn), ("dtype", self.dtype), ("kv", self.kv_cache)):
            if value:
                parts.append(f"{label} {value}")
        parts.extend(f"{k} {v}" for k, v in self.details.items())
        parts.append(f"loaded in {self.load_s:.2f} s")
        if self.warmup_s:
            parts.append(f"warm-up {self.warmup_s:.2f} s")
        if not self.chat_template:
            parts.append("no chat template")
        return " · ".join(parts)


@runtime_checkable
class Backend(Protocol):
    """A loaded model that turns prompt ids into a stream of token ids.

    Capabilities are class flags. generate_tokens() may `return "length"` when the context is
    full; a plain end (end-of-generation token) means finish reason "stop". Closing the
    generator early (cancellation) must leave the model ready for the next request. A backend
    with supports_draft verifies a drafter's proposals (speculative.Drafter: propose() and the
    observe_* feedback) and marks accepted tokens from_draft.
    """

    name: str
    supports_draft: bool
    report: LoadReport

    def tokenize(self, text: str, *, special: bool = True) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def render_chat(
        self, messages: Sequence[dict[str, str]], *, tools: Sequence[dict] | None = None, variables: dict | None = None
    ) -> str:
        """The prompt text for a chat, from the model's own chat template (tools: OpenAI function schemas;
        variables: more the template reads, such as enable_thinking)."""
        ...

    def generate_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter | None = None
    ) -> Iterator[TokenStep]: ...

    def close(self) -> None: ...


@runtime_checkable
class DraftingBackend(Backend, Protocol):
    """A backend with supports_draft: it verifies a drafter's proposals (as a target) and drafts for a target
    of its own kind (as a draft model). Both loops are speculative.verify_steps and draft_tokens, driven
    through the backend's step-level sequence (speculative.TargetSequence)."""

    drafter: Drafter | None  # what the load options asked for (--draft, --lookup), used when a request names none

    def load_draft(self, model: ResolvedModel, options: LoadOptions) -> DraftingBackend:
        """A draft model for this target, refused with one sentence unless it shares the target's vocabulary."""
        ...

    def vocab_summary(self) -> VocabSummary:
        """What a draft must share with its target (speculative.check_compatible)."""
        ...

    def dry_breakers(self, params: SamplingParams) -> frozenset[int]:
        """DRY's sequence-breaker token ids (the numpy distributions of sampled verification need them)."""
        ...

    def propose_tokens(
        self,
        ids: Sequence[int],
        n: int,
        params: SamplingParams,
        rng: np.random.Generator,
        *,
        go_on: Callable[[float], bool] | None = None,
    ) -> Draft:
        """As a draft model: up to n tokens after ids (go_on: the early-stop rule of greedy drafting)."""
        ...
