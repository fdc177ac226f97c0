"""Compare quantization levels of one model: size, speed, memory and quality in one table.

`run_compare` builds the missing variants (cached in the store), runs each in a fresh worker process
(multiprocessing spawn, so each variant's peak memory is its own) and yields its row as soon as it is
done: the CLI, the UI and the server consume the same generator. A variant that fails to build, load
or run gives a row with `error` set, and the others still run.

The arena (no quality) can also take the model as it is (no levels: `quants=()`) and remote engines
(`remotes`, each a saved endpoint's NAME[:MODEL] or an engine's URL[#MODEL]): each answers the same prompt
through the same `stream_generate`, so its TTFT and tokens/s are measured as a local variant's are.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue as queue_mod
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from localrun.errors import UserError

DEFAULT_QUANTS = ("F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0", "Q2_K")
DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
REFERENCE = "F16"
_WORKER_TIMEOUT_S = 1800.0


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


# -- the worker process ------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """This process's peak RSS since it started (Linux VmHWM; ru_maxrss elsewhere).

    On Linux ru_maxrss carries the parent's peak over fork + exec, so it would charge the parent's memory here.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _answer(path: str, quant: str, req: CompareRequest, out: Any) -> dict[str, Any]:
    """Load the variant (a file, or a remote engine's spec), generate the greedy answer (streamed to `out`),
    and return the speed figures. A remote engine's memory is what it reports (None when it does not), never
    this process's."""
    from localrun.backends import load_backend
    from localrun.engine.generate import stream_generate
    from localrun.settings import LoadOptions, SamplingParams

    backend = load_backend(path, LoadOptions(n_ctx=max(req.n_ctx, 1024), quant=quant))
    try:
        prompt = backend.render_chat([{"role": "user", "content": req.prompt}])
        ids = backend.tokenize(prompt, special=True)
        params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, seed=0)
        summary = None
        for event in stream_generate(backend, ids, params):
            out.put(("token", event.text, event.ttft_s, event.decode_tps))
            summary = event.summary or summary
        assert summary is not None
        if summary.error:
            raise RuntimeError(summary.error)
        remote = getattr(backend, "server_side", False)
        device = backend.report.device
        if remote:
            device += f", round trip {backend.report.details.get('round trip', '?')}"
        ram = summary.peak_ram_bytes if remote else max(summary.peak_ram_bytes or 0, _peak_rss_bytes())
        return {
            "load_s": backend.report.load_s,
            "device": device,
            "peak_ram_bytes": ram,
            "peak_vram_bytes": summary.peak_vram_bytes,
            "ttft_s": summary.ttft_s,
            "prompt_tps": summary.prompt_tps,
            "decode_tps": summary.decode_tps,
            "answer": summary.text.strip(),
        }
    finally:
        backend.close()


def _worker(task: dict[str, Any], out: Any) -> None:
    """Child-process body: a reference build or one variant's row; results and errors go to `out`."""
    from localrun.evaluate import quality as evaluate

    try:
        req = CompareRequest(**task["request"])
        if task["job"] == "reference":
            scorer = evaluate.open_scorer(task["path"], n_ctx=req.n_ctx)
            try:
                tokens = evaluate.tokenize_once(scorer, evaluate.read_text(req.text_path), n_ctx=req.n_ctx)
                evaluate.build_reference(scorer, tokens).save(task["reference"])
            finally:
                scorer.close()
            out.put(("done", {}))
            return
        figures = _answer(task["path"], task["quant"], req, out)
        if task.get("remote"):
            figures["note"] = "quality not measured: a remote engine gives no per-token distributions here"
        elif req.quality:
            scorer = evaluate.open_scorer(task["path"], n_ctx=req.n_ctx, quant=task["quant"])
            try:
                ref = evaluate.Reference.load(task["reference"])
                evaluate.check_vocabulary(scorer, ref, evaluate.read_text(req.text_path), name=task["label"])
                figures |= evaluate.evaluate(scorer, ref).as_dict()
            finally:
                scorer.close()
        out.put(("done", figures))
    except UserError as exc:
        out.put(("error", str(exc)))
    except BaseException as exc:  # reported as the variant's error row; the parent keeps going
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def run_in_worker(task: dict[str, Any]) -> Iterator[tuple]:
    """Run `_worker` in a fresh spawned process, yielding its messages; the last is ('done'|'error', ...)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(task, out), daemon=True)
    proc.start()
    deadline = time.monotonic() + _WORKER_TIMEOUT_S
    try:
        while True:
            try:
                msg = out.get(timeout=0.2)
            except queue_mod.Empty:
                if not proc.is_alive():
                    yield ("error", f"the worker process died (exit code {proc.exitcode})")
                    return
                if time.monotonic() > deadline:
                    yield ("error", f"the worker took more than {_WORKER_TIMEOUT_S:.0f} s")
                    return
                continue
            yield msg
            if msg[0] in ("done", "error"):
                return
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


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
    task = {"job": "variant", "path": variant.spec or str(variant.path), "quant": variant.quant}
    task |= {"label": variant.label, "remote": variant.kind == "remote"}
    task["reference"] = str(ref_path)
    task["request"] = asdict(req)
    for msg in run_in_worker(task):
        if msg[0] == "token":
            _, text, ttft, tps = msg
            yield CompareEvent("token", variant.label, 0.5, text=text, ttft_s=ttft, decode_tps=tps)
        elif msg[0] == "error":
            yield CompareEvent("row", variant.label, 1.0, msg[1], replace(base, error=msg[1]))
        else:
            figures = {k: v for k, v in msg[1].items() if k in ROW_FIELDS}
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
        task = {"job": "reference", "path": str(reference.path), "reference": str(ref_path), "request": asdict(req)}
        for msg in run_in_worker(task):
            if msg[0] == "error":
                raise UserError(f"The {REFERENCE} reference could not score the text: {msg[1]}")
    for i, variant in enumerate(variants):
        yield CompareEvent("run", variant.label, i / len(variants), f"running {variant.label}")
        yield from _run_variant(variant, req, ref_path)
