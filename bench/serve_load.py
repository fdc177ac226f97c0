"""Concurrent clients against `localrun serve --parallel N` and `llama-server -np N`, in one run.

For each client count C (1, 2, 4, 8 by default) both servers get the same model, the same threads, the same
KV memory (C slots of --slot-ctx tokens) and the same requests: C clients x R requests, greedy, exactly
--max-tokens tokens each (ignore_eos), each with the same system message and neutral penalties
(serve_common.SAME_SAMPLING; otherwise localrun would apply its catalog's recommendation). All of them are
sent at once from C threads, on prompts new to the server, then each again alone (the reference); a reply under
load must equal the same request alone. The servers take turns, and the rounds interleave (llama-server,
localrun, localrun, llama-server, ...), so drift on the machine hits both.

Records per server and C: total tokens/s under load, TTFT p50/p95, latency p50/p95, and the replies that
differed; then ours / llama-server's for throughput and TTFT p95.

Run: python bench/serve_load.py [--clients 1 2 4 8] [--requests 2] [--max-tokens 96] [--rounds 2]
Needs llama-server from bench/llama_tools.sh.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_model, llama_tool, physical_cores, write_result  # noqa: E402
from serve_common import SAME_SAMPLING, SYSTEM, free_port, serve, stream_chat, wait_healthy  # noqa: E402

TOPICS = ["rivers", "bread", "owls", "trains", "tea", "glaciers", "violins", "bees", "deserts", "comets"]
ASKS = ["Tell me about {}.", "Write a short story about {}.", "Why do people like {}?", "Describe {}."]


def prompts(n: int) -> list[list[dict]]:
    return [
        [SYSTEM, {"role": "user", "content": ASKS[i // len(TOPICS) % len(ASKS)].format(TOPICS[i % len(TOPICS)])}]
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextmanager
def llama_server(model: Path, *, slots: int, slot_ctx: int, threads: int):
    port = free_port()
    cmd = [str(llama_tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(slots), "-c", str(slots * slot_ctx), "-t", str(threads), "-tb", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, "llama-server")
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # llama-server with several slots has been seen to hang on SIGTERM
            proc.kill()
            proc.wait()


def measure(base: str, jobs: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """The requests alone, then C clients at once; the same replies both ways is the check."""
    import openai

    sampling = {"temperature": 0, "max_tokens": max_tokens, "extra_body": {"ignore_eos": True, **SAME_SAMPLING}}
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    warm_up = [SYSTEM, {"role": "user", "content": "Say hello."}]  # first-request costs out of the numbers
    stream_chat(client, model, warm_up, **sampling)
    results: list[dict | None] = [None] * len(jobs)
    errors: list[str] = []
    per_client = len(jobs) // clients

    def run_client(c: int) -> None:
        own = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=3600)
        for r in range(per_client):
            i = c * per_client + r
            try:
                results[i] = stream_chat(own, model, jobs[i], **sampling)
            except Exception as exc:  # counted: every request must complete
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run_client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    # The references come after the load: under load every prompt is new to both servers (llama-server keeps
    # evicted prompts in a RAM cache, --cache-ram, which would otherwise serve the load from the references).
    reference = [stream_chat(client, model, m, **sampling) for m in jobs]
    done = [r for r in results if r is not None]
    ttft = [r["ttft_s"] for r in done if r["ttft_s"] is not None]
    latency = [r["latency_s"] for r in done]
    alone_s = sum(r["latency_s"] for r in reference)
    return {
        "completed": len(done),
        "failed": errors,
        "same_as_alone": sum(1 for i, r in enumerate(results) if r is not None and r["text"] == reference[i]["text"]),
        "tokens": sum(r["completion_tokens"] for r in done),
        "alone_tokens_per_s": sum(r["completion_tokens"] for r in reference) / alone_s,
        "load_tokens_per_s": sum(r["completion_tokens"] for r in done) / wall_s,
        "ttft_p50_s": percentile(ttft, 0.5) if ttft else None,
        "ttft_p95_s": percentile(ttft, 0.95) if ttft else None,
        "latency_p50_s": percentile(latency, 0.5) if latency else None,
        "latency_p95_s": percentile(latency, 0.95) if latency else None,
        "alone_latency_p50_s": statistics.median(r["latency_s"] for r in reference),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--slot-ctx", type=int, default=2048, help="context per slot (both servers)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF (default: the default model)")
    parser.add_argument("--out", default="serve-load")
    args = parser.parse_args()
    model = args.model or default_model()
    threads = physical_cores()
    rows: dict[str, dict[str, list[dict]]] = {}
    for n in args.clients:
        jobs = prompts(n * args.requests)
        order = ["llama-server", "localrun"]
        for rnd in range(args.rounds):
            for name in order if rnd % 2 == 0 else order[::-1]:
                print(f"{n} clients, round {rnd + 1}: {name}", file=sys.stderr)
                if name == "llama-server":
                    server = llama_server(model, slots=n, slot_ctx=args.slot_ctx, threads=threads)
                else:
                    flags = ["--parallel", str(n), "--n-ctx", str(args.slot_ctx), "--n-threads", str(threads)]
                    server = serve(str(model), *flags, "--max-queue", str(4 * n))
                with server as base:
                    got = measure(base, jobs, n, args.max_tokens)
                rows.setdefault(str(n), {}).setdefault(name, []).append(got)
                print(json.dumps({k: v for k, v in got.items() if k != "failed"}), file=sys.stderr)
    summary = {}
    ok = True
    for n, by_server in rows.items():
        ours, theirs = by_server["localrun"], by_server["llama-server"]

        def med(runs: list[dict], key: str) -> float | None:
            values = [r[key] for r in runs if r[key] is not None]
            return statistics.median(values) if values else None

        total = int(n) * args.requests
        summary[n] = {
            "localrun_tokens_per_s": med(ours, "load_tokens_per_s"),
            "llama_server_tokens_per_s": med(theirs, "load_tokens_per_s"),
            "throughput_ratio": med(ours, "load_tokens_per_s") / med(theirs, "load_tokens_per_s"),
            "localrun_ttft_p95_s": med(ours, "ttft_p95_s"),
            "llama_server_ttft_p95_s": med(theirs, "ttft_p95_s"),
            "ttft_p95_ratio": med(ours, "ttft_p95_s") / med(theirs, "ttft_p95_s"),
            "localrun_same_as_alone": f"{min(r['same_as_alone'] for r in ours)}/{total}",
            "llama_server_same_as_alone": f"{min(r['same_as_alone'] for r in theirs)}/{total}",
            "alone_ratio": med(ours, "alone_tokens_per_s") / med(theirs, "alone_tokens_per_s"),
        }
        ok = ok and all(r["completed"] == total and not r["failed"] for r in ours)
    report = {
        "machine": platform.platform(),
        "model": model.name,
        "threads": threads,
        "slot_ctx": args.slot_ctx,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "summary": summary,
        "runs": rows,
    }
    path = write_result(args.out, report)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
