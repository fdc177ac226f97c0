"""Cold start, whole processes: `localrun chat -p ... --max-tokens 16` end to end against a bare
llama-cpp-python script doing the same (load, chat template, 16 greedy tokens), interleaved.

    python bench/cold_start.py [--reps 7] [--model M.gguf]

Writes bench/results/cold-start-cpu.json; the goal is ours <= 1.1 x bare (medians).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from _common import REPO, default_model, median, physical_cores, write_result

PROMPT = "What is the capital of France?"
BARE = """
import sys, llama_cpp
t = int(sys.argv[3])
llm = llama_cpp.Llama(sys.argv[1], n_ctx=8192, n_threads=t, n_threads_batch=t, flash_attn=True, verbose=False)
out = llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}], max_tokens=16, temperature=0.0)
print(out["choices"][0]["message"]["content"])
"""


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=REPO)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--model", default=None)
    ap.add_argument("--name", default="cold-start-cpu")
    a = ap.parse_args()
    model = a.model or str(default_model())
    ours_cmd = [
        sys.executable,
        "-m",
        "localrun.cli",
        "chat",
        model,
        "-p",
        PROMPT,
        "--max-tokens",
        "16",
        "--temperature",
        "0",
    ]
    bare_cmd = [sys.executable, "-c", BARE, model, PROMPT, str(physical_cores())]  # the same threads as ours
    timed(ours_cmd), timed(bare_cmd)  # warm the page cache for both
    ours, bare = [], []
    for rep in range(a.reps):
        for side in ("ours", "bare") if rep % 2 == 0 else ("bare", "ours"):
            (ours if side == "ours" else bare).append(timed(ours_cmd if side == "ours" else bare_cmd))
    result = {"model": model, "reps": a.reps, "ours_s": ours, "bare_s": bare, "ratio": median(ours) / median(bare)}
    path = write_result(a.name, result)
    print(
        f"cold start: ours {median(ours):.2f} s, bare {median(bare):.2f} s, ratio {result['ratio']:.3f} (goal <= 1.1)"
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
