"""GGUF models through llama.cpp, driven by our own decode loop on its C API (llama_ctx.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from localrun.backends.base import LoadReport, ResolvedModel
from localrun.backends.llama_ctx import LlamaRunner, LlamaSequence, SamplerChain, open_model
from localrun.engine.chat_template import render_chat
from localrun.engine.events import TokenStep
from localrun.engine.generate import check_prompt_fits
from localrun.engine.penalties import breaker_ids, uses_dry
from localrun.engine.speculative import (
    Draft,
    Drafter,
    VocabSummary,
    draft_tokens,
    request_seed,
    sample_ids,
    verify_rng,
    verify_steps,
)
from localrun.errors import UserError
from localrun.hardware import llama_cpp_build, physical_cores
from localrun.settings import LoadOptions, SamplingParams

if TYPE_CHECKING:  # numpy loads with the first speculative request: a plain chat does not need it
    import numpy as np

# Why a big context once cost ~20 % of decode speed: without flash attention llama.cpp stores V
# transposed (one row of n_ctx values per channel), so at n_ctx 8192 a decode step reads the used
# part of 576 rows per layer lying 16 KiB apart: a page per row (TLB misses) and 4 KiB-aliased cache
# sets. Flash attention (auto, the default, on on CPUs) keeps V row-major; bench/ctx_cap.py measures.
_KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_* values


class LlamaCppBackend:
    """A loaded GGUF. The KV cache keeps the previous request's tokens, so a chat's next turn
    evaluates only what is new (the longest common prefix is kept)."""

    name = "llamacpp"
    supports_draft = True
    supports_grammar = True

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        from localrun.models.gguf_info import inspect_gguf

        options = options or LoadOptions()
        path = model.path
        self.info = inspect_gguf(path)  # catches corrupt files before llama.cpp can crash on them
        self.options = options
        self._model = None
        self._runner: LlamaRunner | None = None
        self._slots = None  # with several slots: a LlamaSlots context driven by self.scheduler instead
        self.scheduler = None
        self._breakers: frozenset[int] | None = None
        self.drafter: Drafter | None = None
        self.report = self._load(Path(path), options)
        if options.draft or options.lookup:
            from localrun.engine.drafting import load_drafter

            try:
                self.drafter = load_drafter(self, options)
            except BaseException:
                self.close()
                raise
            if options.draft:
                self.report = _with_detail(self.report, "draft", Path(self.drafter.backend.report.model_path).name)
            else:
                self.report = _with_detail(self.report, "draft", "prompt lookup")

    def _load(self, path: Path, options: LoadOptions) -> LoadReport:
        if (
            options.device == "mps"
            and not llama_cpp_build()["metal"]
            or options.device == "cuda"
            and not llama_cpp_build()["cuda"]
        ):
            raise UserError(
                f"This llama-cpp-python build has no {options.device} support: reinstall it with that backend, or use --device cpu."
            )
        from localrun.engine.plan import draft_info, gguf_bytes, gguf_context

        # the pool's plan made this same choice (engine.plan.choose_context), at the budget it passed in options
        draft = draft_info(options)
        choice = gguf_context(self.info, options, draft=draft)
        n_ctx = choice.n_ctx
        n_threads = options.n_threads or physical_cores()
        n_gpu_layers = gpu_layers(path, options, n_ctx)
        kv = _KV_TYPES[options.kv_type]
        if options.kv_type != "f16" and options.flash_attn == "off":
            raise UserError(
                f"A {options.kv_type} KV cache needs flash attention: use --flash-attn auto or on, or --kv-type f16."
            )
        n_slots, why = choice.slots, choice.slots_why
        t0 = time.perf_counter()
        try:
            self._model = open_model(str(path), n_gpu_layers=n_gpu_layers)
            if n_slots > 1:
                from localrun.backends.llama_slots import LlamaSlots
                from localrun.engine.prompt_cache import PromptCache
                from localrun.engine.scheduler import Scheduler

                cache = PromptCache(gguf_bytes(self.info, choice, options, draft=draft)[1])
                slots = LlamaSlots(
                    self._model,
                    n_slots=n_slots,
                    n_ctx_slot=n_ctx,
                    n_threads=n_threads,
                    flash_attn=options.flash_attn,
                    kv_type=kv,
                )
                self._slots, self.scheduler = slots, Scheduler(slots, cache=cache)
            else:
                self._runner = LlamaRunner(
                    self._model, n_ctx=n_ctx, n_threads=n_threads, flash_attn=options.flash_attn, kv_type=kv
                )
        except ValueError as exc:
            raise UserError(f"llama.cpp could not load {path.name}: {exc}.") from None
        load_s = time.perf_counter() - t0
        device = "cpu" if n_gpu_layers == 0 else ("metal" if llama_cpp_build()["metal"] else "cuda")
        details = {"quant": self.info.file_type} if getattr(self.info, "file_type", None) else {}
        details["flash-attn"] = options.flash_attn
        return LoadReport(
            backend=self.name,
            device=device,
            model_path=str(path),
            n_ctx=self._slots.n_ctx_slot if self.scheduler is not None else self._runner.n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            kv_cache=options.kv_type,
            load_s=load_s,
            weights_bytes=self.info.file_bytes,
            details=details,
            chat_template=bool(self.info.chat_template),
            parallel=n_slots,
            parallel_why=why,
            context_reason=choice.reason,
        )

    # -- the Backend protocol -------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        bos = self._token_text(self._model.token_bos())
        wants_bos = self.info.add_bos_token
        if wants_bos is None:  # older GGUFs leave it out: llama.cpp's default for the vocab type decides
            wants_bos = self._model.add_bos_token()
        add_bos = bool(wants_bos) and not (bos and text.startswith(bos))
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.detokenize(list(ids)).decode("utf-8", errors="replace")

    def detokenize_special(self, ids: Sequence[int]) -> str:
        """Text with control tokens written out (gpt-oss's channel markers are control tokens)."""
        return self._model.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    @property
    def chat_template_source(self) -> str | None:
        return self.info.chat_template

    def render_chat(
        self, messages: Sequence[dict[str, str]], *, tools: Sequence[dict] | None = None, variables: dict | None = None
    ) -> str:
        return render_chat(
            self.info.chat_template,
            messages,
            bos_token=self._token_text(self._model.token_bos()),
            eos_token=self._token_text(self._model.token_eos()),
            tools=tools,
            variables=variables,
        )

    def generate_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter | None = None
    ) -> Iterator[TokenStep]:
        """Our decode loop on the C API: prefill what the KV cache lacks, then per token one decode
        and one draw from llama.cpp's sampler chain. With a drafter, speculative rounds instead."""
        check_prompt_fits(len(prompt_ids), self.report.n_ctx)
        seed = request_seed(params)
        if self.scheduler is not None:  # continuous batching: the scheduler's thread decodes, we hand out
            chain = SamplerChain(self._slots, params, seed=seed, history=prompt_ids)
            spec = None
            if drafter is not None and self._can_draft(params):
                from localrun.engine.scheduler import Speculation

                spec = Speculation(drafter, params, verify_rng(seed), self.dry_breakers(params))
            return (
                yield from self.scheduler.stream(
                    prompt_ids, chain, max_new=params.max_tokens, ignore_eos=params.ignore_eos, draft=spec
                )
            )
        runner = self._runner
        chain = SamplerChain(runner, params, seed=seed, history=prompt_ids)
        seq = LlamaSequence(runner, params, chain=chain, breakers=self.dry_breakers(params))
        try:
            prefill = seq.prefill(prompt_ids)
            if drafter is not None and self._can_draft(params):
                rng = verify_rng(seed)
                return (yield from verify_steps(seq, prompt_ids, params, drafter, rng, prefill=prefill))
            budget = runner.n_ctx - len(prompt_ids)
            token = chain.sample(-1)
            n = 0
            while True:
                if not params.ignore_eos and runner.is_eog(token):
                    return None
                yield TokenStep(token, prefill_tokens=prefill if n == 0 else None)
                n += 1
                if n >= budget:
                    return "length"
                runner.step(token)
                token = chain.sample(-1)
        finally:
            chain.close()

    def _can_draft(self, params: SamplingParams) -> bool:
        # a grammar lives in the C chain, which the sampled (temperature > 0) verify does not use
        return params.temperature <= 0 or not params.grammar

    def dry_breakers(self, params: SamplingParams) -> frozenset[int]:
        """DRY's sequence-breaker token ids (read from the vocabulary once, only when DRY is on)."""
        if not uses_dry(params):
            return frozenset()
        if self._breakers is None:
            model = self._model
            n = llama_cpp_n_vocab(model)
            pieces = ((i, model.token_to_piece(i, special=True).decode("utf-8", "replace")) for i in range(n))
            self._breakers = breaker_ids(pieces)
        return self._breakers

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._model.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        if self._slots is not None:
            self._slots.close()
            self._slots = None
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # -- drafting: this backend as a target, and as a draft model ------------------------------

    def load_draft(self, model, options: LoadOptions) -> LlamaCppBackend:
        """Load a draft GGUF for this target: its vocabulary is checked first (vocab only, fast),
        then it loads with the target's context, threads and flash-attention settings, as one sequence (it
        drafts for the target's single sequence; slots would only take memory)."""
        if model.kind != "gguf":
            raise UserError(f"The draft model {model.name} is not a GGUF: a llama.cpp target needs a GGUF draft.")
        check_draft_vocab(self, model.path)
        draft_options = options.replace(draft=None, lookup=False, n_ctx=self.report.n_ctx, kv_type="f16", parallel=None)
        return LlamaCppBackend(model, draft_options)

    def vocab_summary(self) -> VocabSummary:
        return vocab_summary_of(self._model)

    def propose_tokens(
        self,
        ids: Sequence[int],
        n: int,
        params: SamplingParams,
        rng: np.random.Generator,
        *,
        go_on: Callable[[float], bool] | None = None,
    ) -> Draft:
        """As a draft model: up to n tokens after ids (speculative.draft_tokens on this model's sequence)."""
        seq = LlamaSequence(self._runner, params, breakers=self.dry_breakers(params))
        return draft_tokens(seq, ids, n, params, rng, go_on)


def gpu_layers(path: Path, options: LoadOptions, n_ctx: int) -> int:
    """The layers to offload: all when the build has a GPU and the model fits, else what fits, 0 on CPU (the
    backend's rule, and the quality scorer's)."""
    if options.device == "cpu" or not llama_cpp_build()["gpu_offload"]:
        return 0
    if options.n_gpu_layers is not None:
        return options.n_gpu_layers
    from localrun.hardware import probe
    from localrun.models import fit

    return fit.choose_gpu_layers(path, n_ctx=n_ctx, kv_type=options.kv_type, devices=probe())


def _with_detail(report: LoadReport, key: str, value: str) -> LoadReport:
    from dataclasses import replace

    return replace(report, details={**report.details, key: value})


def llama_cpp_n_vocab(model) -> int:
    import llama_cpp

    return llama_cpp.llama_vocab_n_tokens(model.vocab)


def vocab_summary_of(model) -> VocabSummary:
    """The vocabulary facts a draft must share: size, special tokens, a sample of token texts."""
    import llama_cpp

    vocab = model.vocab
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    specials = {
        "beginning-of-sequence": llama_cpp.llama_vocab_bos(vocab),
        "end-of-sequence": llama_cpp.llama_vocab_eos(vocab),
        "end-of-turn": llama_cpp.llama_vocab_eot(vocab),
    }
    texts = {i: model.token_to_piece(i, special=True).rstrip(b"\0").decode("utf-8", "replace") for i in sample_ids(n)}
    return VocabSummary(n, specials, texts)


def check_draft_vocab(target: LlamaCppBackend, draft_path: str | Path) -> None:
    """Compare the draft's vocabulary with the target's, loading only the draft's vocabulary."""
    from localrun.engine.speculative import check_compatible
    from localrun.models.gguf_info import inspect_gguf

    inspect_gguf(draft_path)  # a corrupt draft is refused with the validator's sentence
    try:
        model = open_model(str(draft_path), vocab_only=True)
    except ValueError as exc:
        raise UserError(f"llama.cpp could not read the draft model {Path(draft_path).name}: {exc}.") from None
    try:
        check_compatible(target.vocab_summary(), vocab_summary_of(model), Path(draft_path).name)
    finally:
        model.close()
