"""Will a GGUF model fit? Memory = weights + KV cache + compute buffers (+ a draft model), from the file's metadata.

The numbers follow llama.cpp's own allocation rules (llama-context.cpp, llama-kv-cache-iswa.cpp): the context is
padded to 256 cells, K and V are stored in the chosen cache type, and the compute buffer is sized for the
worst-case ubatch. Flash attention is assumed off (the llama-cpp-python default), which is what makes the
attention scores part of the compute buffer.

Sliding-window layers: llama-cpp-python leaves llama.cpp's `swa_full` default on, so every layer, sliding or
not, keeps a cache of the whole context (a window-sized cache would block its prefix reuse across requests).
That, not the compute buffer, is what grows with context on Gemma-2/3: an estimate that gave those layers only
`n_swa + n_ubatch` cells was 52 % low at 32k on a 270M Gemma 3.

Large vocabularies: llama.cpp's tokenizer tables (token text, lookup maps, BPE merge ranks) cost about 150 to
200 bytes a token, 80 a merge, plus the merge strings once more while the file loads; each request also
touches one row of logits, the output buffer and the sampler's candidate list (20 bytes a token). The
compute buffer reserves logits for a whole ubatch (n_ubatch x n_vocab x 4 bytes, 512 MiB for a 262k vocabulary),
but a single-sequence CPU run asks for one row, so those pages are never touched and RSS does not count them.
Calibrated with bench/fit.py on the default model and tiny random llama, qwen2, gemma2, phi3 and gemma3 GGUFs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localrun.errors import UserError
from localrun.models.gguf_info import GGUFInfo, inspect_gguf
from localrun.settings import effective_n_ctx

MiB = 1024 * 1024
# Bytes per cached element for each KV cache type (q8_0: 34-byte blocks of 32, q4_0: 18-byte blocks of 32).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
N_UBATCH = 512
CTX_PAD = 256
# llama.cpp's tokenizer tables after loading, by tokenizer kind (measured with vocab_only loads):
# byte-level BPE ("gpt2") keeps a rank map of its merges; SentencePiece ("llama") keeps scores instead.
BPE_VOCAB_BASE_BYTES = int(4.8 * MiB)
BPE_BYTES_PER_TOKEN = 199
BPE_BYTES_PER_MERGE = 78
BPE_LOAD_BYTES_PER_MERGE = 72  # the file's merge strings, alive only while the tables are built
SPM_VOCAB_BASE_BYTES = int(1.3 * MiB)
SPM_BYTES_PER_TOKEN = 155
# What a loaded context adds besides its named buffers (threads, graph metadata, the Python object), and
# what each request touches per vocabulary token (a logits row, the output buffer, the sampler's candidates).
RUNTIME_BASE_BYTES = 7 * MiB
RUNTIME_BYTES_PER_TOKEN = 20
# What a CUDA context and cuBLAS workspace take from a GPU before any model buffer.
GPU_CONTEXT_BYTES = 400 * MiB
GPU_HEADROOM_FRACTION = 0.05


def _pad(value: int, multiple: int = CTX_PAD) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes llama.cpp allocates for one model at one context size (draft model included when given)."""

    n_ctx: int
    kv_type: str
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    draft_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes + self.draft_bytes


def kv_cache_bytes(
    info: GGUFInfo, *, n_ctx: int, kv_type: str = "f16", n_ubatch: int = N_UBATCH, swa_full: bool = True
) -> int:
    """K and V for every layer: kv heads x head dim x cells x bytes. Sliding-window layers hold only
    `n_swa + n_ubatch` cells when swa_full is off; llama-cpp-python leaves it on (all layers full size)."""
    if kv_type not in KV_TYPE_BYTES:
        raise UserError(f"Unknown KV cache type {kv_type!r}: use one of {', '.join(KV_TYPE_BYTES)}.")
    n_layers = info.n_layers or 0
    heads = list(info.kv_heads_per_layer) or [info.n_kv_heads or info.n_heads or 0] * n_layers
    k_dim = info.key_length or info.head_dim or 0
    v_dim = info.value_length or info.head_dim or 0
    full_cells = _pad(n_ctx)
    swa_cells = full_cells if swa_full else _pad(min(full_cells, (info.sliding_window or 0) + n_ubatch))
    swa_left = info.swa_layers
    total = 0.0
    # Which layers slide does not change the sum as long as the per-layer head counts are equal.
    for il, n_kv in enumerate(heads[:n_layers]):
        cells = swa_cells if il < swa_left else full_cells
        total += n_kv * (k_dim + v_dim) * cells * KV_TYPE_BYTES[kv_type]
    return int(total)


def compute_buffer_bytes(info: GGUFInfo, *, n_ctx: int, n_ubatch: int = N_UBATCH) -> int:
    """The worst-case graph llama.cpp reserves: all-token logits, or attention scores over the whole context."""
    n_ub = min(n_ubatch, _pad(n_ctx))
    cells = _pad(n_ctx)
    embd = info.embedding_length or 0
    activations = n_ub * (embd * 8 + (info.feed_forward_length or 0) * 4)
    logits = (info.vocab_size or 0) * n_ub * 4
    attention = (info.n_heads or 0) * cells * n_ub * 4 + cells * n_ub * 4  # scores + f32 mask
    return max(logits + n_ub * embd * 8, attention + activations)


def compute_resident_bytes(info: GGUFInfo, *, n_tokens: int, n_kv: int, n_ubatch: int = N_UBATCH) -> int:
    """The part of the compute buffer a single-sequence CPU run touches (RSS counts touched pages only):
    attention scores for one ubatch over the filled cells, plus activations (one row of logits is counted
    in runtime_bytes).

    The 1.5 factor covers the softmax copy of the scores, partly sharing pages with them (calibrated
    with bench/fit.py on the default model)."""
    t = min(n_tokens, n_ubatch)
    cells = _pad(n_kv)
    scores = (info.n_heads or 0) * cells * t * 4
    mask = cells * t * 4
    activations = t * ((info.embedding_length or 0) * 8 + (info.feed_forward_length or 0) * 4)
    return int(1.5 * scores) + mask + activations


def _merge_count(info: GGUFInfo) -> int:
    """BPE merges in the file (0 for other tokenizers); the metadata holds the array's length or the array."""
    if info.tokenizer_model != "gpt2":
        return 0
    value = (info.metadata or {}).get("tokenizer.ggml.merges")
    if isinstance(value, int) and not isinstance(value, bool):  # a count, as a catalog manifest gives it
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    found = re.search(r"\d+", value) if isinstance(value, str) else None
    return int(found.group()) if found else (info.vocab_size or 0)


def vocab_bytes(info: GGUFInfo) -> int:
    """llama.cpp's tokenizer tables once loaded: token text and lookup maps, and BPE merge ranks."""
    vocab = info.vocab_size or 0
    if info.tokenizer_model == "gpt2":
        return int(BPE_VOCAB_BASE_BYTES + vocab * BPE_BYTES_PER_TOKEN + _merge_count(info) * BPE_BYTES_PER_MERGE)
    return int(SPM_VOCAB_BASE_BYTES + vocab * SPM_BYTES_PER_TOKEN)


def runtime_bytes(info: GGUFInfo) -> int:
    """Process memory a loaded context adds outside its named buffers, including per-request logits and sampling."""
    return int(RUNTIME_BASE_BYTES + (info.vocab_size or 0) * RUNTIME_BYTES_PER_TOKEN)


def ram_resident_bytes(
    model: GGUFInfo | str | Path, *, n_ctx: int, kv_type: str = "f16", n_tokens_used: int | None = None
) -> int:
    """Expected peak RSS growth on CPU (over a process that has imported llama_cpp) once n_tokens_used cells
    are filled (None: the whole context). Lower than `estimate().total_bytes`: llama.cpp reserves logits for
    a whole ubatch, which single-sequence generation never touches.

    The peak is the larger of two moments: the end of loading, when the file's BPE merge strings are still
    alive beside the finished tables, and generation, with the KV cache (zeroed, so resident) and the compute
    pages in use."""
    info = model if isinstance(model, GGUFInfo) else inspect_gguf(model)
    used = min(n_tokens_used or n_ctx, n_ctx)
    loading = _merge_count(info) * BPE_LOAD_BYTES_PER_MERGE
    running = (
        kv_cache_bytes(info, n_ctx=n_ctx, kv_type=kv_type)
        + runtime_bytes(info)
        + compute_resident_bytes(info, n_tokens=used, n_kv=used)
    )
    return info.tensor_data_bytes + vocab_bytes(info) + max(loading, running)


WORKER_BASE_BYTES = 24 * MiB  # a model process before its model: the interpreter and llama_cpp (measured)


def worker_bytes(
    info: GGUFInfo, *, n_ctx: int, slots: int = 1, kv_type: str = "f16", draft: GGUFInfo | None = None
) -> int:
    """What a model process holds once loaded and answering (the model pool's budget counts this): the process
    itself, the weights, the KV cache of every slot (n_ctx cells each) and one ubatch of compute in use, plus a
    draft model with its own cache. Within a few per cent of the worker's RSS on the default model (bench/fit.py
    measures the parts; tests/test_pool.py the whole)."""
    cells = n_ctx * max(slots, 1)
    total = WORKER_BASE_BYTES + ram_resident_bytes(info, n_ctx=cells, kv_type=kv_type, n_tokens_used=N_UBATCH)
    if draft is not None:
        total += ram_resident_bytes(draft, n_ctx=cells, kv_type="f16", n_tokens_used=N_UBATCH)
    return total


def overhead_bytes(info: GGUFInfo) -> int:
    """Tokenizer tables and other allocations outside the named buffers, plus the logits output buffer."""
    return vocab_bytes(info) + runtime_bytes(info)


def estimate(
    model: GGUFInfo | str | Path,
    *,
    n_ctx: int | None = None,
    kv_type: str = "f16",
    draft: GGUFInfo | str | Path | None = None,
) -> MemoryEstimate:
    """Memory for a model at a context size (None: the one the loader picks) with an optional draft model."""
    info = model if isinstance(model, GGUFInfo) else inspect_gguf(model)
    ctx = effective_n_ctx(n_ctx, info.context_length)
    if ctx <= 0:
        raise UserError(f"The context size must be positive, not {ctx}.")
    draft_total = 0
    if draft is not None:
        draft_info = draft if isinstance(draft, GGUFInfo) else inspect_gguf(draft)
        draft_total = estimate(draft_info, n_ctx=ctx, kv_type=kv_type).total_bytes
    return MemoryEstimate(
        n_ctx=ctx,
        kv_type=kv_type,
        weights_bytes=info.tensor_data_bytes,
        kv_cache_bytes=kv_cache_bytes(info, n_ctx=ctx, kv_type=kv_type),
        compute_bytes=compute_buffer_bytes(info, n_ctx=ctx),
        overhead_bytes=overhead_bytes(info),
        draft_bytes=draft_total,
    )


def _gpus(devices: list[Any]) -> list[Any]:
    return [d for d in devices if getattr(d, "kind", "cpu") in ("cuda", "metal")]


def gpu_budget_bytes(devices: list[Any]) -> int:
    """Free GPU memory we may plan with, after a context per device and a safety margin."""
    budget = 0
    for gpu in _gpus(devices):
        budget += int(gpu.free_bytes * (1 - GPU_HEADROOM_FRACTION)) - GPU_CONTEXT_BYTES
    return max(budget, 0)


def _layer_costs(info: GGUFInfo, *, n_ctx: int, kv_type: str) -> list[int]:
    """Bytes each repeating layer puts on the GPU: its weights plus its share of the KV cache."""
    n_layers = info.n_layers or len(info.layer_tensor_bytes)
    kv_per_layer = kv_cache_bytes(info, n_ctx=n_ctx, kv_type=kv_type) // max(n_layers, 1)
    weights = list(info.layer_tensor_bytes) or [info.tensor_data_bytes // max(n_layers, 1)] * n_layers
    return [w + kv_per_layer for w in weights]


def choose_gpu_layers(gguf_path: str | Path | GGUFInfo, *, n_ctx: int, kv_type: str = "f16", devices: list[Any]) -> int:
    """How many layers to offload (llama.cpp's n_gpu_layers): n_layers + 1 puts everything, output included,
    on the GPU; 0 without a GPU or when not even one layer fits."""
    if not _gpus(devices):
        return 0
    info = gguf_path if isinstance(gguf_path, GGUFInfo) else inspect_gguf(gguf_path)
    available = gpu_budget_bytes(devices) - compute_buffer_bytes(info, n_ctx=n_ctx)
    costs = _layer_costs(info, n_ctx=n_ctx, kv_type=kv_type)
    used = layers = 0
    # llama.cpp offloads the last layers first.
    for cost in reversed(costs):
        if used + cost > available:
            return layers
        used += cost
        layers += 1
    output = info.output_tensor_bytes or info.token_embd_bytes
    return layers + 1 if used + output <= available else layers


@dataclass(frozen=True, slots=True)
class FitReport:
    """The verdict for one model, context and cache type on this machine."""

    estimate: MemoryEstimate
    verdict: str
    gpu_layers: int
    n_layers: int
    gpu_budget_bytes: int
    ram_available_bytes: int
    max_ctx: int | None
    max_ctx_where: str


MAX_AUTO_SLOTS = 4  # llama-server's default too; more slots mostly add latency on a laptop's cores


def choose_parallel(
    info: GGUFInfo, *, n_ctx: int, kv_type: str, n_gpu_layers: int, devices: list[Any]
) -> tuple[int, str]:
    """How many sequences to decode together when none was asked for, and why: up to MAX_AUTO_SLOTS, as many
    as keep their KV caches (n_ctx each) within a quarter of the free memory they would live in."""
    per_slot = kv_cache_bytes(info, n_ctx=n_ctx, kv_type=kv_type)
    on_gpu = n_gpu_layers != 0 and bool(_gpus(devices))
    free = gpu_budget_bytes(devices) if on_gpu else _ram_available(devices)
    n = int(max(1, min(MAX_AUTO_SLOTS, (free // 4) // max(per_slot, 1))))
    where = "VRAM" if on_gpu else "RAM"
    why = f"{n} × {per_slot / 2**20:.0f} MiB of KV cache within a quarter of {free / 2**30:.1f} GiB free {where}"
    return n, why


def _ram_available(devices: list[Any]) -> int:
    cpu = [d for d in devices if getattr(d, "kind", "") == "cpu"]
    if cpu:
        return int(cpu[0].free_bytes)
    import psutil

    return int(psutil.virtual_memory().available)


def _fits(info: GGUFInfo, ctx: int, kv_type: str, draft: GGUFInfo | None, limit: int) -> bool:
    return estimate(info, n_ctx=ctx, kv_type=kv_type, draft=draft).total_bytes <= limit


def _largest_ctx(info: GGUFInfo, kv_type: str, draft: GGUFInfo | None, limit: int) -> int | None:
    """The largest context (a multiple of 256, up to the trained length) whose total fits in limit bytes."""
    top = info.context_length or 4096
    if not _fits(info, CTX_PAD, kv_type, draft, limit):
        return None
    lo, hi = 1, max(top // CTX_PAD, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(info, mid * CTX_PAD, kv_type, draft, limit):
            lo = mid
        else:
            hi = mid - 1
    return min(lo * CTX_PAD, top)


def fit_report(
    model: str | Path | GGUFInfo,
    *,
    n_ctx: int | None = None,
    kv_type: str = "f16",
    draft: str | Path | GGUFInfo | None = None,
    devices: list[Any] | None = None,
) -> FitReport:
    """Fits on GPU / partial offload with N layers / CPU only / does not fit, and the largest context that fits."""
    info = model if isinstance(model, GGUFInfo) else inspect_gguf(model)
    draft_info = None if draft is None else (draft if isinstance(draft, GGUFInfo) else inspect_gguf(draft))
    if devices is None:
        from localrun.hardware import probe

        devices = probe()
    est = estimate(info, n_ctx=n_ctx, kv_type=kv_type, draft=draft_info)
    budget, ram = gpu_budget_bytes(devices), _ram_available(devices)
    n_layers = info.n_layers or 0
    layers = choose_gpu_layers(info, n_ctx=est.n_ctx, kv_type=kv_type, devices=devices)
    on_gpu = sum(_layer_costs(info, n_ctx=est.n_ctx, kv_type=kv_type)[n_layers - min(layers, n_layers) :])
    if budget and est.total_bytes <= budget:
        verdict, limit, where = "fits on GPU", budget, "GPU"
    elif layers > 0 and est.total_bytes - on_gpu <= ram:
        verdict, limit, where = (
            f"partial offload with {min(layers, n_layers)} of {n_layers} layers on GPU",
            budget + ram,
            "GPU+RAM",
        )
    elif est.total_bytes <= ram:
        verdict, limit, where = "CPU only", ram, "RAM"
    else:
        verdict, limit, where = "does not fit", budget + ram, "GPU+RAM" if budget else "RAM"
    return FitReport(
        estimate=est,
        verdict=verdict,
        gpu_layers=layers,
        n_layers=n_layers,
        gpu_budget_bytes=budget,
        ram_available_bytes=ram,
        max_ctx=_largest_ctx(info, kv_type, draft_info, limit),
        max_ctx_where=where,
    )


# ---- verdicts as the CLI and the UI show them ---------------------------------------------------------------

# Approximate bits per weight, for a catalog variant whose manifest gives no file size.
_BITS_PER_WEIGHT = {
    "q2_k": 3.0,
    "q3_k_m": 3.9,
    "q4_0": 4.5,
    "q4_1": 5.0,
    "iq4_xs": 4.3,
    "q4_k_s": 4.6,
    "q4_k_m": 4.85,
    "mxfp4": 4.3,
    "q5_k_m": 5.7,
    "q6_k": 6.6,
    "q8_0": 8.5,
}


def rough_verdict(parameter_count: int, quant: str, size_bytes: int | None, devices: list[Any]) -> str:
    """A verdict from a model's size alone: the fallback for a catalog entry whose manifest has no
    architecture numbers (`hparams`), so neither a header nor the manifest can size its KV cache."""
    bits = _BITS_PER_WEIGHT.get(quant.lower(), 16.0)
    need = int((size_bytes or parameter_count * bits / 8) * 1.15)  # weights plus a modest KV cache and buffers
    if gpu_budget_bytes(devices) >= need:
        verdict = "likely fits on GPU"
    elif _ram_available(devices) >= need:
        verdict = "likely CPU only"
    else:
        verdict = "likely does not fit"
    return f"{verdict} (rough: from its size alone; its manifest has no architecture numbers, and it is not downloaded)"


def verdict_line(report: FitReport) -> str:
    """One line, e.g. 'CPU only at 8192 ctx (310 MB) · up to 131072 ctx'."""
    from localrun.format import fmt_bytes

    limit = f" · up to {report.max_ctx} ctx" if report.max_ctx else ""
    return f"{report.verdict} at {report.estimate.n_ctx} ctx ({fmt_bytes(report.estimate.total_bytes)}){limit}"


def fit_rows(report: FitReport) -> list[tuple[str, str]]:
    """(field, value) rows of a fit report: the same rows on the CLI and in the UI."""
    from localrun.format import fmt_bytes

    est = report.estimate
    return [
        ("fit verdict", report.verdict),
        (f"memory at {est.n_ctx} ctx ({est.kv_type} KV)", fmt_bytes(est.total_bytes)),
        ("  weights / KV cache", f"{fmt_bytes(est.weights_bytes)} / {fmt_bytes(est.kv_cache_bytes)}"),
        ("  compute / other", f"{fmt_bytes(est.compute_bytes)} / {fmt_bytes(est.overhead_bytes)}"),
        ("free RAM / usable GPU", f"{fmt_bytes(report.ram_available_bytes)} / {fmt_bytes(report.gpu_budget_bytes)}"),
        (f"largest context that fits ({report.max_ctx_where})", str(report.max_ctx or "none")),
    ]


UNKNOWN_FIT = "none: llama.cpp does not know this architecture, so nothing here can load the file"


def model_rows(info: GGUFInfo, *, n_ctx: int | None = None, kv_type: str = "f16") -> list[tuple[str, str]]:
    """What `models info` and the UI show for a GGUF: its rows and, for an architecture llama.cpp knows, the
    fit. A header without tensors is refused (UserError)."""
    from localrun.models.gguf_info import info_rows, known_architecture, require_weights

    require_weights(info)
    if not known_architecture(info.architecture):
        return [*info_rows(info), ("fit verdict", UNKNOWN_FIT)]
    reason = []
    if n_ctx is None:  # the context a load would choose from memory, as `models fit` and `chat` do
        from localrun.engine.plan import gguf_context
        from localrun.settings import LoadOptions

        choice = gguf_context(info, LoadOptions(kv_type=kv_type))
        n_ctx, reason = choice.n_ctx, [("context a load chooses", choice.reason)]
    return info_rows(info) + reason + fit_rows(fit_report(info, n_ctx=n_ctx, kv_type=kv_type))
