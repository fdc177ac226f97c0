"""Load test for `localrun serve`: C concurrent clients x R requests each, on loopback, temperature 0.

Every request is first sent alone (the reference), then all of them at once from C threads. Each
reply under load must match its reference: the same text and the same token count (the server streams a
chunk per token or, when tokens come faster than 20 a second, per 50 ms). Replies that interleaved would not. Records throughput and p50/p95 TTFT and latency (client side: request
sent to first content chunk, and to the end of the stream).

Run: python bench/serve_load.py [--clients 8] [--requests 10] [--max-tokens 64] [--out bench/results/serve-load.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import serve, stream_chat  # noqa: E402

TOPICS = [
    "rivers",
    "bread",
    "owls",
    "trains",
    "tea",
    "glaciers",
    "violins",
    "bees",
    "deserts",
    "comets",
    "libraries",
    "bicycles",
    "coral",
    "volcanoes",
    "chess",
    "lighthouses",
    "maple trees",
    "kites",
    "submarines",
    "honey",
]
ASKS = [
    "Tell me one fact about {}.",
    "Write a short sentence about {}.",
    "Why do people like {}?",
    "Describe {} in a few words.",
]


def prompts(n: int) -> list[list[dict]]:
    return [
        [{"role": "user", "content": ASKS[i // len(TOPICS) % len(ASKS)].format(TOPICS[i % len(TOPICS)])}]
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="model to serve (default: the default model)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve-load.json")
    args = parser.parse_args()
    import openai

    total = args.clients * args.requests
    jobs = prompts(total)
    serve_args = [args.model] if args.model else []
    with serve(*serve_args, "--max-queue", str(args.clients * 2)) as base:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        sampling = {"temperature": 0, "max_tokens": args.max_tokens}
        print(f"reference: {total} requests, one at a time", file=sys.stderr)
        reference = [stream_chat(client, model, m, **sampling) for m in jobs]
        results: list[dict | None] = [None] * total
        errors: list[str] = []

        def worker(c: int) -> None:
            own = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=3600)
            for r in range(args.requests):
                i = c * args.requests + r
                try:
                    results[i] = stream_chat(own, model, jobs[i], **sampling)
                except Exception as exc:  # counted: every request must complete
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")

        print(f"load: {args.clients} clients x {args.requests} requests", file=sys.stderr)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall_s = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    mismatches = [
        i
        for i, r in enumerate(results)
        if r is not None
        and (r["text"], r["completion_tokens"]) != (reference[i]["text"], reference[i]["completion_tokens"])
    ]
    ttft = [r["ttft_s"] for r in done if r["ttft_s"] is not None]
    latency = [r["latency_s"] for r in done]
    report = {
        "machine": platform.platform(),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "completed": len(done),
        "failed": errors,
        "mismatched_replies": mismatches,
        "wall_s": wall_s,
        "throughput_tokens_per_s": sum(r["completion_tokens"] for r in done) / wall_s,
        "requests_per_s": len(done) / wall_s,
        "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
        "ttft_p95_s": percentile(ttft, 0.95) if ttft else None,
        "latency_p50_s": percentile(latency, 0.5) if latency else None,
        "latency_p95_s": percentile(latency, 0.95) if latency else None,
        "alone_latency_p50_s": statistics.median(r["latency_s"] for r in reference),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "failed"}, indent=2))
    ok = len(done) == total and not errors and not mismatches
    print("PASS" if ok else "FAIL: see failed / mismatched_replies", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
