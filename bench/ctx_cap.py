"""Decode speed at depth 512 against the context size, with and without flash attention, interleaved:
the measurement behind choosing the context from memory alone, with no fixed cap (engine.plan.choose_context):
with flash attention a larger context does not slow decoding down.

    python bench/ctx_cap.py [--threads N] [--reps 5] [--configs 1024:off,8192:off,8448:off,8192:auto,16384:auto,32768:auto]

Without flash attention llama.cpp keeps V transposed (one row of n_ctx values per channel), so a
decode step reads rows n_ctx*2 bytes apart; 8448 (not a power of two) separates page/set aliasing
from the size itself. Writes bench/results/ctx-cap-cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import REPO, default_model, physical_cores, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--configs", default="1024:off,8192:off,8448:off,1024:auto,8192:auto,16384:auto,32768:auto")
    ap.add_argument("--name", default="ctx-cap-cpu")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from localrun.backends.llama_ctx import LlamaRunner, open_model

    threads = a.threads or physical_cores()
    model = open_model(str(default_model()))
    configs = [(int(c.split(":")[0]), c.split(":")[1]) for c in a.configs.split(",")]
    runners = {c: LlamaRunner(model, n_ctx=c[0], n_threads=threads, flash_attn=c[1]) for c in configs}
    text = b"The history of computing is a story of people building tools to think with. " * 60
    ids = model.tokenize(text, add_bos=True, special=True)[:512]
    tps: dict[str, list[float]] = {f"{n}:{fa}": [] for n, fa in configs}
    for _ in range(a.reps):
        for (n, fa), r in runners.items():
            r.clear()
            r.eval(ids)
            t0 = time.perf_counter()
            for _ in range(a.n_gen):
                r.step(100)
            tps[f"{n}:{fa}"].append(a.n_gen / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in tps.items()}
    path = write_result(a.name, {"threads": threads, "depth": 512, "n_gen": a.n_gen, "decode_tps": tps, "median": med})
    for k, v in med.items():
        print(f"{k:<12} {v:8.1f} tok/s")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
