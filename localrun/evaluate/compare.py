"""Compare quantization levels of one model: size, speed, memory and quality in one table.

`run_compare` builds the missing variants (cached in the store), runs each on a model worker of its own
(localrun.engine.worker, a fresh process, so each variant's peak memory is its own: the answer is a
GenerateRequest as a chat's is, the quality jobs are in localrun.evaluate.jobs) and yields its row as soon as it is
done: the CLI, the UI and the server consume the same generator. A variant that fails to build, load
or run gives a row with `error` set, and the others still run.

The arena (no quality) can also take the model as it is (no levels: `quants=()`) and remote engines
(`remotes`, each a saved endpoint's NAME[:MODEL] or an engine's URL[#MODEL]): each answers the same prompt
through the same `stream_generate`, so its TTFT and tokens/s are measured as a local variant's are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from localrun.errors import UserError

DEFAULT_QUANTS = ("F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", "Q2_K")
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
REFERENCE = "F16"


@dataclass(frozen=True, slots=True)
class Variant:
    """One quantization level to compare: a GGUF file or a bitsandbytes directory."""

    label: str
    path: Path | None
    kind: str  # gguf or hf
    size_bytes: int = 0
    bits_per_weight: float | None = None
    tensor_types: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    quant: str = "none"  # nf4 or int8 for a saved bitsandbytes directory, loaded as saved
    spec: str | None = None  # what loads it when that is not `path`: a remote engine's NAME:MODEL or URL#MODEL


@dataclass(frozen=True, slots=True)
class CompareRow:
    """One finished variant: every figure of the table, or `error` with what went wrong."""

    label: str
    path: str
    kind: str
    size_bytes: int
    bits_per_weight: float | None
    is_reference: bool = False
    load_s: float | None = None
    peak_ram_bytes: int | None = None
    peak_vram_bytes: int | None = None
    ttft_s: float | None = None
    prompt_tps: float | None = None
    decode_tps: float | None = None
    ppl: float | None = None
    ppl_stderr: float | None = None
    delta_ppl_pct: float | None = None
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement_pct: float | None = None
    answer: str = ""
    device: str = ""
    note: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ROW_FIELDS = tuple(CompareRow.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class CompareEvent:
    """Progress of a comparison: stage is build, reference, run, token or row; row is set on row events.

    token events carry the new `text` of one variant's streamed answer with its live `ttft_s`/`decode_tps`.
    """

    stage: str
    label: str
    fraction: float
    message: str = ""
    row: CompareRow | None = None
    text: str = ""
    ttft_s: float | None = None
    decode_tps: float | None = None


@dataclass(frozen=True, slots=True)
class CompareRequest:
    """What to compare; the CLI, UI and server build one of these."""

    model: str | None = None
    quants: tuple[str, ...] = DEFAULT_QUANTS
    nf4: bool = False
    int8: bool = False
    prompt: str = DEFAULT_PROMPT
    text_path: str | None = None
    n_ctx: int = 512
    max_tokens: int = 48
    quality: bool = True
    cache_dir: str | None = None
    remotes: tuple[str, ...] = ()  # remote engines answering after the local variants (no quality figures)


# -- building the variants -------------------------------------------------------------------------


def parse_quants(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'F16,Q8_0,q4_0' -> ('F16', 'Q8_0', 'Q4_0'); validated against the quantizer's types."""
    from localrun.quantize import normalise_targets

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s for s in (i.strip() for i in items) if s]
    if not items:
        raise UserError("No quantization level given: pass e.g. --quants F16,Q8_0,Q4_0.")
    return tuple(normalise_targets(items))


def cache_dir_for(stem: str, override: str | None = None) -> Path:
    """Where a model's variants live: <store>/local/<stem>/ (listed by `localrun models list`)."""
    from localrun.models.catalog import models_dir

    return Path(override).expanduser() if override else models_dir() / "local" / stem


def _hf_source(src: Path, kind: str, cache: Path, stem: str) -> Iterator[CompareEvent]:
    """The HF directory variants are built from: the model itself, or a GGUF dequantised once."""
    if kind == "hf_dir":
        return src
    hf_dir = cache / "hf" / stem  # named so that the quantizer's outputs are <stem>-<TYPE>
    if not (hf_dir / "config.json").is_file():
        from localrun.quantize.to_gguf import gguf_to_hf_dir

        _quiet_transformers()
        yield CompareEvent("build", "HF", 0.0, f"dequantising {src.name} to a Hugging Face directory")
        gguf_to_hf_dir(src, hf_dir)
    return hf_dir


def _quiet_transformers() -> None:
    """Our progress lines are on stderr; transformers' own bars would interleave with them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _describe(label: str, path: Path, reference: Path | None = None) -> Variant:
    if path.is_dir():  # bits per weight as llama.cpp counts them: all weight bytes over the reference's parameters
        from localrun.models.gguf_info import inspect_gguf
        from localrun.models.store import dir_size

        weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        params = inspect_gguf(reference).parameter_count if reference is not None and reference.is_file() else 0
        bits = 8 * weights / params if params else None
        return Variant(label, path, "hf", dir_size(path), bits, {"safetensors bytes": weights})
    from localrun.quantize.gguf_quant import describe_gguf

    r = describe_gguf(path, target=label)
    return Variant(label, path, "gguf", r.size_bytes, r.bits_per_weight, dict(r.tensor_types))


def _build_one(hf_dir: Path, f16: Path, label: str, dest: Path) -> Iterator[CompareEvent]:
    from localrun.quantize import BNB_TYPES, FLOAT_TYPES, run_quantize

    src = hf_dir if label in FLOAT_TYPES or label in BNB_TYPES else f16
    if label in BNB_TYPES:
        _quiet_transformers()
    for ev in run_quantize(src, [label], out_dir=dest.parent):
        if ev.stage != "done":
            yield CompareEvent("build", label, ev.fraction, ev.message)


def build_variants(req: CompareRequest) -> Iterator[CompareEvent | Variant]:
    """Yield progress events, then one Variant per level (reference first); builds only what is missing.

    With no levels (`quants=()`, no NF4/INT8) the one local variant is the model as it is; with a remote engine
    as the model there is none (the remotes are `remote_variants`)."""
    from localrun.models.catalog import resolve_model
    from localrun.models.endpoints import remote_target
    from localrun.quantize import output_stem

    levels = bool(req.quants or req.nf4 or req.int8)
    if remote_target(req.model) is not None:
        if levels:
            raise UserError(
                f"{req.model} is a remote engine: levels are built from a model on disk. Compare it with --arena "
                "(answers and speed), or name a local model and pass the engine with --remote."
            )
        return
    if req.quality and not levels:
        raise UserError("Quality is measured against the F16 reference: give quantization levels, or skip quality.")
    resolved = resolve_model(req.model)
    if resolved.kind == "hub_id" or resolved.path is None or not resolved.path.exists():
        raise UserError(f"{req.model} is not on disk: pull it first (localrun models pull), then compare.")
    if not levels:
        yield _as_is(resolved.path)
        return
    stem = output_stem(resolved.path)
    cache = cache_dir_for(stem, req.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    hf_dir = yield from _hf_source(resolved.path, resolved.kind, cache, stem)
    labels = [REFERENCE] + [q for q in req.quants if q != REFERENCE]
    labels += [t for t, on in (("NF4", req.nf4), ("INT8", req.int8)) if on and t not in labels]
    f16 = cache / f"{stem}-F16.gguf"
    for i, label in enumerate(labels):
        dest = cache / (f"{stem}-{label.lower()}" if label in ("NF4", "INT8") else f"{stem}-{label}.gguf")
        try:
            if not dest.exists():
                yield CompareEvent("build", label, i / len(labels), f"building {dest.name}")
                yield from _build_one(hf_dir, f16, label, dest)
            variant = _describe(label, dest, f16)
            if label in ("NF4", "INT8"):
                variant = replace(variant, quant=label.lower())
            yield variant
        except (UserError, RuntimeError, OSError, ValueError) as exc:
            if label == REFERENCE:
                raise UserError(f"Could not build the F16 reference: {exc}") from None
            yield Variant(label, dest, "hf" if label in ("NF4", "INT8") else "gguf", error=str(exc))


def _as_is(path: Path) -> Variant:
    """The model as it is on disk, labelled by its file (or directory) name."""
    if path.is_dir():
        from localrun.models.store import dir_size

        return Variant(path.name, path, "hf", dir_size(path))
    from localrun.quantize.gguf_quant import describe_gguf

    try:
        r = describe_gguf(path, target=path.stem)
    except (OSError, ValueError) as exc:
        return Variant(path.stem, path, "gguf", error=f"{path.name} is not a readable GGUF file: {exc}")
    return Variant(path.stem, path, "gguf", r.size_bytes, r.bits_per_weight, dict(r.tensor_types))


def remote_variants(req: CompareRequest) -> list[Variant]:
    """One variant per remote engine: the model (when it names one) first, then `remotes`, in order.
    A spec that is no engine address gives an error variant, so the others still run."""
    from localrun.models.endpoints import remote_target

    specs = ([req.model] if remote_target(req.model) is not None else []) + list(req.remotes)
    variants = []
    for spec in specs:
        try:
            target = remote_target(spec)
        except UserError as exc:
            variants.append(Variant(spec, None, "remote", error=str(exc)))
            continue
        if target is None:
            why = (
                f"{spec} is not a remote engine: give a saved endpoint as NAME[:MODEL] (localrun endpoints list) "
                "or an address as http://HOST:PORT/v1[#MODEL]."
            )
            variants.append(Variant(spec, None, "remote", error=why))
        else:
            variants.append(Variant(target.label, None, "remote", spec=spec))
    return variants


# -- on the model worker ----------------------------------------------------------------------------


class _JobFailed(Exception):
    """A job on the variant's worker failed: its sentence goes into the variant's row."""


def _variant_worker() -> Any:
    """A model worker of the variant's own (a fresh process, so its peak memory is its own), with the
    quality jobs as extra request kinds."""
    from localrun.engine.worker import WorkerClient
    from localrun.evaluate.jobs import PLUGIN

    return WorkerClient(start=False, plugins=(PLUGIN,))


def _updates(worker: Any, request: Any) -> Iterator[Any]:
    """A request's updates from the worker; a Failed one raises _JobFailed."""
    from localrun.engine.messages import Failed

    for update in worker.submit(request, owner="compare"):
        if isinstance(update, Failed):
            raise _JobFailed(update.message)
        yield update


def _figures(worker: Any, request: Any) -> dict[str, Any]:
    from localrun.evaluate.jobs import Figures

    for update in _updates(worker, request):
        if isinstance(update, Figures):
            return update.values
    raise _JobFailed(f"the model process gave no result for {type(request).__name__}")


def _answer(worker: Any, spec: str, quant: str, label: str, req: CompareRequest) -> Iterator[CompareEvent]:
    """Load the variant (a file, or a remote engine's spec) and stream its greedy answer, as a chat's turn runs;
    returns the speed figures. A remote engine's memory is what it reports (None when it does not), never this
    machine's."""
    from localrun.engine.events import GenerationEvent
    from localrun.engine.messages import GenerateRequest, Loaded, LoadRequest
    from localrun.evaluate.jobs import PeakMemoryRequest
    from localrun.settings import LoadOptions, SamplingParams

    load = LoadRequest(spec, LoadOptions(n_ctx=max(req.n_ctx, 1024), quant=quant))
    params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, seed=0)
    request = GenerateRequest.chat([{"role": "user", "content": req.prompt}], params, load=load)
    loaded, summary = None, None
    for update in _updates(worker, request):
        if isinstance(update, Loaded):
            loaded = update
        elif isinstance(update, GenerationEvent):
            yield CompareEvent(
                "token", label, 0.5, text=update.text, ttft_s=update.ttft_s, decode_tps=update.decode_tps
            )
            summary = update.summary or summary
    if loaded is None or summary is None:
        raise _JobFailed("the answer ended without a result")
    if summary.error:
        raise _JobFailed(summary.error)
    report = loaded.report
    remote = report.backend == "remote"
    device = report.device + (f", round trip {report.details.get('round trip', '?')}" if remote else "")
    if remote:
        ram = summary.peak_ram_bytes
    else:
        ram = max(summary.peak_ram_bytes or 0, _figures(worker, PeakMemoryRequest())["peak_ram_bytes"])
    return {
        "load_s": report.load_s,
        "device": device,
        "peak_ram_bytes": ram,
        "peak_vram_bytes": summary.peak_vram_bytes,
        "ttft_s": summary.ttft_s,
        "prompt_tps": summary.prompt_tps,
        "decode_tps": summary.decode_tps,
        "answer": summary.text.strip(),
    }


# -- the comparison ----------------------------------------------------------------------------------


def _reference_path(req: CompareRequest, f16: Path) -> Path:
    from localrun.evaluate import quality as evaluate

    text = evaluate.read_text(req.text_path)
    st = f16.stat()
    key = f"{text}\0{req.n_ctx}\0{st.st_size}\0{st.st_mtime_ns}\0{evaluate.DEFAULT_TOP_K}"
    return f16.parent / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _run_variant(variant: Variant, req: CompareRequest, ref_path: Path) -> Iterator[CompareEvent]:
    base = CompareRow(
        variant.label,
        str(variant.path),
        variant.kind,
        variant.size_bytes,
        variant.bits_per_weight,
        is_reference=variant.label == REFERENCE and variant.kind != "remote",
    )
    if variant.kind == "remote":
        base = replace(base, path=variant.spec or variant.label, size_bytes=0)
    if variant.error:
        yield CompareEvent("row", variant.label, 1.0, variant.error, replace(base, error=variant.error))
        return
    from localrun.evaluate.jobs import QualityRequest

    worker = _variant_worker()
    try:
        figures = yield from _answer(worker, variant.spec or str(variant.path), variant.quant, variant.label, req)
        if variant.kind == "remote":
            figures["note"] = "quality not measured: a remote engine gives no per-token distributions here"
        elif req.quality:
            job = QualityRequest(
                str(variant.path), variant.quant, str(ref_path), req.text_path, req.n_ctx, variant.label
            )
            figures |= _figures(worker, job)
    except _JobFailed as exc:
        yield CompareEvent("row", variant.label, 1.0, str(exc), replace(base, error=str(exc)))
        return
    finally:
        worker.close()
    figures = {k: v for k, v in figures.items() if k in ROW_FIELDS}
    yield CompareEvent("row", variant.label, 1.0, "done", replace(base, **figures))


def run_compare(req: CompareRequest) -> Iterator[CompareEvent]:
    """Build what is missing, make the reference once, then yield each variant's row as it finishes: the local
    variants first, then the remote engines."""
    variants: list[Variant] = []
    for item in build_variants(req):
        if isinstance(item, Variant):
            variants.append(item)
        else:
            yield item
    local = bool(variants)
    variants += remote_variants(req)
    if not variants:
        raise UserError("Nothing to compare: name a model, levels or a remote engine.")
    reference = variants[0]
    ref_path = _reference_path(req, reference.path) if local and reference.path else Path()
    if req.quality and local and not ref_path.is_file():
        yield CompareEvent("reference", REFERENCE, 0.0, f"scoring the text with the {REFERENCE} reference")
        from localrun.evaluate.jobs import ReferenceRequest

        worker = _variant_worker()
        try:
            _figures(worker, ReferenceRequest(str(reference.path), str(ref_path), req.text_path, req.n_ctx))
        except _JobFailed as exc:
            raise UserError(f"The {REFERENCE} reference could not score the text: {exc}") from None
        finally:
            worker.close()
    for i, variant in enumerate(variants):
        yield CompareEvent("run", variant.label, i / len(variants), f"running {variant.label}")
        yield from _run_variant(variant, req, ref_path)
