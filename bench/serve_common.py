"""Helpers shared by the server benchmarks: start `localrun serve` on a free loopback port, stream one request."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# What a request to both servers carries besides temperature 0, so that both get the same request: localrun
# serve fills what a request leaves out from the model's catalog recommendation (for the default model DRY 0.8,
# repeat penalty 1.1 and a system prompt), and llama-server's chat template adds its own default system prompt.
# So each request sends a system message and the neutral DRY and repeat penalty (llama-server's defaults; it
# ignores the field name it does not use).
SAME_SAMPLING = {"dry_multiplier": 0, "repetition_penalty": 1.0}
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(*args: str):
    """Run `localrun serve ARGS` on a free loopback port; yields the base URL (…/v1)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LOCALRUN_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "localrun.cli", "serve", "--port", str(port), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, "localrun serve")
        yield f"{base}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def wait_healthy(proc: subprocess.Popen, base: str, name: str, timeout_s: float = 300) -> None:
    """Wait for GET /health to answer 200 (both localrun serve and llama-server have it)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


def stream_chat(client, model: str, messages: list[dict], **kwargs) -> dict:
    """One streaming chat request; its text deltas (a chunk per token, or per 50 ms at higher rates), token count
    and client-side timings."""
    t0 = time.perf_counter()
    first = last = None
    parts, usage = [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            parts.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else 0
    return {
        "text": "".join(parts),
        "deltas": parts,
        "completion_tokens": tokens,
        "ttft_s": (first - t0) if first else None,
        "latency_s": end - t0,
        "stream_tps": (tokens - 1) / (last - first) if first and last and last > first and tokens > 1 else None,
    }
