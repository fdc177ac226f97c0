"""What the model pool (localrun.engine.pool) plans with: a model's memory before it loads, the default
budget, and the keep-alive and size values its flags and requests take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localrun.engine.messages import LoadRequest
from localrun.errors import UserError

BUDGET_SHARE = 0.8  # of the memory free when the pool starts, if no budget is given


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

    bytes: int
    how: str


def plan_load(load: LoadRequest) -> Plan:
    """The memory a load will take (fit.worker_bytes for a GGUF; the weights' size for a model directory)."""
    from localrun.backends import resolve_for

    resolved = resolve_for(load.model, load.options)
    options = load.options
    if resolved.kind == "remote":
        return Plan(0, "a remote engine: no memory here")
    if resolved.kind != "gguf":
        if resolved.path is None:
            return Plan(0, "a hub model not on disk yet: its size is known once downloaded")
        return _plan_weights_dir(resolved.path, options)
    from localrun.hardware import probe
    from localrun.models import fit
    from localrun.models.gguf_info import inspect_gguf
    from localrun.settings import effective_n_ctx

    info = inspect_gguf(resolved.path)
    n_ctx = effective_n_ctx(options.n_ctx, info.context_length)
    if options.parallel is None:
        slots = 1
    elif options.parallel > 0:
        slots = options.parallel
    else:  # the same choice the backend makes when it loads
        devices = probe()
        layers = fit.choose_gpu_layers(info, n_ctx=n_ctx, kv_type=options.kv_type, devices=devices)
        slots = fit.choose_parallel(info, n_ctx=n_ctx, kv_type=options.kv_type, n_gpu_layers=layers, devices=devices)[0]
    draft = None
    if options.draft:
        draft_model = resolve_for(options.draft, options.replace(draft=None))
        if draft_model.kind == "gguf":
            draft = inspect_gguf(draft_model.path)
    total = fit.worker_bytes(info, n_ctx=n_ctx, slots=slots, kv_type=options.kv_type, draft=draft)
    return Plan(total, f"{slots} × ctx {n_ctx}, {options.kv_type} cache" + (", draft" if draft else ""))


def _plan_weights_dir(path: Any, options: Any) -> Plan:
    """A transformers model: its weight files, scaled for a bitsandbytes load, plus torch itself (rough)."""
    from pathlib import Path

    weights = sum(p.stat().st_size for p in Path(path).rglob("*") if p.suffix in (".safetensors", ".bin"))
    scale = {"nf4": 0.3, "int8": 0.55}.get(getattr(options, "quant", "none"), 1.1)
    return Plan(int(weights * scale) + 450 * 2**20, "weights on disk + torch (rough)")


def default_budget() -> int:
    """BUDGET_SHARE of the RAM and VRAM free now."""
    from localrun.hardware import probe

    return int(BUDGET_SHARE * sum(d.free_bytes for d in probe()))
