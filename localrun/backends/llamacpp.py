"""GGUF models through llama-cpp-python."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from localrun.backends.base import Drafter, LoadReport, ResolvedModel
from localrun.chat_template import render_chat
from localrun.errors import UserError
from localrun.events import TokenStep
from localrun.hardware import llama_cpp_build, physical_cores
from localrun.settings import LoadOptions, SamplingParams, effective_n_ctx

_KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_* values


class LlamaCppBackend:
    """A loaded GGUF. The KV cache keeps the previous request's tokens, so a chat's next turn
    evaluates only what is new (llama-cpp-python's generate() matches the longest prefix)."""

    name = "llamacpp"
    supports_draft = False
    supports_grammar = True

    def __init__(self, model: ResolvedModel, options: LoadOptions | None = None) -> None:
        from localrun.gguf_info import inspect_gguf

        options = options or LoadOptions()
        path = model.path
        self.info = inspect_gguf(path)  # catches corrupt files before llama.cpp can crash on them
        self.options = options
        self._llm = None
        self.report = self._load(Path(path), options)

    def _load(self, path: Path, options: LoadOptions) -> LoadReport:
        import llama_cpp

        if (
            options.device == "mps"
            and not llama_cpp_build()["metal"]
            or options.device == "cuda"
            and not llama_cpp_build()["cuda"]
        ):
            raise UserError(
                f"This llama-cpp-python build has no {options.device} support: reinstall it with that backend, or use --device cpu."
            )
        n_ctx = effective_n_ctx(options.n_ctx, self.info.context_length)
        n_threads = options.n_threads or physical_cores()
        n_gpu_layers = self._gpu_layers(path, options, n_ctx)
        kv = _KV_TYPES[options.kv_type]
        if options.kv_type != "f16" and not options.flash_attn:
            raise UserError(
                f"A {options.kv_type} KV cache needs flash attention: add --flash-attn, or use --kv-type f16."
            )
        t0 = time.perf_counter()
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                flash_attn=options.flash_attn,
                type_k=kv,
                type_v=kv,
                verbose=False,
            )
        except ValueError as exc:
            raise UserError(f"llama.cpp could not load {path.name}: {exc}.") from None
        load_s = time.perf_counter() - t0
        device = "cpu" if n_gpu_layers == 0 else ("metal" if llama_cpp_build()["metal"] else "cuda")
        return LoadReport(
            backend=self.name,
            device=device,
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            kv_cache=options.kv_type + (" · flash-attn" if options.flash_attn else ""),
            load_s=load_s,
            weights_bytes=self.info.file_bytes,
            details={"quant": self.info.file_type} if getattr(self.info, "file_type", None) else {},
        )

    def _gpu_layers(self, path: Path, options: LoadOptions, n_ctx: int) -> int:
        """All layers when the build has a GPU and the model fits, else what fits, 0 on CPU."""
        if options.device == "cpu" or not llama_cpp_build()["gpu_offload"]:
            return 0
        if options.n_gpu_layers is not None:
            return options.n_gpu_layers
        from localrun import fit
        from localrun.hardware import probe

        return fit.choose_gpu_layers(path, n_ctx=n_ctx, kv_type=options.kv_type, devices=probe())

    # -- the Backend protocol -------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        bos = self._token_text(self._llm.token_bos())
        wants_bos = self.info.add_bos_token
        if wants_bos is None:  # older GGUFs leave it out: llama.cpp's default for the vocab type decides
            wants_bos = self._llm._model.add_bos_token()
        add_bos = bool(wants_bos) and not (bos and text.startswith(bos))
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[dict[str, str]], *, tools: Sequence[dict] | None = None) -> str:
        return render_chat(
            self.info.chat_template,
            messages,
            bos_token=self._token_text(self._llm.token_bos()),
            eos_token=self._token_text(self._llm.token_eos()),
            tools=tools,
        )

    def generate_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, drafter: Drafter | None = None
    ) -> Iterator[TokenStep]:
        import llama_cpp

        if drafter is not None:
            raise UserError("Speculative decoding is not available on the llama.cpp backend yet.")
        llm = self._llm
        n_ctx = llm.n_ctx()  # stream_generate checked that the prompt leaves room
        prefill = self._prefill_count(prompt_ids)
        llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        vocab = llm._model.vocab
        budget = n_ctx - len(prompt_ids)
        grammar = llama_cpp.LlamaGrammar.from_string(params.grammar) if params.grammar else None
        tokens = llm.generate(
            list(prompt_ids),
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            grammar=grammar,
        )
        try:
            for i, token in enumerate(tokens):
                if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token):
                    return None
                yield TokenStep(token, prefill_tokens=prefill if i == 0 else None)
                if i + 1 >= budget:
                    return "length"
        finally:
            tokens.close()

    def _prefill_count(self, prompt_ids: Sequence[int]) -> int:
        """How many prompt tokens generate() will evaluate, by the same prefix rule it applies."""
        llm = self._llm
        cached = list(llm.input_ids[: llm.n_tokens])
        common = 0
        for a, b in zip(cached, prompt_ids, strict=False):
            if a != b:
                break
            common += 1
        if common == len(prompt_ids):
            exact = llm.n_tokens == len(prompt_ids) and not getattr(llm, "_requires_eval", True)
            return 0 if exact else 1
        return len(prompt_ids) - common

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    @property
    def llama(self):
        """The underlying llama_cpp.Llama (for the bench's bare baseline)."""
        return self._llm


def bare_bench(backend: LlamaCppBackend, prompt_ids: Sequence[int], n_gen: int) -> tuple[float, float]:
    """The baseline: a bare llama-cpp-python generate() loop on the same Llama (same threads,
    context and batch), greedy, no EOS check. Returns (prompt-eval seconds, decode tokens/s)."""
    llm = backend.llama
    llm.reset()
    t0 = time.perf_counter()
    t_first = t_last = t0
    for n, _token in enumerate(llm.generate(list(prompt_ids), temp=0.0), start=1):
        t_last = time.perf_counter()
        if n == 1:
            t_first = t_last
        if n >= n_gen:
            break
    llm.reset()
    return t_first - t0, (n_gen - 1) / (t_last - t_first)
