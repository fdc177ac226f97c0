"""GGUF -> Q8_0, Q6_K, Q4_K_M, ... with llama.cpp's own quantizer (llama_model_quantize).

The quantizer runs in a child process: llama.cpp logs one line per tensor to stderr, which gives honest
progress, and Ctrl-C can stop it at once (a C call in a thread cannot be interrupted).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from localrun.errors import UserError
from localrun.quantize import QuantProgress, QuantResult, atomic_output, check_disk_space

# llama.cpp ftypes we do not offer, and why.
EXCLUDED_TYPES = {
    "IQ1_S": "needs an importance matrix",
    "IQ1_M": "needs an importance matrix",
    "IQ2_XXS": "needs an importance matrix",
    "IQ2_XS": "needs an importance matrix",
    "IQ2_S": "needs an importance matrix",
    "IQ2_M": "needs an importance matrix",
    "IQ3_XXS": "needs an importance matrix",
    "IQ3_XS": "needs an importance matrix (its IQ3_XXS tensors)",
    "Q2_K_S": "needs an importance matrix",
    "TQ1_0": "only for ternary-trained models",
    "TQ2_0": "only for ternary-trained models",
    "Q1_0": "only for binary-trained models",
    "Q2_0": "only for low-bit-trained models",
    "MXFP4_MOE": "only quantizes MoE experts",
    "NVFP4": "meant for NVFP4 checkpoints",
    "GUESSED": "not a real file type",
}

# Nominal bits per weight of each file type's main tensor type: used for the disk-space estimate only.
_NOMINAL_BPW = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_0": 5.5}
_NOMINAL_BPW |= {"Q5_K_M": 5.7, "Q5_K_S": 5.5, "Q4_1": 5.0, "Q4_0": 4.5, "Q4_K_M": 4.9, "Q4_K_S": 4.6}
_NOMINAL_BPW |= {"IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5, "IQ3_M": 3.7}
_NOMINAL_BPW |= {"IQ3_S": 3.44, "Q2_K": 3.0}

_FLOAT_TENSOR_TYPES = {"F32", "F16", "BF16"}
_PROGRESS_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FALLBACK_LINE = re.compile(
    r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\).*?falling back to\s+(\S+)"
)


@cache
def quant_types() -> dict[str, int]:
    """Offered file types (name -> llama_ftype), most bits first, read from llama_cpp's LLAMA_FTYPE_* constants."""
    import llama_cpp

    found: dict[str, int] = {}
    for attr in dir(llama_cpp):
        if not attr.startswith("LLAMA_FTYPE_"):
            continue
        name = attr.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
        if name not in EXCLUDED_TYPES:
            found[name] = int(getattr(llama_cpp, attr))
    return dict(sorted(found.items(), key=lambda kv: (-_NOMINAL_BPW.get(kv[0], 0.0), kv[0])))


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def describe_gguf(path: Path, *, target: str, fallbacks: tuple[str, ...] = ()) -> QuantResult:
    """Size, bits per weight and a histogram of tensor types, read back from the file itself."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    hist = Counter(t.tensor_type.name for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    bpw = 8.0 * n_bytes / n_weights if n_weights else 0.0
    types = dict(sorted(hist.items(), key=lambda kv: -kv[1]))
    return QuantResult(target, path, path.stat().st_size, bpw, n_weights, types, fallbacks)


@cache
def _source_info(path: Path, mtime_ns: int, size: int) -> tuple[str | None, int]:
    """(most common non-float matrix type or None, weight count); cached because GGUFReader parses the vocab."""
    from gguf import GGUFReader

    del mtime_ns, size  # cache key only
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path} is not a readable GGUF file ({exc}): pass a valid .gguf.") from None
    hist = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    quantized = [n for n, _ in hist.most_common() if n not in _FLOAT_TENSOR_TYPES]
    return (quantized[0] if quantized else None), sum(int(t.n_elements) for t in reader.tensors)


def source_info(path: Path) -> tuple[str | None, int]:
    """(quantized type or None, weight count) of a GGUF."""
    st = path.stat()
    return _source_info(path.resolve(), st.st_mtime_ns, st.st_size)


def _worker_command(src: Path, dst: Path, ftype: int, nthread: int, allow_requantize: bool) -> list[str]:
    args = [str(src), str(dst), str(ftype), str(nthread), "1" if allow_requantize else "0"]
    return [sys.executable, "-m", "localrun.quantize.gguf_quant", *args]


def _check_requantize(src: Path, target: str, allow_requantize: bool) -> str | None:
    """Refuse (or warn about) quantizing an already-quantized file; returns the warning text."""
    current = source_info(src)[0]
    if current is None:
        return None
    if not allow_requantize:
        raise UserError(
            f"{src.name} is already quantized ({current}): requantizing to {target} loses quality; "
            "start from an F16/BF16/F32 GGUF or the HF model, or pass --allow-requantize."
        )
    return f"requantizing {src.name} from {current} to {target}: quality will be lower than quantizing from F16"


def iter_quantize(
    src: str | Path,
    dst: str | Path,
    target: str,
    *,
    allow_requantize: bool = False,
    nthread: int | None = None,
) -> Iterator[QuantProgress]:
    """Quantize one GGUF to `target`, yielding progress per tensor and a final result event."""
    src, dst, target = Path(src), Path(dst), target.upper()
    types = quant_types()
    if target not in types:
        raise UserError(f"Unknown quantization type {target!r}: valid types are {', '.join(types)}.")
    if not src.is_file():
        raise UserError(f"The source {src} does not exist: pass an existing .gguf file.")
    warning = _check_requantize(src, target, allow_requantize)
    if warning:
        yield QuantProgress("warning", target, 0.0, warning)
    n_weights = source_info(src)[1]
    check_disk_space(dst.parent, int(n_weights * _NOMINAL_BPW.get(target, 8.5) / 8 * 1.25) + (32 << 20))
    threads = nthread or physical_cores()
    yield QuantProgress("quantize", target, 0.0, f"quantizing {src.name} to {target} on {threads} threads")
    started = time.perf_counter()
    with atomic_output(dst) as tmp:
        fallbacks = yield from _run_worker(src, tmp, target, types[target], threads, allow_requantize)
    result = describe_gguf(dst, target=target, fallbacks=tuple(fallbacks))
    elapsed = time.perf_counter() - started
    message = f"wrote {dst.name}: {result.size_bytes / 2**20:.1f} MiB, {result.bits_per_weight:.2f} bits/weight"
    yield QuantProgress("done", target, 1.0, f"{message} in {elapsed:.1f} s", result)


def _run_worker(
    src: Path, tmp: Path, target: str, ftype: int, threads: int, allow_requantize: bool
) -> Iterator[QuantProgress]:
    """Run the quantizer child, turning its per-tensor log lines into progress; returns the fallbacks."""
    cmd = _worker_command(src, tmp, ftype, threads, allow_requantize)
    env = dict(os.environ)
    # the child imports this module by name, also when localrun runs from a source checkout
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, errors="replace", env=env
    )
    fallbacks: list[str] = []
    tail: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail = (tail + [line.rstrip()])[-20:]
            if m := _FALLBACK_LINE.search(line):
                name, ncols, block, wanted, used = m.groups()
                fallbacks.append(f"{name}: {wanted} -> {used} ({ncols} columns not divisible by {block})")
            elif m := _PROGRESS_LINE.search(line):
                done, total = int(m.group(1)), int(m.group(2))
                yield QuantProgress("quantize", target, done / total, f"tensor {done}/{total} {m.group(3)}")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        detail = next((t for t in reversed(tail) if "error" in t.lower() or "failed" in t.lower()), "".join(tail[-1:]))
        if "imatrix" in detail:
            raise UserError(f"{target} needs an importance matrix for this model, which localrun does not make yet.")
        detail = " ".join(detail.split()).rstrip(".") or "no message"
        raise UserError(
            f"llama.cpp could not quantize {src.name} to {target} ({detail}): "
            "check that the source is a complete GGUF of a model type llama.cpp supports."
        )
    return fallbacks


def quantize_gguf(
    src: str | Path, dst: str | Path, target: str, *, allow_requantize: bool = False, nthread: int | None = None
) -> QuantResult:
    """Quantize without progress reporting; returns what was written."""
    result = None
    for event in iter_quantize(src, dst, target, allow_requantize=allow_requantize, nthread=nthread):
        result = event.result or result
    assert result is not None
    return result


def _worker_main(argv: list[str]) -> int:
    """Child process body: one llama_model_quantize call, llama.cpp logging straight to stderr."""
    import ctypes

    import llama_cpp

    src, dst, ftype, nthread, allow = argv
    # a NULL callback makes llama.cpp write its log (one line per tensor) to stderr itself
    llama_cpp.llama_log_set(llama_cpp.llama_log_callback(), ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(nthread)
    params.allow_requantize = allow == "1"
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
