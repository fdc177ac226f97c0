"""How long and how much memory the GGUF validator spends refusing header-only files that claim huge sizes.

The target: a header-only file claiming 2^32-1 layers is refused in under 50 ms with under 20 MB of extra memory
(tracemalloc peak, with the imports already warm). Other lying headers (50 million layers, 2^63 tensors, 2^60
token strings) are measured beside it, and the real default model's full inspection is timed in the same
interleaved rounds for scale.

Run: python bench/gguf_header.py [--rounds 20] [--out bench/results/gguf-header.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LIMIT_S = 0.050
LIMIT_BYTES = 20 * 1024 * 1024


def _cases(directory: Path) -> dict[str, Path]:
    import gguf_corpus as corpus

    files = {
        "header-only 2^32-1 layers": corpus.build(
            corpus.tiny_kvs(**{"llama.block_count": (corpus.U32, 2**32 - 1)}), []
        ),
        "header-only 50M layers": corpus.build(corpus.tiny_kvs(**{"llama.block_count": (corpus.U32, 50_000_000)}), []),
        "header-only 2^63 tensors": corpus.build(corpus.tiny_kvs(), [], counts=(2**63, 7), data=False),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = directory / (name.replace(" ", "-").replace("^", "") + ".gguf")
        paths[name].write_bytes(data)
    return paths


def _refuse(path: Path) -> tuple[float, int]:
    """(seconds, tracemalloc peak bytes) for one inspect_gguf call that must raise UserError."""
    from localrun.errors import UserError
    from localrun.models.gguf_info import inspect_gguf

    tracemalloc.start()
    start = time.perf_counter()
    try:
        inspect_gguf(path)
    except UserError:
        pass
    else:
        raise SystemExit(f"{path} was accepted: the validator is broken")
    took = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return took, peak


def _time_default(path: Path) -> float:
    from localrun.models.gguf_info import inspect_gguf

    start = time.perf_counter()
    inspect_gguf(path)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf-header.json")
    args = parser.parse_args()
    from localrun.models.catalog import default_model_path

    default = default_model_path()
    _time_default(default)  # warm the imports (gguf, numpy) and the page cache
    with tempfile.TemporaryDirectory() as tmp:
        cases = _cases(Path(tmp))
        timings: dict[str, list[float]] = {name: [] for name in cases}
        peaks: dict[str, list[int]] = {name: [] for name in cases}
        default_s = []
        for _ in range(args.rounds):  # interleaved, so machine noise hits every case alike
            for name, path in cases.items():
                took, peak = _refuse(path)
                timings[name].append(took)
                peaks[name].append(peak)
            default_s.append(_time_default(default))
    results = {
        name: {
            "median_ms": round(statistics.median(timings[name]) * 1e3, 3),
            "max_ms": round(max(timings[name]) * 1e3, 3),
            "peak_tracemalloc_bytes": max(peaks[name]),
            "within_limits": max(timings[name]) < LIMIT_S and max(peaks[name]) < LIMIT_BYTES,
        }
        for name in cases
    }
    report = {
        "limits": {"seconds": LIMIT_S, "tracemalloc_peak_bytes": LIMIT_BYTES},
        "rounds": args.rounds,
        "cases": results,
        "default_model_inspect_median_ms": round(statistics.median(default_s) * 1e3, 3),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    for name, row in results.items():
        print(
            f"{name:28} median {row['median_ms']:7.3f} ms  max {row['max_ms']:7.3f} ms  "
            f"peak {row['peak_tracemalloc_bytes'] / 1024:8.1f} KiB  {'ok' if row['within_limits'] else 'OVER LIMIT'}"
        )
    print(f"{'default model (valid, full)':28} median {report['default_model_inspect_median_ms']:7.3f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(row["within_limits"] for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
