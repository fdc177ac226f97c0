"""Server overhead: generation tok/s a streaming client sees vs `localrun chat` on the same model and request.

The client's rate is (completion_tokens - 1) / (last chunk - first chunk); `localrun chat`'s is the
decode rate on its stats line. Runs alternate (chat, server, chat, server, ...) and the medians of
RUNS each are compared; the target is a ratio >= 0.95.

Run: python bench/serve_overhead.py [--runs 5] [--max-tokens 128] [--out bench/results/serve-overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_common import REPO, serve, stream_chat  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."


def chat_rate(model: str | None, max_tokens: int) -> float:
    """Decode tok/s from `localrun chat -p` (the same prompt and recommended system prompt and settings as the
    server applies, greedy, fixed length)."""
    cmd = [
        sys.executable,
        "-m",
        "localrun.cli",
        "chat",
        *([model] if model else []),
        "-p",
        PROMPT,
        "--temperature",
        "0",
        "--max-tokens",
        str(max_tokens),
        "--ignore-eos",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
    match = re.search(r"gen ([\d.]+) tok/s", done.stderr)
    if not match:
        raise SystemExit(f"no decode rate in: {done.stderr}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve-overhead.json")
    args = parser.parse_args()
    import openai

    chat, server = [], []
    with serve(*([args.model] if args.model else [])) as base:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": PROMPT}]
        stream_chat(client, model, messages, temperature=0, max_tokens=8)  # warm-up
        for run in range(args.runs):
            chat.append(chat_rate(args.model, args.max_tokens))
            result = stream_chat(
                client, model, messages, temperature=0, max_tokens=args.max_tokens, extra_body={"ignore_eos": True}
            )
            server.append(result["stream_tps"])
            print(f"run {run + 1}: chat {chat[-1]:.1f} tok/s, server stream {server[-1]:.1f} tok/s", file=sys.stderr)
    ratio = statistics.median(server) / statistics.median(chat)
    report = {
        "machine": platform.platform(),
        "max_tokens": args.max_tokens,
        "chat_tps": chat,
        "server_stream_tps": server,
        "chat_tps_median": statistics.median(chat),
        "server_stream_tps_median": statistics.median(server),
        "ratio": ratio,
        "target": 0.95,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(report, indent=2))
    return 0 if ratio >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
