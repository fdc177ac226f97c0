"""What the model pool (localrun.engine.pool) plans with: a model's memory before it loads, the default
budget, and the keep-alive and size values its flags and requests take."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localrun.engine.messages import LoadRequest
from localrun.errors import UserError

BUDGET_SHARE = 0.8  # of the memory free when the pool starts, if no budget is given
CTX_STEP = 256  # llama.cpp pads a context to 256 cells, so a choice between two multiples buys nothing
# When not even CTX_STEP cells fit: the load still goes ahead (weights are mapped, not read in), at a context
# small enough to chat in; the pool refuses it as too big for its budget before that.
OVER_BUDGET_CTX = 2048


def keep_alive_seconds(value: float | str) -> float:
    """A keep-alive as Ollama takes it: seconds, or a duration such as 30s, 5m or 1h; 0 unloads after the
    request; a negative one (or "forever") never unloads (inf)."""
    import math
    import re

    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        match = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?", text)
        if text in ("forever", "never", "inf"):
            return math.inf
        if match is None:
            raise UserError(
                f"keep_alive {str(value)[:40]!r} is not a duration: use 30s, 5m or 1h, 0 to unload after the request, "
                "or -1 to keep the model loaded."
            )
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
        seconds = float(match.group(1)) * scale
    if not math.isfinite(seconds) or seconds < 0:
        return math.inf
    return seconds


def parse_size(text: str, flag: str) -> int:
    """Bytes from 8G, 8GB, 512M, 1.5GiB or a plain number of bytes."""
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", str(text).strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise UserError(f"{flag} {str(text)[:40]!r} is not a size: use for example 8G or 512M.")
    return int(float(match.group(1)) * 1024 ** "bkmgt".index(match.group(2) or "b"))


def gib(n: int) -> str:
    """Bytes as `localrun ps` and the UI show them (decimal GB/MB)."""
    from localrun.format import fmt_bytes

    return fmt_bytes(int(n))


@dataclass(frozen=True, slots=True)
class Plan:
    """The memory a model will hold once loaded, and how it was found."""

    bytes: int  # the host-RAM prompt cache's limit included
    how: str
    prompt_cache: int = 0  # of bytes, that limit


def plan_load(load: LoadRequest) -> Plan:
    """The memory a load will take (fit.worker_bytes for a GGUF; the weights' size for a model directory), at
    the context and slots the backend will choose (choose_context)."""
    from localrun.backends import resolve_for

    resolved = resolve_for(load.model, load.options)
    options = load.options
    if resolved.kind == "remote":
        return Plan(0, "a remote engine: no memory here")
    if resolved.kind != "gguf":
        if resolved.path is None:
            return Plan(0, "a hub model not on disk yet: its size is known once downloaded")
        return _plan_weights_dir(resolved.path, options)
    from localrun.models.gguf_info import inspect_gguf

    info = inspect_gguf(resolved.path)
    draft = draft_info(options)
    choice = gguf_context(info, options, draft=draft)
    total, cache = gguf_bytes(info, choice, options, draft=draft)
    how = f"{choice.slots} × ctx {choice.n_ctx}, {options.kv_type} cache" + (", draft" if draft else "")
    return Plan(total + cache, how + (f", prompt cache ≤ {gib(cache)}" if cache else ""), cache)


PROMPT_CACHE_CAP = 512 * 1024 * 1024  # the default limit of the host-RAM prompt cache (engine.prompt_cache)


def gguf_bytes(info: Any, choice: ContextChoice, options: Any, *, draft: Any) -> tuple[int, int]:
    """(the model process's bytes at the choice: fit.worker_bytes, its prompt cache's limit)."""
    from localrun.models import fit

    used = fit.worker_bytes(info, n_ctx=choice.n_ctx, slots=choice.slots, kv_type=options.kv_type, draft=draft)
    return used, prompt_cache_bytes(info, choice, options, used=used)


def prompt_cache_bytes(info: Any, choice: ContextChoice, options: Any, *, used: int) -> int:
    """The host-RAM prompt cache's limit for a load with several slots: --prompt-cache-mb, else as much as one
    slot's KV cache (one chat at the full context, or many shorter ones) up to PROMPT_CACHE_CAP, and never more
    than the memory budget leaves beside the used bytes the model takes. The pool counts it in the plan."""
    if choice.slots <= 1:
        return 0
    if options.prompt_cache_mb is not None:
        return options.prompt_cache_mb * 1024 * 1024
    from localrun.models import fit

    limit = min(PROMPT_CACHE_CAP, fit.kv_cache_bytes(info, n_ctx=choice.n_ctx, kv_type=options.kv_type))
    if options.memory_budget_bytes:
        limit = min(limit, max(0, options.memory_budget_bytes - used))
    return limit


# ---- the context a load chooses -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContextChoice:
    """The context (per slot) and slots a load uses, and why: reason is what the ready line, the UI's load line
    and /stats show, e.g. "context 32768 (trained 131072; 131072 would need 18.20 GB of a 9.10 GB budget)"."""

    n_ctx: int
    slots: int
    reason: str
    slots_why: str


@dataclass(frozen=True, slots=True)
class Budget:
    bytes: int
    label: str  # how the reason names it: "a 9.10 GB memory budget"


def choose_context(
    need: Callable[[int, int], int],
    *,
    requested: int | None,
    trained: int | None,
    parallel: int | None,
    budget: Callable[[], Budget],
    auto_slots: Callable[[int], tuple[int, str]],
) -> ContextChoice:
    """The one rule for a load's context and slots; the pool's plan and both backends call it. need(n_ctx,
    slots) is the loaded process's memory (draft model included). --n-ctx wins; else the trained length when it
    fits the budget with every asked-for slot, else the largest multiple of CTX_STEP below it that fits. Context
    comes first: with parallel 0 the slots are chosen next, as many as auto_slots (fit.choose_parallel) gives
    and the budget still holds at that context. budget() is called only when a choice needs it."""
    base = parallel or 1
    known: list[Budget] = []

    def the_budget() -> Budget:
        if not known:
            known.append(budget())
        return known[0]

    if requested:
        n_ctx, reason = requested, f"context {requested} (--n-ctx)"
    else:
        n_ctx, reason = _largest_context(need, trained, base, the_budget())
    if parallel != 0:
        return ContextChoice(n_ctx, base, reason, "asked for" if parallel else "one sequence")
    slots, why = auto_slots(n_ctx)
    limit = the_budget()
    fitting = slots
    while fitting > 1 and need(n_ctx, fitting) > limit.bytes:
        fitting -= 1
    if fitting < slots:
        why = f"{why}; {fitting} fit within {limit.label} at ctx {n_ctx}"
    return ContextChoice(n_ctx, fitting, reason, why)


def _largest_context(
    need: Callable[[int, int], int], trained: int | None, slots: int, budget: Budget
) -> tuple[int, str]:
    from localrun.settings import DEFAULT_CTX_CAP

    top = trained or DEFAULT_CTX_CAP
    unknown = "" if trained else f"; the file gives no trained length, so at most {DEFAULT_CTX_CAP}"
    each = f" for {slots} slots" if slots > 1 else ""
    at_top = need(top, slots)
    if at_top <= budget.bytes:
        where = "the trained length" if trained else f"at most {DEFAULT_CTX_CAP}: the file gives no trained length"
        return top, f"context {top} ({where}; needs {gib(at_top)}{each} of {budget.label})"
    smallest = need(CTX_STEP, slots)
    if smallest > budget.bytes:
        n_ctx = min(top, OVER_BUDGET_CTX)
        return n_ctx, (
            f"context {n_ctx} (even {CTX_STEP} would need {gib(smallest)}{each}, over {budget.label}: "
            "set --n-ctx to choose one yourself)"
        )
    lo, hi = 1, max(top // CTX_STEP, 1)  # need(lo * CTX_STEP) fits; need(top) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid * CTX_STEP, slots) <= budget.bytes:
            lo = mid
        else:
            hi = mid - 1
    n_ctx = min(lo * CTX_STEP, top)
    return n_ctx, f"context {n_ctx} (trained {top}; {top} would need {gib(at_top)}{each} of {budget.label}{unknown})"


def budget_for(options: Any, devices: Callable[[], list[Any]]) -> Budget:
    """What a load chooses its context within: the pool's (options.memory_budget_bytes), else BUDGET_SHARE of
    the RAM and VRAM free now."""
    if options.memory_budget_bytes:
        return Budget(options.memory_budget_bytes, f"a {gib(options.memory_budget_bytes)} memory budget")
    total = int(BUDGET_SHARE * sum(d.free_bytes for d in devices()))
    return Budget(total, f"a {gib(total)} budget, {BUDGET_SHARE:.0%} of free memory")


def _probe_once(devices: list[Any] | None) -> Callable[[], list[Any]]:
    """This machine's devices, probed on the first call only (a choice that does not need them never probes)."""
    probed: list[list[Any]] = [] if devices is None else [devices]

    def machine() -> list[Any]:
        if not probed:
            from localrun.hardware import probe

            probed.append(probe())
        return probed[0]

    return machine


def gguf_context(info: Any, options: Any, *, draft: Any = None, devices: list[Any] | None = None) -> ContextChoice:
    """choose_context for a GGUF: memory is fit.worker_bytes at the options' KV type with the draft (draft_info)
    included; devices are probed once, and only when the choice needs them."""
    from localrun.models import fit

    machine = _probe_once(devices)

    def need(n_ctx: int, slots: int) -> int:
        return fit.worker_bytes(info, n_ctx=n_ctx, slots=slots, kv_type=options.kv_type, draft=draft)

    def auto_slots(n_ctx: int) -> tuple[int, str]:
        if options.device == "cpu":
            layers = 0
        elif options.n_gpu_layers is not None:
            layers = options.n_gpu_layers
        else:
            layers = fit.choose_gpu_layers(info, n_ctx=n_ctx, kv_type=options.kv_type, devices=machine())
        return fit.choose_parallel(info, n_ctx=n_ctx, kv_type=options.kv_type, n_gpu_layers=layers, devices=machine())

    return choose_context(
        need,
        requested=options.n_ctx,
        trained=info.context_length,
        parallel=options.parallel,
        budget=lambda: budget_for(options, machine),
        auto_slots=auto_slots,
    )


def draft_info(options: Any) -> Any:
    """The draft model's GGUF header when the options name a GGUF draft (its memory counts in the choice)."""
    if not options.draft:
        return None
    from localrun.backends import resolve_for
    from localrun.models.gguf_info import inspect_gguf

    draft_model = resolve_for(options.draft, options.replace(draft=None))
    return inspect_gguf(draft_model.path) if draft_model.kind == "gguf" else None


def _plan_weights_dir(path: Any, options: Any) -> Plan:
    """A transformers model: its weight files, scaled for a bitsandbytes load, plus torch itself (rough); its
    dynamic KV cache grows with use, so only the context's choice counts it."""
    import json
    from pathlib import Path

    weights = hf_weights_bytes(path, options)
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    choice = hf_context(config, options, weights_bytes=weights)
    return Plan(weights, f"weights on disk + torch (rough), ctx {choice.n_ctx}")


def hf_weights_bytes(path: Any, options: Any) -> int:
    """A transformers model directory's weight files, scaled for a bitsandbytes load, plus torch itself."""
    from pathlib import Path

    weights = sum(p.stat().st_size for p in Path(path).rglob("*") if p.suffix in (".safetensors", ".bin"))
    scale = {"nf4": 0.3, "int8": 0.55}.get(getattr(options, "quant", "none"), 1.1)
    return int(weights * scale) + 450 * 2**20


def hf_context(config: Any, options: Any, *, weights_bytes: int, devices: list[Any] | None = None) -> ContextChoice:
    """choose_context for a transformers model: the trained length is max_position_embeddings, and the KV cache
    is layers × KV heads × head size × 2 (K and V) × the dtype's bytes a token. A config without those numbers
    keeps DEFAULT_CTX_CAP, and the reason says so. One sequence: this backend has no slots."""
    from localrun.settings import DEFAULT_CTX_CAP, effective_n_ctx

    def get(key: str) -> Any:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    trained, layers, heads = get("max_position_embeddings"), get("num_hidden_layers"), get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or (get("hidden_size") // heads if heads and get("hidden_size") else None)
    if not options.n_ctx and not (layers and kv_heads and head_dim):
        n_ctx = effective_n_ctx(None, trained)
        why = f"the model's config gives no layer and head sizes to plan a KV cache with, so at most {DEFAULT_CTX_CAP}"
        return ContextChoice(n_ctx, 1, f"context {n_ctx} ({why})", "one sequence")
    machine = _probe_once(devices)

    def need(n_ctx: int, slots: int) -> int:
        return weights_bytes + (layers or 0) * kv_heads * head_dim * 2 * _hf_kv_dtype_bytes(options, machine) * n_ctx

    return choose_context(
        need,
        requested=options.n_ctx,
        trained=trained,
        parallel=None,
        budget=lambda: budget_for(options, machine),
        auto_slots=lambda n_ctx: (1, "one sequence"),
    )


def _hf_kv_dtype_bytes(options: Any, devices: Callable[[], list[Any]]) -> int:
    """Bytes a cached element takes: the weight dtype's (auto: 16-bit on a GPU, float32 on the CPU)."""
    if options.dtype != "auto":
        return 4 if options.dtype == "float32" else 2
    if options.device in ("cuda", "mps"):
        return 2
    if options.device == "cpu":
        return 4
    return 2 if any(getattr(d, "kind", "cpu") != "cpu" for d in devices()) else 4


def default_budget() -> int:
    """BUDGET_SHARE of the RAM and VRAM free now."""
    from localrun.hardware import probe

    return int(BUDGET_SHARE * sum(d.free_bytes for d in probe()))
