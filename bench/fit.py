"""Estimated vs measured memory on CPU, for any GGUF at several context sizes.

Each measurement runs in a fresh subprocess: RSS depends on what the process loaded before. What is measured:
peak RSS (ru_maxrss) minus the RSS of the same process after `import llama_cpp`, i.e. the memory loading the
model and generating adds. llama.cpp mmaps the weights, so a short generation (64 prompt tokens, 32 new ones:
96 cells filled) runs first to touch every weight page. The estimate compared is `fit.ram_resident_bytes` for
the same number of filled cells; the allocation view (`fit.estimate().total_bytes`, what a GPU would need) is
recorded next to it. The model is loaded as localrun's llama.cpp backend loads it (llama-cpp-python's defaults:
flash attention off, full-size sliding-window cache).

Run:
  python bench/fit.py                                   the default model at 512, 2048 and 8192
  python bench/fit.py A.gguf B.gguf --ctx 2048 --ctx 32768
  python bench/fit.py --tiny /tmp/tiny --ctx 2048 --ctx 8192 --ctx 32768
                                                        tiny random llama, qwen2, gemma2, phi3 and gemma3 GGUFs
                                                        (bench/tiny_gguf.py), made first when missing
Rows of models not measured in a run are kept in --out (their estimates recomputed when the file is at hand).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

DEFAULT_CONTEXTS = (512, 2048, 8192)
PROMPT_TOKENS = 64
NEW_TOKENS = 32

_CHILD = r"""
import json, resource, sys
import psutil
import llama_cpp
model, n_ctx, n_prompt, n_new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
baseline = psutil.Process().memory_info().rss
llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=0, verbose=False)
span = min(40000, llm.n_vocab() - 1000)
prompt = [1000 + (i * 7919) % span for i in range(n_prompt)]
made = 0
for _ in llm.generate(prompt, temp=0.0):  # no stop at end-of-text: exactly n_prompt + n_new cells are filled
    made += 1
    if made >= n_new:
        break
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "cells": llm.n_tokens}))
"""


def measure(model: Path, *, n_ctx: int, n_prompt: int, threads: int) -> dict:
    """Load and generate in a fresh interpreter; return its baseline and peak RSS."""
    args = [sys.executable, "-c", _CHILD, str(model), str(n_ctx), str(n_prompt), str(NEW_TOKENS), str(threads)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {model.name} at {n_ctx} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate_columns(model: Path, n_ctx: int, n_tokens_used: int, measured: int) -> dict:
    """The resident estimate and the allocation view for one row, with the error against the measurement."""
    from localrun.models import fit
    from localrun.models.gguf_info import inspect_gguf

    info = inspect_gguf(model)
    estimated = fit.ram_resident_bytes(info, n_ctx=n_ctx, n_tokens_used=n_tokens_used)
    allocated = fit.estimate(info, n_ctx=n_ctx)
    return {
        "estimated_resident_bytes": estimated,
        "error_pct": round(100 * (estimated - measured) / measured, 1),
        "estimate_allocated_bytes": allocated.total_bytes,
        "weights_bytes": allocated.weights_bytes,
        "kv_cache_bytes": allocated.kv_cache_bytes,
        "compute_reserved_bytes": allocated.compute_bytes,
        "architecture": info.architecture,
        "vocab_size": info.vocab_size,
        "sliding_window": info.sliding_window,
    }


def _models(args: argparse.Namespace) -> list[Path]:
    from localrun.models.catalog import default_model_path

    models = [Path(p) for p in args.models]
    if args.tiny is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from tiny_gguf import SPECS, write_tiny_gguf

        args.tiny.mkdir(parents=True, exist_ok=True)
        for arch in SPECS:
            path = args.tiny / f"tiny-{arch}.gguf"
            if not path.is_file():
                write_tiny_gguf(arch, path)
            models.append(path)
    return models or [default_model_path()]


def _kept_rows(out: Path, measured_names: set[str]) -> list[dict]:
    """Rows from an earlier run for models not measured now; estimates recomputed where the file is here."""
    from localrun.models.catalog import default_model_path

    if not out.is_file():
        return []
    previous = json.loads(out.read_text())
    kept = []
    for row in previous.get("rows", []):
        name = row.get("model", previous.get("model"))
        if name in measured_names:
            continue
        row = {"model": name, **row}
        path = Path(row.get("path") or "")
        if not path.is_file() and name == default_model_path().name:
            path = default_model_path()
        if path.is_file():
            used = row["prompt_tokens"] + row["new_tokens"]
            row.update(estimate_columns(path, row["n_ctx"], used, row["measured_added_rss_bytes"]))
        kept.append(row)
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="GGUF files (default: the default model)")
    parser.add_argument("--ctx", type=int, action="append", help="context sizes (default: 512, 2048, 8192)")
    parser.add_argument("--tiny", type=Path, help="also measure the tiny random GGUFs kept in this directory")
    parser.add_argument("--full-context", action="store_true", help="also fill a 512-token context completely")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fit-cpu.json")
    args = parser.parse_args()

    from localrun.hardware import physical_cores

    threads = physical_cores()
    contexts = args.ctx or list(DEFAULT_CONTEXTS)
    cases = [(ctx, PROMPT_TOKENS) for ctx in contexts] + ([(512, 512 - NEW_TOKENS)] if args.full_context else [])
    models = _models(args)
    rows = []
    for model in models:
        for n_ctx, n_prompt in cases:
            got = measure(model, n_ctx=n_ctx, n_prompt=n_prompt, threads=threads)
            measured = got["peak_rss_bytes"] - got["baseline_rss_bytes"]
            row = {
                "model": model.name,
                "path": str(model.resolve()),
                "n_ctx": n_ctx,
                "prompt_tokens": n_prompt,
                "new_tokens": NEW_TOKENS,
                "measured_added_rss_bytes": measured,
                "baseline_rss_bytes": got["baseline_rss_bytes"],
            }
            row.update(estimate_columns(model, n_ctx, n_prompt + NEW_TOKENS, measured))
            rows.append(row)
            print(
                f"{model.name:<36} ctx {n_ctx:>6} prompt {n_prompt:>4}: measured {measured / 1e6:7.1f} MB, "
                f"estimated {row['estimated_resident_bytes'] / 1e6:7.1f} MB ({row['error_pct']:+.1f}%)",
                flush=True,
            )
    rows = _kept_rows(args.out, {m.name for m in models}) + rows
    result = {
        "threads": threads,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "measured": "peak RSS (ru_maxrss) minus RSS after `import llama_cpp`, fresh process per row, 96 cells filled",
        "acceptance": "abs(error_pct) <= 10",
        "all_within_10pct": all(abs(r["error_pct"]) <= 10 for r in rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["all_within_10pct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
