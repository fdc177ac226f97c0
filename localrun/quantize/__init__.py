"""Quantization: Hugging Face -> GGUF, GGUF -> Q8_0/Q4_K_M/..., and bitsandbytes NF4/INT8.

`run_quantize` is the one entry point the CLI and the UI consume: a generator of QuantProgress.
Heavy libraries (gguf, llama_cpp, torch) are imported inside the submodules' functions.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localrun.errors import UserError

FLOAT_TYPES = ("F32", "F16", "BF16")
BNB_TYPES = ("NF4", "INT8")


@dataclass(frozen=True, slots=True)
class QuantResult:
    """One finished output: where it is, how big, and what each tensor actually became."""

    target: str
    path: Path
    size_bytes: int
    bits_per_weight: float
    n_weights: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QuantProgress:
    """A progress event: stage is convert, quantize, bnb, warning or done; result is set on done."""

    stage: str
    target: str
    fraction: float
    message: str
    result: QuantResult | None = None


@contextlib.contextmanager
def atomic_output(final: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final` (name not ending in .gguf) and rename it into place on success.

    On any exception, KeyboardInterrupt or an abandoned generator the temporary is removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}."
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix, suffix=".partial"))
    else:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=prefix, suffix=".partial")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o755 if directory else 0o644)  # mkstemp/mkdtemp create owner-only files
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def check_disk_space(directory: Path, needed_bytes: int) -> None:
    """Raise a UserError when `directory`'s filesystem has less free space than needed."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise UserError(
            f"Not enough disk space in {directory}: about {needed_bytes / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free; free some space or pass another output directory with -o."
        )


def normalise_targets(targets: Sequence[str]) -> list[str]:
    """Upper-cased, de-duplicated targets, or a UserError listing the valid ones."""
    from localrun.quantize.gguf_quant import quant_types

    valid = list(quant_types()) + [t for t in FLOAT_TYPES if t not in quant_types()] + list(BNB_TYPES)
    out: list[str] = []
    for raw in targets:
        name = raw.strip().upper()
        if name not in valid:
            raise UserError(f"Unknown quantization type {raw!r}: valid types are {', '.join(valid)}.")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError("No target type given: pass at least one --to TYPE, e.g. --to Q4_K_M.")
    return out


_TYPE_SUFFIX = re.compile(r"[.\-_](F32|F16|BF16|I?Q\d[\w]*)$", re.IGNORECASE)


def output_stem(source: Path) -> str:
    """Base name for outputs: the model directory name, or the GGUF name without its quant suffix."""
    stem = source.name if source.is_dir() else source.stem
    return _TYPE_SUFFIX.sub("", stem)


def run_quantize(
    src: str | Path | None,
    targets: Sequence[str],
    *,
    out_dir: str | Path = ".",
    allow_requantize: bool = False,
    pre_tokenizer: str | None = None,
    nthread: int | None = None,
    compute_dtype: str = "bfloat16",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Iterator[QuantProgress]:
    """Produce one output per target from an HF directory or a GGUF (None/"default": the default model).

    An HF source is converted to F16 once; every GGUF target is then quantized from that file.
    allow_pickle and trust_remote_code apply to bitsandbytes targets, which load the model with transformers.
    """
    from localrun.models.catalog import resolve_model

    wanted = normalise_targets(targets)
    resolved = resolve_model(None if src in (None, "", "default") else str(src))
    if resolved.kind == "hub_id" or resolved.path is None:
        raise UserError(f"{src} is a Hub id: download it first (localrun models pull), then quantize the local copy.")
    source = resolved.path
    if not source.exists():
        raise UserError(f"The source {source} does not exist: pass an existing .gguf file or model directory.")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(source)
    if resolved.kind == "hf_dir":
        bnb_checks = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
        yield from _from_hf(
            source, wanted, out, stem, allow_requantize, pre_tokenizer, nthread, compute_dtype, bnb_checks
        )
        return
    if any(t in BNB_TYPES for t in wanted):
        raise UserError("NF4 and INT8 (bitsandbytes) need a Hugging Face model directory as the source, not a GGUF.")
    for target in wanted:
        yield from _quantize_one(source, target, out / f"{stem}-{target}.gguf", allow_requantize, nthread)


def _quantize_one(
    source: Path, target: str, dest: Path, allow_requantize: bool, nthread: int | None
) -> Iterator[QuantProgress]:
    from localrun.quantize.gguf_quant import iter_quantize

    if dest.resolve() == source.resolve():
        raise UserError(f"The output {dest} would overwrite the source: pass another output directory with -o.")
    yield from iter_quantize(source, dest, target, allow_requantize=allow_requantize, nthread=nthread)


def _from_hf(
    source: Path,
    wanted: list[str],
    out: Path,
    stem: str,
    allow_requantize: bool,
    pre_tokenizer: str | None,
    nthread: int | None,
    compute_dtype: str,
    bnb_checks: dict[str, bool],
) -> Iterator[QuantProgress]:
    from localrun.quantize.gguf_quant import describe_gguf

    for target in [t for t in wanted if t in BNB_TYPES]:
        yield from _bnb_one(source, target, out / f"{stem}-{target.lower()}", compute_dtype, bnb_checks)
    for target in [t for t in wanted if t in FLOAT_TYPES]:
        dest = out / f"{stem}-{target}.gguf"
        yield from _convert_events(source, dest, target, pre_tokenizer)
        yield QuantProgress("done", target, 1.0, f"wrote {dest}", describe_gguf(dest, target=target))
    quant_targets = [t for t in wanted if t not in FLOAT_TYPES and t not in BNB_TYPES]
    if not quant_targets:
        return
    if "F16" in wanted:  # the F16 output doubles as the intermediate
        for target in quant_targets:
            yield from _quantize_one(out / f"{stem}-F16.gguf", target, out / f"{stem}-{target}.gguf", False, nthread)
        return
    with tempfile.TemporaryDirectory(dir=out, prefix=".localrun-f16-") as tmp_dir:
        intermediate = Path(tmp_dir) / f"{stem}-F16.partial"
        yield from _convert_events(source, intermediate, "F16", pre_tokenizer)
        for target in quant_targets:
            yield from _quantize_one(intermediate, target, out / f"{stem}-{target}.gguf", allow_requantize, nthread)


def _convert_events(source: Path, dest: Path, out_type: str, pre_tokenizer: str | None) -> Iterator[QuantProgress]:
    """Re-emit converter steps as QuantProgress."""
    from localrun.quantize.to_gguf import iter_convert

    for step in iter_convert(source, dest, out_type=out_type, pre_tokenizer=pre_tokenizer):
        yield QuantProgress("convert", out_type, step.fraction, step.message)


def _bnb_one(
    source: Path, target: str, dest: Path, compute_dtype: str, checks: dict[str, bool]
) -> Iterator[QuantProgress]:
    from localrun.backends.hf_load import check_remote_code, check_weights
    from localrun.quantize.bnb import quantize_bnb

    # refused before any progress line: pickles and repository code only when asked for, as in chat
    check_remote_code(source, trust_remote_code=checks["trust_remote_code"])
    check_weights(source, allow_pickle=checks["allow_pickle"])
    yield QuantProgress("bnb", target, 0.0, f"loading {source.name} with bitsandbytes {target}")
    result = quantize_bnb(source, dest, mode=target.lower(), compute_dtype=compute_dtype, **checks)
    qr = QuantResult(target, result.path, result.size_bytes, result.bits_per_weight, result.n_weights)
    yield QuantProgress(
        "done", target, 1.0, f"wrote {dest} (memory footprint {result.footprint_bytes / 2**20:.1f} MiB)", qr
    )
