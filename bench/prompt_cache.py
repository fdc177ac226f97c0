"""More chats than slots: the next turn of a chat whose slot another chat took, on `localrun serve` (its
host-RAM prompt cache) and on `llama-server` (its --cache-ram), in one run.

Both servers get 2 slots of --slot-ctx tokens, the same model and threads. C chats (5 by default), each with a
system prompt of ~450 tokens of its own, ask their first question one after another, so each pushes an older chat
out of its slot; then each asks its second question (the whole chat so far is sent, as clients do). The second
turn's TTFT is the figure: evaluated again, it costs the whole prompt; put back from RAM, only the new tokens.
The same rounds run with `localrun serve --prompt-cache-mb 0` (no cache) for the gain. Servers take turns and
the rounds interleave (llama-server, localrun, no cache, then reversed), so drift hits all three.

Run: python bench/prompt_cache.py [--chats 5] [--rounds 3]    Needs llama-server from bench/llama_tools.sh.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_model, physical_cores, write_result  # noqa: E402
from serve_common import SAME_SAMPLING, SYSTEM, serve, stream_chat  # noqa: E402
from serve_load import llama_server  # noqa: E402

TOPICS = ["rivers", "bread", "owls", "trains", "violins", "glaciers", "bees", "comets"]


def chat(topic: str) -> list[dict]:
    system = f"{topic.title()} first. " + " ".join(f"Fact {i} about {topic}: it matters to people." for i in range(45))
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about {topic}."}]


def measure(base: str, chats: int, max_tokens: int) -> dict:
    import openai

    sampling = {"temperature": 0, "max_tokens": max_tokens, "extra_body": SAME_SAMPLING}
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    stream_chat(
        client, model, [SYSTEM, {"role": "user", "content": "Say hello."}], **sampling
    )  # first-request costs out
    talks = [chat(t) for t in TOPICS[:chats]]
    first = []
    for talk in talks:
        got = stream_chat(client, model, talk, **sampling)
        first.append(got["ttft_s"])
        talk += [{"role": "assistant", "content": got["text"]}, {"role": "user", "content": "And one more thing?"}]
    second = [stream_chat(client, model, talk, **sampling)["ttft_s"] for talk in talks]
    return {"first_ttft_s": first, "next_turn_ttft_s": second, "next_turn_ttft_median_s": statistics.median(second)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slot-ctx", type=int, default=2048)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or default_model()
    threads = physical_cores()
    flags = ["--parallel", "2", "--n-ctx", str(args.slot_ctx), "--n-threads", str(threads)]
    order = ["llama-server", "localrun", "localrun, no cache"]
    runs: dict[str, list[dict]] = {name: [] for name in order}
    for rnd in range(args.rounds):
        for name in order if rnd % 2 == 0 else order[::-1]:
            print(f"round {rnd + 1}: {name}", file=sys.stderr)
            if name == "llama-server":
                server = llama_server(model, slots=2, slot_ctx=args.slot_ctx, threads=threads)
            else:
                server = serve(str(model), *flags, *(["--prompt-cache-mb", "0"] if "no cache" in name else []))
            with server as base:
                got = measure(base, args.chats, args.max_tokens)
            runs[name].append(got)
            print(json.dumps(got), file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(v for r in runs[name] for v in r[key])

    summary = {
        "localrun_next_turn_ttft_s": med("localrun", "next_turn_ttft_s"),
        "llama_server_next_turn_ttft_s": med("llama-server", "next_turn_ttft_s"),
        "no_cache_next_turn_ttft_s": med("localrun, no cache", "next_turn_ttft_s"),
        "localrun_first_ttft_s": med("localrun", "first_ttft_s"),
        "llama_server_first_ttft_s": med("llama-server", "first_ttft_s"),
    }
    summary["next_turn_ratio"] = summary["localrun_next_turn_ttft_s"] / summary["llama_server_next_turn_ttft_s"]
    summary["cache_speedup"] = summary["no_cache_next_turn_ttft_s"] / summary["localrun_next_turn_ttft_s"]
    report = {
        "machine": platform.platform(),
        "model": model.name,
        "threads": threads,
        "slots": 2,
        "slot_ctx": args.slot_ctx,
        "chats": args.chats,
        "rounds": args.rounds,
        "summary": summary,
        "runs": runs,
    }
    path = write_result("prompt-cache", report)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
