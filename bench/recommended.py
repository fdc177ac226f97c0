"""Do the default model's recommended settings give sensible first answers? Ten simple questions, five seeds, both backends.

Loads the default model (SmolLM2-135M-Instruct Q4_1) once per backend (llama.cpp on the GGUF; transformers on the
same GGUF, dequantised) and asks each question under each candidate setting with seeds 0-4. An answer passes when
it contains the expected word (case-insensitive, whole word). A reply stops as soon as the word appears, or after
--max-tokens. A candidate passes when, on both backends, every seed answers at least 9 of the 10 questions.
Writes bench/results/recommended.json; the catalog's recommended settings (models/smollm2.json) should be a
candidate that passes.

Run: python bench/recommended.py [--seeds 5] [--max-tokens 40] [--backends llamacpp,hf]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Simple questions the default model answers correctly at temperature 0 (so a wrong answer is the sampler's doing).
QUESTIONS = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of England?", ("london",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What do bees make?", ("honey",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is frozen water called?", ("ice",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
)
SYSTEM = "You are a helpful assistant."
# Each candidate: a system prompt and the sampling values a catalog manifest may recommend.
# Explored on llama.cpp (seeds 0-4, n_threads 1, max_tokens 32): greedy passes; t 0.1 with top_p 0.9 misses 2 on
# seed 1 (it starts in German or French), with or without repeat penalty 1.1; min_p 0.1 at t 0.2-0.3 and an
# "Answer in English" system prompt do worse (the off-language first token is not in the tail). Kept: the measured
# setting before, and the one chosen.
CANDIDATES: dict[str, dict[str, Any]] = {
    "before: t 0.1, top_p 0.9, rp 1.1": {"system": SYSTEM, "temperature": 0.1, "top_p": 0.9, "repeat_penalty": 1.1},
    "t 0.05, top_p 0.9, rp 1.1": {"system": SYSTEM, "temperature": 0.05, "top_p": 0.9, "repeat_penalty": 1.1},
}
PASS_PER_SEED = 9


def _hit(text: str, words: tuple[str, ...]) -> bool:
    low = text.lower()
    return any(re.search(rf"\b{re.escape(w)}\b", low) for w in words)


def ask(backend: Any, question: str, words: tuple[str, ...], system: str | None, params: Any) -> tuple[bool, str]:
    """One answer; stops as soon as an expected word shows up (the rest of the reply cannot undo it)."""
    from localrun.engine.chat import ChatSession

    session = ChatSession(backend, system=system)
    cancel = threading.Event()
    text = ""
    for event in session.send(question, params, cancel=cancel):
        text += event.text
        if _hit(text, words):
            cancel.set()
    return _hit(text, words), text.strip()


def run_backend(
    name: str, seeds: int, max_tokens: int, candidates: dict[str, dict[str, Any]], n_threads: int | None
) -> dict[str, Any]:
    from localrun.backends import load_backend
    from localrun.settings import LoadOptions, SamplingParams

    backend = load_backend(None, LoadOptions(backend=name, n_threads=n_threads))
    out: dict[str, Any] = {}
    try:
        for label, settings in candidates.items():
            sampling = {k: v for k, v in settings.items() if k != "system"}
            per_seed, misses = [], []
            started = time.perf_counter()
            for seed in range(seeds):
                params = SamplingParams(**sampling, seed=seed, max_tokens=max_tokens)
                hits = 0
                for question, words in QUESTIONS:
                    ok, text = ask(backend, question, words, settings.get("system"), params)
                    hits += ok
                    if not ok:
                        misses.append({"seed": seed, "question": question, "answer": text[:160]})
                per_seed.append(hits)
                print(f"  {name} · {label} · seed {seed}: {hits}/{len(QUESTIONS)}", flush=True)
            out[label] = {"hits_per_seed": per_seed, "min": min(per_seed), "misses": misses}
            print(f"{name:9} {label:40} hits per seed {per_seed} ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        backend.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=40, help="longest reply when the word does not show up")
    parser.add_argument("--backends", default="llamacpp,hf")
    parser.add_argument("--n-threads", type=int, default=None, help="CPU threads (on a busy machine: 1)")
    parser.add_argument("--only", default=None, help="run only the candidates whose label contains this text")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recommended.json")
    args = parser.parse_args()
    candidates = {k: v for k, v in CANDIDATES.items() if args.only is None or args.only in k}
    backends = [b for b in args.backends.split(",") if b]
    results = {b: run_backend(b, args.seeds, args.max_tokens, candidates, args.n_threads) for b in backends}
    verdicts = {label: all(results[b][label]["min"] >= PASS_PER_SEED for b in backends) for label in candidates}
    record = {
        "questions": [{"question": q, "expected": list(w)} for q, w in QUESTIONS],
        "seeds": list(range(args.seeds)),
        "max_tokens": args.max_tokens,
        "pass_rule": f"every seed answers at least {PASS_PER_SEED} of {len(QUESTIONS)} on every backend",
        "candidates": candidates,
        "results": results,
        "pass": verdicts,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out)
    for label, ok in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
