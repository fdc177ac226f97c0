"""Hugging Face models through transformers + torch: SDPA / FlashAttention-2, static KV cache,
torch.compile, bitsandbytes NF4 / INT8, on CUDA, Metal (mps) or the CPU.

model.generate() runs in a worker thread and hands each new token id to a queue; generate_tokens()
reads the queue, so tokens stream into stream_generate() exactly as llama.cpp's do.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from localrun.backends.base import LoadReport, ResolvedModel
from localrun.backends.hf_load import DTYPE_NAMES, load_model, load_tokenizer
from localrun.backends.hf_spec import HFSequence, KVState, needs_own_processors, sampling_processors, tokenizer_vocab
from localrun.engine.events import TokenStep
from localrun.engine.penalties import breaker_ids, uses_dry
from localrun.engine.speculative import (
    Draft,
    Drafter,
    VocabSummary,
    draft_tokens,
    request_seed,
    verify_rng,
    verify_steps,
)
from localrun.errors import UserError
from localrun.settings import LoadOptions, SamplingParams

if TYPE_CHECKING:
    from localrun.engine.plan import ContextChoice

_POLL_S = 0.1  # how often a waiting reader checks that the generate thread is still alive
_JOIN_S = 30.0  # a cancelled generate() stops within one forward pass; this is only a safety net
_DONE = object()


class _QueueStreamer:
    """A transformers streamer that puts each new token id on a queue (the prompt is skipped)."""

    def __init__(self, out: queue.Queue) -> None:
        self._out = out
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self._out.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Cancelled:
    """A StoppingCriteria: stops generate() itself after the current step once the event is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _GenerateRun:
    """One model.generate() call on a worker thread; its tokens, errors and end come through a queue."""

    def __init__(self, model, kwargs: dict, *, seed: int | None, release: Callable[[], None]) -> None:
        self._model, self._kwargs, self._seed, self._release = model, kwargs, seed, release
        self._queue: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name="localrun-hf-generate", daemon=True)

    def _run(self) -> None:
        from transformers import StoppingCriteriaList

        try:
            if self._seed is not None:
                torch.manual_seed(self._seed)
            with torch.inference_mode():
                self._model.generate(
                    **self._kwargs,
                    streamer=_QueueStreamer(self._queue),
                    stopping_criteria=StoppingCriteriaList([_Cancelled(self.cancel)]),
                )
        except BaseException as exc:  # handed to the reader, which re-raises it in the caller's thread
            self._queue.put(exc)
        finally:
            self._release()  # the thread owns the model lock: free only once generate() has returned
            self._queue.put(_DONE)

    def tokens(self) -> Iterator[int]:
        """Token ids as generate() makes them; re-raises its exception; never waits on a dead thread."""
        self.thread.start()
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the generate thread ended without a result") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def stop(self) -> None:
        """Make generate() stop at its next step and wait for it, so the model is free again."""
        self.cancel.set()
        if self.thread.is_alive():
            self.thread.join(timeout=_JOIN_S)


def _context(resolved: ResolvedModel, model: torch.nn.Module, options: LoadOptions) -> ContextChoice:
    """The context the pool's plan chose too (engine.plan.hf_context): weights counted as the plan counts them
    when the model is a directory on disk, else from the loaded model's footprint."""
    from localrun.engine.plan import hf_context, hf_weights_bytes

    if resolved.path is not None and Path(resolved.path).is_dir():
        weights = hf_weights_bytes(resolved.path, options)
    else:
        weights = int(model.get_memory_footprint()) + 450 * 2**20
    return hf_context(model.config, options, weights_bytes=weights)


class HFBackend:
    """A loaded transformers model. Each plain request evaluates its whole prompt (no cross-request
    prefix cache); the static KV cache, when asked for, is allocated once and reset per request.
    With a drafter (--draft, --lookup) requests run hf_spec's loop, whose cache keeps the last text."""

    name = "hf"
    supports_draft = True

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        options = options or LoadOptions()
        drafting = bool(options.draft or options.lookup)
        if drafting and (options.compile or options.static_cache):
            raise UserError(
                "Speculative decoding on the transformers backend runs its own loop on a dynamic KV cache: drop --compile and --static-cache, or the draft."
            )
        self.options = options
        self.drafter: Drafter | None = None
        self._breakers: frozenset[int] | None = None
        self._busy = threading.Lock()
        t0 = time.perf_counter()
        loaded = load_model(model, options)
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self.model.eval()
        self.context = _context(model, self.model, options)
        self.n_ctx = self.context.n_ctx
        self._eos_ids = self._find_eos_ids()
        self._static_cache = self._make_static_cache() if self._wants_static else None
        load_s = time.perf_counter() - t0
        warmup_s = self._warm_up()
        self.report = LoadReport(
            backend=self.name,
            device=self.device,
            model_path=str(model.path or model.hub_id or model.name),
            n_ctx=self.n_ctx,
            n_threads=torch.get_num_threads() if self.device == "cpu" else None,
            attn=loaded.attn,
            dtype=DTYPE_NAMES.get(loaded.dtype, str(loaded.dtype)),
            kv_cache="static" if self._static_cache is not None else "dynamic",
            load_s=load_s,
            warmup_s=warmup_s,
            weights_bytes=int(self.model.get_memory_footprint()),
            details=self._details(loaded.source),
            chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            context_reason=self.context.reason,
        )
        self._spec_state = KVState(self.model)  # the speculative loop's cache, kept across requests
        if drafting:
            self._load_drafter(options)

    def _load_drafter(self, options: LoadOptions) -> None:
        from dataclasses import replace

        from localrun.engine.drafting import load_drafter

        try:
            self.drafter = load_drafter(self, options)
        except BaseException:
            self.close()
            raise
        name = Path(self.drafter.backend.report.model_path).name if options.draft else "prompt lookup"
        self.report = replace(self.report, details={**self.report.details, "draft": name})

    @property
    def _wants_static(self) -> bool:
        return self.options.static_cache or self.options.compile  # compiling needs fixed cache shapes

    def _details(self, source: str) -> dict[str, str]:
        details = {"weights": source}
        if self.options.quant != "none":
            details["quant"] = self.options.quant
        if self.options.compile:
            details["compile"] = self._compile_mode()
        return details

    def _find_eos_ids(self) -> frozenset[int]:
        """Every end-of-generation id: the generation config's (often several) and the tokenizer's."""
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def _make_static_cache(self):
        """One cache of n_ctx positions, allocated now and reused: fixed addresses keep compiled graphs valid."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=self.n_ctx)
        shape = self.model._get_static_cache_init_shape()
        if shape is not None:
            cache.early_initialization(
                batch_size=1, num_heads=shape[0], head_dim=shape[1], dtype=self.model.dtype, device=self.model.device
            )
        return cache

    def _compile_mode(self) -> str:
        # CUDA graphs remove the per-step launch overhead; elsewhere plain inductor fusion is what there is
        return "reduce-overhead" if self.device == "cuda" else "default"

    def _warm_up(self) -> float:
        """One short generate() at load so one-off costs (torch.compile, CUDA graphs, lazy inits) are
        not charged to the first request's TTFT. Returns its seconds."""
        t0 = time.perf_counter()
        ids = self.tokenize("Hello")[:8] or [0]
        runs = 3 if self.options.compile else 1  # CUDA-graph trees record on the first calls, replay after
        params = SamplingParams(temperature=0.0, ignore_eos=True)
        with torch.inference_mode():
            for _ in range(runs):
                self.model.generate(**self.generate_kwargs(ids, params, max_new_tokens=4))
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def generate_kwargs(self, prompt_ids: Sequence[int], params: SamplingParams, *, max_new_tokens: int) -> dict:
        """model.generate() arguments for a request: the same ones the bench's bare baseline uses."""
        from transformers import CompileConfig

        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens, config.min_new_tokens = max_new_tokens, None
        config.max_length = None
        config.do_sample = params.temperature > 0
        if config.do_sample:
            config.temperature = params.temperature
            config.top_k = params.top_k  # 0 is off in transformers too; unset would mean its default of 50
            config.top_p = params.top_p
            config.min_p = params.min_p or None
        else:  # unset, so transformers does not warn about sampling flags on a greedy run
            config.temperature = config.top_k = config.top_p = config.min_p = None
        config.repetition_penalty = params.repeat_penalty
        if params.ignore_eos:
            config.eos_token_id = []  # an empty list, since None would fall back to the model's EOS
        if config.pad_token_id is None:
            config.pad_token_id = next(iter(self._eos_ids), 0)
        config.disable_compile = not self.options.compile
        if self.options.compile:
            config.compile_config = CompileConfig(mode=self._compile_mode(), fullgraph=False, dynamic=False)
            config.compile_config._compile_all_devices = True  # transformers compiles on CUDA only by default
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.model.device)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "generation_config": config}
        if needs_own_processors(params):  # ours must run before the warpers: pass the whole list, in order
            from transformers import LogitsProcessorList

            config.temperature = config.top_k = config.top_p = config.min_p = config.repetition_penalty = None
            kwargs["logits_processor"] = LogitsProcessorList(sampling_processors(params, self.dry_breakers(params)))
        if self._static_cache is not None:
            config.cache_implementation = None  # the cache is passed in: transformers refuses both
            self._static_cache.reset()
            kwargs["cache"] = self._static_cache  # transformers 5 renamed past_key_values
        return kwargs

    # -- the Backend protocol -------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids; one BOS at most, even when the chat template already wrote one."""
        ids = self.tokenizer(text, add_special_tokens=True, split_special_tokens=not special)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return list(ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def detokenize_special(self, ids: Sequence[int]) -> str:
        """Text with special tokens written out (gpt-oss's channel markers are special tokens)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def chat_template_source(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def render_chat(
        self, messages: Sequence[dict[str, str]], *, tools: Sequence[dict] | None = None, variables: dict | None = None
    ) -> str:
        """The prompt text from the tokenizer's own chat template (a plain fallback when it has none)."""
        if not getattr(self.tokenizer, "chat_template", None):
            from localrun.engine.chat_template import render_chat

            return render_chat(None, messages, tools=tools)
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools) if tools else None,
                tokenize=False,
                add_generation_prompt=True,
                **(variables or {}),
            )
        except TemplateError as exc:  # e.g. "System role not supported": the user can change the messages
            raise UserError(f"The model's chat template refused the conversation: {exc}.") from None

    def generate_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter | None = None
    ) -> Iterator[TokenStep]:
        """Stream token ids from model.generate(); closing the iterator stops generate() and joins it.
        With a drafter, speculative rounds in our own loop instead (hf_spec.py)."""
        if drafter is not None:
            return (yield from self._speculative(prompt_ids, params, drafter))
        budget = self.n_ctx - len(prompt_ids)  # stream_generate checked that the prompt leaves room
        if not self._busy.acquire(timeout=_JOIN_S):
            raise RuntimeError("the model is still busy with another request")
        run = None
        try:
            max_new = min(params.max_tokens, budget)
            run = _GenerateRun(
                self.model,
                self.generate_kwargs(prompt_ids, params, max_new_tokens=max_new),
                seed=params.seed,
                release=self._busy.release,
            )
            for i, token in enumerate(run.tokens()):
                if not params.ignore_eos and token in self._eos_ids:
                    return None
                yield TokenStep(token, prefill_tokens=len(prompt_ids) if i == 0 else None)
                if i + 1 >= max_new:
                    return "length"
        finally:
            if run is not None:
                run.stop()
            if run is None or run.thread.ident is None:  # no thread took the lock over
                self._busy.release()

    def _speculative(self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter) -> Iterator[TokenStep]:
        if not self._busy.acquire(timeout=_JOIN_S):
            raise RuntimeError("the model is still busy with another request")
        try:
            rng = verify_rng(request_seed(params))
            seq = self._sequence(params, rng)
            prefill = seq.prefill(prompt_ids)
            return (yield from verify_steps(seq, prompt_ids, params, drafter, rng, prefill=prefill))
        finally:
            self._busy.release()

    def close(self) -> None:
        """Drop the model; on a GPU also hand the cached blocks back to the driver."""
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        self._spec_state = None
        self._static_cache = None
        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    # -- drafting: this backend as a target, and as a draft model ------------------------------

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    @property
    def n_vocab(self) -> int:
        """The width of the model's logits rows."""
        return int(self.model.config.get_text_config().vocab_size)

    def vocab_summary(self) -> VocabSummary:
        return tokenizer_vocab(self.tokenizer)

    def load_draft(self, model: ResolvedModel, options: LoadOptions) -> HFBackend:
        """Load a draft for this target: its tokenizer is checked first (no weights yet), then it loads
        with the target's device, dtype and context."""
        from localrun.engine.speculative import check_compatible

        name = Path(model.path).name if model.path is not None else model.hub_id or model.name
        check_compatible(self.vocab_summary(), tokenizer_vocab(load_tokenizer(model, options)), name)
        return HFBackend(model, options.replace(draft=None, lookup=False, n_ctx=self.n_ctx))

    def propose_tokens(
        self, ids: Sequence[int], n: int, params: SamplingParams, rng, *, go_on: Callable[[float], bool] | None = None
    ) -> Draft:
        """As a draft model: up to n tokens after ids (speculative.draft_tokens), from this model's own cache."""
        return draft_tokens(self._sequence(params, rng), ids, n, params, rng, go_on)

    def _sequence(self, params: SamplingParams, rng) -> HFSequence:
        """The speculative cache as a step-level sequence for one request's settings."""
        return HFSequence(
            self._spec_state,
            params,
            rng,
            n_ctx=self.n_ctx,
            n_vocab=self.n_vocab,
            eos=self._eos_ids,
            breakers=self.dry_breakers(params),
        )

    def dry_breakers(self, params: SamplingParams) -> frozenset[int]:
        """DRY's sequence-breaker token ids (decoded from the vocabulary once, only when DRY is on)."""
        if not uses_dry(params):
            return frozenset()
        if self._breakers is None:
            n = len(self.tokenizer)
            texts = self.tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
            self._breakers = breaker_ids(enumerate(texts))
        return self._breakers
