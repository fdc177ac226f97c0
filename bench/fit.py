"""Estimated vs measured memory for the default model on CPU, at several context sizes.

Each measurement runs in a fresh subprocess: RSS depends on what the process loaded before. What is measured:
peak RSS (ru_maxrss) minus the RSS of the same process after `import llama_cpp`, i.e. the memory loading the
model and generating adds. llama.cpp mmaps the weights, so a short generation runs first to touch every weight
page. The estimate compared is `fit.ram_resident_bytes` for the same number of filled cells; the allocation
view (`fit.estimate().total_bytes`, what a GPU would need) is recorded next to it.

Run: python bench/fit.py [--out bench/results/fit-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CONTEXTS = (512, 2048, 8192)
PROMPT_TOKENS = 64
NEW_TOKENS = 32

_CHILD = r"""
import json, resource, sys
import psutil
import llama_cpp
model, n_ctx, n_prompt, n_new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
baseline = psutil.Process().memory_info().rss
llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=0, verbose=False)
prompt = [1000 + (i * 7919) % 40000 for i in range(n_prompt)]
llm.create_completion(prompt, max_tokens=n_new, temperature=0.0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": peak}))
"""


def measure(model: Path, *, n_ctx: int, n_prompt: int, threads: int) -> dict:
    """Load and generate in a fresh interpreter; return its baseline and peak RSS."""
    args = [sys.executable, "-c", _CHILD, str(model), str(n_ctx), str(n_prompt), str(NEW_TOKENS), str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fit-cpu.json")
    parser.add_argument("--full-context", action="store_true", help="also fill the 512-token context completely")
    args = parser.parse_args()

    from localrun import fit
    from localrun.catalog import default_model_path
    from localrun.gguf_info import inspect_gguf
    from localrun.hardware import physical_cores

    model = default_model_path()
    info = inspect_gguf(model)
    threads = physical_cores()
    cases = [(ctx, PROMPT_TOKENS) for ctx in CONTEXTS] + ([(512, 512 - NEW_TOKENS)] if args.full_context else [])
    rows = []
    for n_ctx, n_prompt in cases:
        got = measure(model, n_ctx=n_ctx, n_prompt=n_prompt, threads=threads)
        measured = got["peak_rss_bytes"] - got["baseline_rss_bytes"]
        estimated = fit.ram_resident_bytes(info, n_ctx=n_ctx, n_tokens_used=n_prompt + NEW_TOKENS)
        allocated = fit.estimate(info, n_ctx=n_ctx)
        rows.append(
            {
                "n_ctx": n_ctx,
                "prompt_tokens": n_prompt,
                "new_tokens": NEW_TOKENS,
                "measured_added_rss_bytes": measured,
                "estimated_resident_bytes": estimated,
                "error_pct": round(100 * (estimated - measured) / measured, 1),
                "baseline_rss_bytes": got["baseline_rss_bytes"],
                "estimate_allocated_bytes": allocated.total_bytes,
                "weights_bytes": allocated.weights_bytes,
                "kv_cache_bytes": allocated.kv_cache_bytes,
                "compute_reserved_bytes": allocated.compute_bytes,
            }
        )
        r = rows[-1]
        print(
            f"ctx {n_ctx:>5} prompt {n_prompt:>4}: measured {measured / 1e6:7.1f} MB, "
            f"estimated {estimated / 1e6:7.1f} MB ({r['error_pct']:+.1f}%)"
        )
    result = {
        "model": model.name,
        "threads": threads,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "measured": "peak RSS (ru_maxrss) minus RSS after `import llama_cpp`, fresh process per row",
        "acceptance": "abs(error_pct) <= 10",
        "all_within_10pct": all(abs(r["error_pct"]) <= 10 for r in rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["all_within_10pct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
