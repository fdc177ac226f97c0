"""First answers a user can trust: whole replies to simple questions, judged to their natural end.

Loads the default model (SmolLM2-135M-Instruct Q4_1) once per backend (llama.cpp on the GGUF; transformers on
the same GGUF, dequantised) and asks each of the QUESTIONS under each candidate setting with seeds 0-4, the loop
guard off and at most 256 new tokens, so every reply runs to its own end. A reply passes only when all hold:
- answer: it names the expected answer (case-insensitive, whole word);
- ends: it ends by itself (end of sequence) within the 256 tokens;
- no loop: no span repeats itself, by the engine's own definition (localrun.engine.repetition.find_loop);
- English: `is_english` below (letters mostly ASCII, and, from 5 words on, English function words among them).

The NORMAL prompts (lists, code, poems, counting) measure the loop guard's false stops: a reply that ends by
itself but which the guard would have stopped (find_loop fires) is a false stop. The same count is taken for a
few looser and stricter loop rules, which is how the rule in localrun.engine.repetition was chosen.
The questions were written before any run and none was dropped after one; each is recorded with its result.
This is a pass-rate bench, not a timing one: run it with `nice -n 10` on a busy machine.

Run: python bench/first_answers.py [--candidates "LABEL;LABEL"] [--backends llamacpp,hf] [--seeds 5] [--normal]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 256
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of England?", ("london",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color is grass?", ("green",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("How many hours are there in a day?", ("24", "twenty-four")),
    ("What do bees make?", ("honey",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is frozen water called?", ("ice",)),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What animal is known as the king of the jungle?", ("lion",)),
    ("In which country are the pyramids of Giza?", ("egypt",)),
)
# Normal replies whose form repeats on purpose: where a loop guard could stop too early.
NORMAL = (
    "List ten fruits.",
    "Count from 1 to 20.",
    "Write a short poem about the sea.",
    "Write a Python function that checks whether a number is prime.",
    "Give me five tips for sleeping better.",
    "Write the lyrics of a simple song with a chorus.",
    "Write an HTML page with a table of three rows.",
    "List the days of the week.",
)
SYSTEM = "You are a helpful assistant."
# Each candidate: a system prompt and the sampling values a catalog manifest may recommend.
_RP, _DRY = {"repeat_penalty": 1.1}, {"repeat_penalty": 1.1, "dry_multiplier": 0.8}
CANDIDATES: dict[str, dict[str, Any]] = {
    "before: t 0.05, top_p 0.9, rp 1.1": {"temperature": 0.05, "top_p": 0.9, **_RP},
    "greedy, rp 1.1": {"temperature": 0.0, **_RP},
    "greedy, rp 1.1, DRY 0.8": {"temperature": 0.0, **_DRY},
    "t 0.05, top_p 0.9, rp 1.1, DRY 0.8": {"temperature": 0.05, "top_p": 0.9, **_DRY},
    "t 0.05, top_p 0.5, rp 1.1, DRY 0.8": {"temperature": 0.05, "top_p": 0.5, **_DRY},
    "t 0.2, top_p 0.9, rp 1.1, DRY 0.8": {"temperature": 0.2, "top_p": 0.9, **_DRY},
}
# Loop rules compared on the same replies (localrun.engine.repetition's parameters); "engine" is the guard's own.
RULES: dict[str, dict[str, float]] = {
    "engine": {},
    "exact (share 1.0)": {"min_share": 1.0},
    "share 0.8": {"min_share": 0.8},
    "share 0.7": {"min_share": 0.7},
    "32 tokens": {"min_tokens": 32},
}
DUMP: list[dict[str, Any]] = []  # every reply, for --dump
FUNCTION_WORDS = frozenset(
    "the a an is are was were of in on at to and or for with it its this that as by from be has have do "
    "does not can you i we they he she there what which who".split()
)


def names_answer(text: str, words: tuple[str, ...]) -> bool:
    low = text.lower()
    return any(re.search(rf"\b{re.escape(w)}\b", low) for w in words)


def is_english(text: str) -> bool:
    """At least 95 % of the letters ASCII and, from 5 words on, at least 10 % English function words."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    if sum(c.isascii() for c in letters) < 0.95 * len(letters):
        return False
    words = re.findall(r"[a-z]+", text.lower())
    return len(words) < 5 or sum(w in FUNCTION_WORDS for w in words) >= 0.1 * len(words)


def reply(backend: Any, prompt: str, params: Any) -> tuple[str, list[int], str]:
    """(text, token ids, finish reason) of one whole reply, in a fresh chat with the system prompt."""
    from localrun.engine.chat import ChatSession

    session = ChatSession(backend, system=SYSTEM)
    text, ids, finish = "", [], ""
    for event in session.send(prompt, params):
        text += event.text
        ids.extend(event.token_ids)
        finish = event.finish_reason or finish
    return text.strip(), ids, finish


def text_of(backend: Any):
    return lambda token: backend.detokenize([token])


def judge(backend: Any, text: str, ids: list[int], finish: str, words: tuple[str, ...]) -> dict[str, bool]:
    from localrun.engine.repetition import find_loop

    return {
        "answer": names_answer(text, words),
        "ends": finish == "stop",
        "no_loop": find_loop(ids, text_of(backend)) is None,
        "english": is_english(text),
    }


def run_candidate(backend: Any, label: str, sampling: dict[str, Any], seeds: int) -> dict[str, Any]:
    from localrun.settings import SamplingParams

    fails: dict[str, int] = {"answer": 0, "ends": 0, "no_loop": 0, "english": 0}
    rows, passed = [], 0
    for question, words in QUESTIONS:
        ok_seeds = 0
        for seed in range(seeds):
            params = SamplingParams(**sampling, seed=seed, max_tokens=MAX_TOKENS, loop_guard=False)
            text, ids, finish = reply(backend, question, params)
            DUMP.append({"label": label, "prompt": question, "seed": seed, "finish": finish, "ids": ids, "text": text})
            verdict = judge(backend, text, ids, finish, words)
            for key, ok in verdict.items():
                fails[key] += not ok
            if all(verdict.values()):
                ok_seeds += 1
            else:
                bad = [k for k, ok in verdict.items() if not ok]
                rows.append(
                    {"question": question, "seed": seed, "failed": bad, "tokens": len(ids), "reply": text[:200]}
                )
        passed += ok_seeds
        print(f"    {question:52} {ok_seeds}/{seeds}", flush=True)
    total = len(QUESTIONS) * seeds
    print(f"  {label}: {passed}/{total} pass ({passed / total:.0%}); failures {fails}", flush=True)
    return {"passed": passed, "total": total, "rate": passed / total, "failures": fails, "failed_replies": rows}


def run_normal(backend: Any, sampling: dict[str, Any], seeds: int) -> dict[str, Any]:
    """The loop rules' stops on normal replies: among replies that end by themselves, false stops."""
    from localrun.engine.repetition import find_loop
    from localrun.settings import SamplingParams

    counts = {name: {"false_stops": 0, "loops_caught": 0} for name in RULES}
    ended, capped, examples = 0, 0, []
    for prompt in NORMAL:
        for seed in range(seeds):
            params = SamplingParams(**sampling, seed=seed, max_tokens=MAX_TOKENS, loop_guard=False)
            text, ids, finish = reply(backend, prompt, params)
            DUMP.append({"label": "normal", "prompt": prompt, "seed": seed, "finish": finish, "ids": ids, "text": text})
            natural = finish == "stop"
            ended, capped = ended + natural, capped + (not natural)
            for name, rule in RULES.items():
                at = find_loop(ids, text_of(backend), **rule)
                if at is not None:
                    counts[name]["false_stops" if natural else "loops_caught"] += 1
                    if natural:
                        examples.append({"rule": name, "prompt": prompt, "seed": seed, "at": at, "reply": text[:300]})
    print(f"  normal replies: {ended} ended by themselves, {capped} hit the cap; {counts}", flush=True)
    return {"ended": ended, "capped": capped, "rules": counts, "false_stop_examples": examples}


def run_backend(name: str, candidates: dict[str, dict[str, Any]], seeds: int, normal: bool) -> dict[str, Any]:
    from localrun.backends import load_backend
    from localrun.settings import LoadOptions

    backend = load_backend(None, LoadOptions(backend=name, n_threads=1))
    out: dict[str, Any] = {}
    try:
        for label, sampling in candidates.items():
            print(f"{name} · {label}", flush=True)
            out[label] = run_candidate(backend, label, sampling, seeds)
            if normal:
                out[label]["normal"] = run_normal(backend, sampling, seeds)
    finally:
        backend.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backends", default="llamacpp,hf")
    parser.add_argument("--candidates", default=None, help="labels separated by ; (default: all)")
    parser.add_argument("--normal", action="store_true", help="also count the loop guard's false stops")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "first-answers.json")
    parser.add_argument("--dump", type=Path, default=None, help="write every reply (text, ids) here as JSON")
    args = parser.parse_args()
    wanted = args.candidates.split(";") if args.candidates else list(CANDIDATES)
    candidates = {k: CANDIDATES[k] for k in wanted}
    results = {b: run_backend(b, candidates, args.seeds, args.normal) for b in args.backends.split(",") if b}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    merged = previous.get("results", {})
    for backend, by_label in results.items():
        merged.setdefault(backend, {}).update(by_label)
    record = {
        "questions": [{"question": q, "expected": list(w)} for q, w in QUESTIONS],
        "normal_prompts": list(NORMAL),
        "system": SYSTEM,
        "seeds": list(range(args.seeds)),
        "max_tokens": MAX_TOKENS,
        "pass_rule": "names the answer, ends by itself within 256 tokens, no loop (localrun.engine.repetition), English",
        "loop_rules": {k: v for k, v in RULES.items()},
        "candidates": {**previous.get("candidates", {}), **candidates},
        "results": merged,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out)
    if args.dump:
        args.dump.write_text(json.dumps(DUMP))
    return 0


if __name__ == "__main__":
    sys.exit(main())
