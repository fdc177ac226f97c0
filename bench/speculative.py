"""Speculative decoding, greedy, a 256-token answer: ours against our plain decode (same run,
interleaved) and against llama.cpp's `llama-speculative-simple` on the same target/draft pair.

    python bench/speculative.py [--cache DIR] [--threads N] [--reps 3] [--n-gen 256] [--only NAME ...]

Pairs, all made by `localrun quantize` from the default model: f32-q8 (F32 target, Q8_0 draft;
also run by llama-speculative-simple with --draft-max 4), and in adaptive mode f32-q4 (F32/Q4_0),
f16-q4 (F16/Q4_0), self-q4 (the default Q4_1 with its own Q4_0); lookup: prompt lookup on a prompt
whose answer copies its input, timed over the answer itself (up to its end-of-sequence: with EOS ignored
the model goes on past its answer into text that copies nothing); lookup-list: the list prompt of
earlier runs, 256 tokens with EOS ignored, for comparison. Writes bench/results/speculative-cpu.json.

Under load: python bench/speculative.py --clients 4 [--rounds 2] [--n-gen 128]. `localrun serve --parallel C` on
the F32 target, plain and with the Q8_0 draft, the servers taking turns (rounds interleaved): C clients at once
asking C different stories (greedy, exactly --n-gen tokens each), then one alone. Records total tokens/s with C
clients and alone for both, and their ratios; writes bench/results/speculative-load-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from _common import default_model, llama_tool, localrun, median, physical_cores, run, write_result

STORY = "Write a short story about a robot who learns to paint, in about three paragraphs."
LIST = (
    "Repeat this list with one change, replacing plums with peaches, and keep everything else exactly: "
    + ", ".join(
        f"item {i}: {w}"
        for i, w in enumerate(
            "apples pears plums cherries grapes lemons limes melons figs dates kiwis mangoes papayas".split()
        )
    )
    + "."
)
# A passage the default model does copy (most of it; its answer ends at its own EOS), with one edit asked for.
COPY = (
    "Repeat the following text exactly, but write 'dog' instead of 'cat':\n\n"
    "The cat sat by the window every morning, watching the birds in the garden. When the sun rose over the "
    "hills, the cat would stretch, yawn, and walk slowly to the kitchen, where an old woman poured fresh milk "
    "into a small blue bowl. After breakfast, the cat climbed the stairs, curled up on a soft red blanket, and "
    "slept until the church bells rang at noon. In the afternoon the cat went out through the back door and "
    "wandered along the stone wall at the end of the lane, stopping now and then to sniff the roses or to chase "
    "a leaf blown by the wind. The children from the farm next door always waved when they saw the cat, and "
    "sometimes they brought it a piece of cheese. When evening came, the cat returned home, sat by the fire, and "
    "listened to the old woman read stories aloud until the lamp was turned off and the house fell quiet."
)


def make_models(cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    wanted = ("F32", "F16", "Q8_0", "Q4_0")
    found = {t: next(iter(sorted(cache.glob(f"*{t}*.gguf"))), None) for t in wanted}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        args = ["quantize", "default", "--allow-requantize", "-o", str(cache)]
        for t in missing:
            args += ["--to", t]
        localrun(*args)
        found = {t: next(iter(sorted(cache.glob(f"*{t}*.gguf")))) for t in wanted}
    return {**found, "default": default_model()}


def ours(target: Path, threads: int, reps: int, n_gen: int, prompt: str, *flags: str) -> dict:
    out = localrun(
        "bench",
        str(target),
        *flags,
        "--json",
        "--reps",
        str(reps),
        "--n-gen",
        str(n_gen),
        "--n-threads",
        str(threads),
        "--prompt",
        prompt,
    )
    return json.loads(out.stdout)


def theirs(target: Path, draft: Path, threads: int, n_gen: int, prompt_text: str, draft_max: int) -> dict:
    out = run(
        [
            str(llama_tool("llama-speculative-simple")),
            "-m",
            str(target),
            "-md",
            str(draft),
            "--spec-type",
            "draft-simple",
            "--spec-draft-n-max",
            str(draft_max),
            "-p",
            prompt_text,
            "-n",
            str(n_gen),
            "--temp",
            "0",
            "-t",
            str(threads),
            "-td",
            str(threads),
            "-c",
            "4096",
            "--ignore-eos",
        ]
    )
    log = out.stdout + out.stderr
    speed = float(re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", log).group(1))
    accept = float(re.search(r"accept\s+=\s+([\d.]+)%", log).group(1)) / 100
    return {"decode_tps": speed, "acceptance_rate": accept}


def chat_text(target: Path, prompt: str) -> str:
    """The chat-formatted prompt, so llama-speculative-simple answers the same request."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from localrun.backends import load_backend
    from localrun.settings import LoadOptions

    b = load_backend(target, LoadOptions(n_ctx=256))
    try:
        return b.render_chat([{"role": "user", "content": prompt}])
    finally:
        b.close()


TOPICS = ["a robot who learns to paint", "a lighthouse keeper", "a lost kite", "a dragon who bakes bread"]
TOPICS += ["a clockmaker's apprentice", "a whale who sings", "a city under the sea", "a fox and a crow"]


def load_round(base: str, clients: int, n_gen: int) -> dict:
    """clients requests at once (all threads started together), then the first alone: tokens/s of each."""
    import threading
    import time

    import openai

    api = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=900)
    model = api.models.list().data[0].id

    def ask(topic: str, out: list) -> None:
        reply = api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Write a short story about {topic}."}],
            max_tokens=n_gen,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        out.append((reply.choices[0].message.content, reply.usage.completion_tokens))

    ask(TOPICS[-1], [])  # warm-up: the first request pays for page faults and thread start-up
    got: list = []
    threads = [threading.Thread(target=ask, args=(TOPICS[i % len(TOPICS)], got)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    together_s = time.perf_counter() - t0
    alone: list = []
    t0 = time.perf_counter()
    ask(TOPICS[0], alone)
    alone_s = time.perf_counter() - t0
    return {
        "tokens_per_s": sum(n for _, n in got) / together_s,
        "alone_tokens_per_s": alone[0][1] / alone_s,
        "texts": sorted(text for text, _ in got),
    }


def under_load(m: dict[str, Path], threads: int, clients: int, rounds: int, n_gen: int) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_common import serve

    flags = ["--parallel", str(clients), "--n-ctx", "1024", "--n-threads", str(threads)]
    sides = {"plain": [], "draft": ["--draft", str(m["Q8_0"])]}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for rnd in range(rounds):
        for name in sides if rnd % 2 == 0 else reversed(list(sides)):
            with serve(str(m["F32"]), *flags, *sides[name]) as base:
                runs[name].append(load_round(base, clients, n_gen))
            print(f"round {rnd + 1} {name}: {runs[name][-1]['tokens_per_s']:.1f} tok/s with {clients}", flush=True)
    figures = {
        name: {
            "tokens_per_s": median([r["tokens_per_s"] for r in rs]),
            "alone_tokens_per_s": median([r["alone_tokens_per_s"] for r in rs]),
        }
        for name, rs in runs.items()
    }
    return {
        "clients": clients,
        "rounds": rounds,
        "n_gen": n_gen,
        "threads": threads,
        "target": m["F32"].name,
        "draft": m["Q8_0"].name,
        "figures": figures,
        "load_ratio": figures["draft"]["tokens_per_s"] / figures["plain"]["tokens_per_s"],
        "alone_ratio": figures["draft"]["alone_tokens_per_s"] / figures["plain"]["alone_tokens_per_s"],
        "same_texts": all(d["texts"] == p["texts"] for d, p in zip(runs["draft"], runs["plain"], strict=True)),
        "runs": {name: [{k: v for k, v in r.items() if k != "texts"} for r in rs] for name, rs in runs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/localrun/bench-spec")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=None, help="f32-q8 f32-q4 f16-q4 self-q4 lookup lookup-list")
    ap.add_argument("--name", default="speculative-cpu")
    ap.add_argument("--clients", type=int, default=0, help="under load: this many clients at once (see above)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    threads = a.threads or physical_cores()
    m = make_models(a.cache)
    if a.clients:
        result = under_load(m, threads, a.clients, a.rounds, a.n_gen)
        path = write_result("speculative-load-cpu", result)
        print(f"draft/plain: {result['load_ratio']:.2f} with {a.clients} clients, {result['alone_ratio']:.2f} alone")
        print(f"written to {path}")
        return
    cases = {
        "f32-q8": (m["F32"], ["--draft", str(m["Q8_0"])], STORY, m["Q8_0"]),
        "f32-q4": (m["F32"], ["--draft", str(m["Q4_0"])], STORY, None),
        "f16-q4": (m["F16"], ["--draft", str(m["Q4_0"])], STORY, None),
        "self-q4": (m["default"], ["--draft", str(m["Q4_0"])], STORY, None),
        "lookup": (m["default"], ["--lookup", "--until-eos"], COPY, None),
        "lookup-list": (m["default"], ["--lookup"], LIST, None),
    }
    results = {}
    for name, (target, flags, prompt, llama_draft) in cases.items():
        if a.only and name not in a.only:
            continue
        r = {"target": str(target), "flags": flags}
        if llama_draft is None:
            r["ours"] = ours(target, threads, a.reps, a.n_gen, prompt, *flags)
        else:  # ours (itself interleaved with plain) and llama-speculative-simple, alternating
            text, runs, spec = chat_text(target, prompt), [], []
            for rep in range(a.reps):
                order = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
                for side in order:
                    if side == "ours":
                        runs.append(ours(target, threads, 1, a.n_gen, prompt, *flags))
                    else:
                        spec.append(theirs(target, llama_draft, threads, a.n_gen, text, 4))
            r["ours_runs"] = runs
            r["llama_speculative_simple"] = spec
            ours_tps = median([x["draft_decode_tps"] for x in runs])
            r["ours"] = {
                "draft_decode_tps": ours_tps,
                "plain_decode_tps": median([x["plain_decode_tps"] for x in runs]),
                "acceptance_rate": median([x["acceptance_rate"] for x in runs]),
            }
            r["ours"]["speedup"] = ours_tps / r["ours"]["plain_decode_tps"]
            r["ours_over_llama_speculative_simple"] = ours_tps / median([x["decode_tps"] for x in spec])
        results[name] = r
        o = r["ours"]
        line = f"{name:<11} speedup {o['speedup']:.2f}x vs plain, acceptance {o['acceptance_rate'] or 0:.0%}"
        if "ours_over_llama_speculative_simple" in r:
            line += f", {r['ours_over_llama_speculative_simple']:.2f}x llama-speculative-simple"
        print(line, flush=True)
    path = write_result(a.name, {"threads": threads, "reps": a.reps, "n_gen": a.n_gen, "cases": results})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
